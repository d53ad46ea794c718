"""Per-sample losses of HF models from their `ModelOutput`: causal LM (shifted, -100 ignored), pre-shifted
labels, sequence classification, regression and multi-label — each against a computation by hand."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

transformers = pytest.importorskip("transformers", reason="the HF integration needs transformers (dev extra)")

from onthefly.integrations.hf.losses import ModelOutputLoss, per_sample_loss  # noqa: E402

from .helpers import Sequences, tiny_gpt2  # noqa: E402


def batch_of(ds, n):
    return {k: torch.stack([ds[i][k] for i in range(n)]) for k in ds[0]}


def by_hand_causal(model, ds, i):
    """-mean log p(token t+1 | tokens <= t) over the sequence's labelled tokens, unpadded, in float64."""
    length = int(ds.lengths[i])
    ids, labels = ds.ids[i, :length], ds.labels[i, :length]
    logits = model(ids[None]).logits[0, :-1].double()
    targets = labels[1:]
    keep = (targets != -100).nonzero()[:, 0]
    return float(-F.log_softmax(logits, dim=-1)[keep, targets[keep]].mean())


def test_causal_lm_per_sample_losses_are_the_mean_over_real_tokens():
    ds = Sequences(8, prompt=2)
    model = tiny_gpt2().eval()
    loss = ModelOutputLoss(shift_labels=True, reduction="none")
    with torch.no_grad():
        losses = loss(model, batch_of(ds, 8))
        expected = [by_hand_causal(model, ds, i) for i in range(8)]
        hf_own = [float(model(ds.ids[i, :int(ds.lengths[i])][None],
                              labels=ds.labels[i, :int(ds.lengths[i])][None]).loss) for i in range(8)]
    assert losses.shape == (8,)
    assert torch.allclose(losses.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(losses, torch.tensor(hf_own), atol=1e-5)
    loss.reduction = "mean"
    with torch.no_grad():
        assert torch.isclose(loss(model, batch_of(ds, 8)), losses.mean())


def test_pre_shifted_labels_are_used_as_they_are():
    ds = Sequences(4)
    model = tiny_gpt2().eval()
    batch = batch_of(ds, 4)
    shifted = torch.full_like(batch["labels"], -100)
    shifted[:, :-1] = batch["labels"][:, 1:]
    with torch.no_grad():
        from_shifted = ModelOutputLoss(shift_labels=True, reduction="none")(
            lambda **kw: model(**{k: v for k, v in kw.items() if k != "shift_labels"}),
            {**batch, "shift_labels": shifted})
        plain = ModelOutputLoss(shift_labels=True, reduction="none")(model, batch)
    assert torch.allclose(from_shifted, plain, atol=1e-6)


def test_a_sequence_without_labelled_tokens_has_no_loss():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, 3, 4, 5], [-100] * 5])
    losses = per_sample_loss(logits, labels, shift_labels=True)
    assert torch.isfinite(losses[0]) and torch.isnan(losses[1])


def test_sequence_classification_regression_and_multi_label():
    config = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(1, 40, (5, 7))
    labels = torch.tensor([0, 2, 1, 1, 0])
    with torch.no_grad():
        losses = ModelOutputLoss(reduction="none")(model, {"input_ids": ids, "labels": labels})
        logits = model(input_ids=ids).logits
    assert torch.allclose(losses, F.cross_entropy(logits, labels, reduction="none"), atol=1e-6)
    assert torch.isclose(losses.mean(), model(input_ids=ids, labels=labels).loss, atol=1e-6)

    regression = torch.randn(5, 1)
    targets = torch.randn(5)
    assert torch.allclose(per_sample_loss(regression, targets), (regression[:, 0] - targets) ** 2)
    multi = torch.randn(5, 3)
    flags = torch.randint(0, 2, (5, 3)).float()
    expected = F.binary_cross_entropy_with_logits(multi, flags, reduction="none").mean(dim=1)
    assert torch.allclose(per_sample_loss(multi, flags), expected)


def test_bad_inputs_name_what_is_wrong():
    with pytest.raises(KeyError, match="'labels'"):
        ModelOutputLoss()(lambda **kw: {"logits": torch.zeros(2, 3)}, {"input_ids": torch.zeros(2, 4)})
    with pytest.raises(TypeError, match="no 'logits'"):
        ModelOutputLoss()(lambda **kw: {"loss": torch.zeros(())}, {"labels": torch.zeros(2, dtype=torch.long)})
    with pytest.raises(ValueError, match="reduction"):
        ModelOutputLoss(reduction="max")


def test_importing_onthefly_never_imports_transformers_or_accelerate():
    code = ("import sys, json, onthefly, onthefly.integrations, onthefly.integrations.hf\n"
            "from onthefly import attach, Trainer\n"
            "from onthefly.integrations.hf import ModelOutputLoss\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'accelerate'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []
    import onthefly
    from onthefly.integrations import HFCallback, HFDelegate, attach_hf
    from onthefly.integrations.hf.callback import HFCallback as defined

    assert onthefly.HFCallback is HFCallback is defined and callable(attach_hf) and HFDelegate.runtime == "hf"
