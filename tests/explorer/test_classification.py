"""infer_task / classification_stats: when a batch is classification and how outputs are read."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onthefly.data_explorer import (
    ClassificationShapeError,
    TaskSpec,
    classification_stats,
    infer_task,
)


def test_multiclass_kinds_from_the_loss_and_the_values() -> None:
    logits = torch.randn(8, 4)
    y = torch.randint(0, 4, (8,))
    assert infer_task(logits, y, loss_fn=nn.CrossEntropyLoss()) == TaskSpec("multiclass", 4, "logits")
    assert infer_task(logits.log_softmax(1), y, loss_fn=nn.NLLLoss()).output_kind == "log_probs"
    assert infer_task(logits.softmax(1), y, loss_fn=lambda p, t: p).output_kind == "probs"
    assert infer_task(logits, y, loss_fn=lambda p, t: p).output_kind == "logits"
    assert infer_task(logits.softmax(1), y, output_kind="logits").output_kind == "logits"
    assert infer_task(logits, y[:, None]).kind == "multiclass"  # (B, 1) labels


def test_what_is_not_classification() -> None:
    logits = torch.randn(8, 4)
    assert "not class indices" in infer_task(logits, torch.rand(8)).reason
    assert "outside [0, 4)" in infer_task(logits, torch.full((8,), 4)).reason
    assert "not one label per sample" in infer_task(logits, torch.randint(0, 4, (8, 3))).reason
    assert "not 0/1" in infer_task(torch.randn(8), torch.randn(8)).reason
    assert infer_task(torch.randn(8, 3, 5), torch.zeros(8, dtype=torch.long)).kind == "loss_only"
    assert infer_task((torch.randn(8, 4),), torch.zeros(8)).kind == "loss_only"
    with pytest.raises(ValueError, match="output_kind must be one of"):
        infer_task(logits, torch.zeros(8), output_kind="softmax")


def test_stats_equal_softmax_quantities() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 3) * 3
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    stats = classification_stats(logits, y, TaskSpec("multiclass", 3, "logits"))
    p = logits.softmax(1)
    torch.testing.assert_close(stats["p_true"], p[torch.arange(6), y])
    torch.testing.assert_close(stats["p_pred"], p.max(1).values)
    assert torch.equal(stats["pred"], logits.argmax(1)) and torch.equal(stats["correct"], logits.argmax(1) == y)
    other = logits.masked_fill(F.one_hot(y, 3).bool(), -torch.inf).max(1).values
    torch.testing.assert_close(stats["margin"], logits[torch.arange(6), y] - other)
    probs = classification_stats(p, y, TaskSpec("multiclass", 3, "probs"))
    torch.testing.assert_close(probs["p_true"], stats["p_true"])


def test_binary_probabilities_and_shape_errors() -> None:
    p = torch.tensor([0.9, 0.2, 0.6])
    y = torch.tensor([1.0, 1.0, 0.0])
    stats = classification_stats(p[:, None], y, TaskSpec("binary", 2, "probs"))
    torch.testing.assert_close(stats["p_true"], torch.tensor([0.9, 0.2, 0.4]))
    assert stats["correct"].tolist() == [True, False, False]
    with pytest.raises(ClassificationShapeError, match=r"\(B, 3\) as in the first batch"):
        classification_stats(torch.randn(3, 5), torch.zeros(3, dtype=torch.long), TaskSpec("multiclass", 3, "logits"))
    with pytest.raises(ClassificationShapeError, match="outside \\[0, 3\\)"):
        classification_stats(torch.randn(3, 3), torch.tensor([0, 1, 7]), TaskSpec("multiclass", 3, "logits"))
