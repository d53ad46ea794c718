"""Dynamics views against hand computations: a model whose logits are a lookup table set before
each record, so every probability the recorder sees is known exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from onthefly.data_explorer import (
    METRICS,
    DynamicsError,
    DynamicsRecorder,
    summarize_dynamics,
)


class IndexData(Dataset):
    """Item i is (i, label_i): the model looks its logits up by index."""

    def __init__(self, labels: list[int]) -> None:
        self.labels = torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(i), self.labels[i]


class Table(nn.Module):
    def __init__(self, n: int, c: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(n, c))

    def forward(self, i: torch.Tensor) -> torch.Tensor:
        return self.logits[i]


LABELS = [0, 1, 2, 0, 1]
# Per record, per sample: the logits the model gives. Sample 3 flips correct -> wrong -> correct ->
# wrong (2 forgetting events); sample 4 is never right (a "mislabelled" sample).
RECORDS = [
    [[3, 0, 0], [0, 2, 0], [0, 0, 1], [2, 0, 0], [4, 0, 0]],
    [[4, 0, 0], [0, 3, 0], [0, 0, 2], [0, 2, 0], [4, 0, 0]],
    [[5, 0, 0], [0, 4, 0], [1, 0, 0], [2, 0, 0], [3, 1, 0]],
    [[6, 0, 0], [0, 5, 0], [0, 0, 3], [0, 0, 2], [5, 0, 1]],
]


@pytest.fixture
def recorded(tmp_path) -> DynamicsRecorder:
    model = Table(5, 3)
    data = IndexData(LABELS)
    rec = DynamicsRecorder(tmp_path)
    for r, table in enumerate(RECORDS):
        with torch.no_grad():
            model.logits.copy_(torch.tensor(table, dtype=torch.float32))
        rec.record(model, data, nn.CrossEntropyLoss(), step=10 * (r + 1), epoch=r)
    return rec


def _expected(records: list[int]) -> dict[str, np.ndarray]:
    logits = torch.tensor([RECORDS[r] for r in records], dtype=torch.float64)  # (R, N, C)
    y = torch.tensor(LABELS)
    logp = logits.log_softmax(-1)
    p_true = logp[:, torch.arange(5), y].exp().numpy()
    correct = (logits.argmax(-1) == y).numpy()
    true_logit = logits[:, torch.arange(5), y]
    other = logits.clone()
    other[:, torch.arange(5), y] = -torch.inf
    loss = -logp[:, torch.arange(5), y].numpy()
    return {
        "confidence": p_true.mean(0), "variability": p_true.std(0), "correctness": correct.mean(0),
        "forgetting": (correct[:-1] & ~correct[1:]).sum(0), "never_learned": ~correct.any(0),
        "aum": (true_logit - other.max(-1).values).numpy().mean(0), "mean_loss": loss.mean(0),
        "loss_std": loss.std(0), "loss": loss[-1],
    }


def test_views_match_hand_computation(recorded: DynamicsRecorder) -> None:
    summary = recorded.summary()
    want = _expected([0, 1, 2, 3])
    np.testing.assert_array_equal(summary.indices, np.arange(5))
    np.testing.assert_array_equal(summary.labels, LABELS)
    for name in ("confidence", "variability"):
        np.testing.assert_allclose(getattr(summary, name), want[name], atol=2e-3)  # float16 p_true
    for name in ("mean_loss", "loss_std", "loss"):
        np.testing.assert_allclose(getattr(summary, name), want[name], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(summary.aum, want["aum"], atol=5e-3)
    np.testing.assert_allclose(summary.correctness, want["correctness"])
    np.testing.assert_array_equal(summary.forgetting, want["forgetting"])
    assert summary.forgetting[3] == 2 and summary.never_learned.tolist() == [False, False, False, False, True]
    np.testing.assert_allclose(summary.mislabel, want["mean_loss"], rtol=1e-5)
    assert int(np.argmax(summary.mislabel)) == 4  # the never-learned sample is the most suspect
    assert summary.steps == [10, 20, 30, 40] and summary.epochs == [0, 1, 2, 3]


def test_a_window_of_records(recorded: DynamicsRecorder) -> None:
    early = recorded.summary(slice(0, 2))
    want = _expected([0, 1])
    np.testing.assert_allclose(early.confidence, want["confidence"], atol=2e-3)
    np.testing.assert_array_equal(early.forgetting, want["forgetting"])
    picked = summarize_dynamics(recorded, [3, 0])  # taken in record order
    np.testing.assert_array_equal(picked.forgetting, _expected([0, 3])["forgetting"])
    assert picked.records == [0, 3]
    with pytest.raises(IndexError, match=r"record numbers \[7\] out of range: 4 records"):
        recorded.summary([7])
    with pytest.raises(DynamicsError, match="matches none"):
        recorded.summary(slice(5, 9))


def test_metric_names_orientation_and_report(recorded: DynamicsRecorder) -> None:
    summary = recorded.summary()
    for name in METRICS:
        assert summary.metric(name).shape == (5,)
    np.testing.assert_allclose(summary.hardness("confidence"), -summary.confidence.astype(np.float64))
    np.testing.assert_allclose(summary.hardness("mislabel"), summary.mislabel.astype(np.float64))
    report = summary.to_report("variability")
    assert json.loads(json.dumps(report)) == report
    assert report["sample_indices"] == [0, 1, 2, 3, 4] and report["meta"]["records"] == 4
    assert report["meta"]["higher_is_harder"] is True and report["meta"]["last_step"] == 40
    with pytest.raises(KeyError, match="unknown dynamics metric 'entropy'"):
        summary.metric("entropy")


def test_nothing_recorded_is_an_error(tmp_path) -> None:
    with pytest.raises(DynamicsError, match="nothing recorded yet"):
        DynamicsRecorder(tmp_path).summary()


def test_summary_streams_in_chunks(recorded: DynamicsRecorder, monkeypatch: pytest.MonkeyPatch) -> None:
    from onthefly.data_explorer import cartography

    whole = recorded.summary()
    monkeypatch.setattr(cartography, "_CHUNK_VALUES", 4)  # one sample per chunk
    chunked = recorded.summary()
    for name in METRICS:
        np.testing.assert_array_equal(chunked.metric(name), whole.metric(name))
