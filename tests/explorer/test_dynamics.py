"""DynamicsRecorder: every sample scored once per record, by its true index, stored compactly,
committed atomically, reloaded from its folder; the training it observes is undisturbed."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from onthefly.data_explorer import (
    DynamicsError,
    DynamicsRecorder,
    DynamicsSchedule,
    ScanCancelled,
)

from .conftest import MLP, N_CLASSES, PairDataset


def _reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train()
    logp = logits.log_softmax(1)
    rows = torch.arange(len(y))
    others = logp.clone()
    others[rows, y] = -torch.inf
    return {
        "loss": F.cross_entropy(logits, y, reduction="none").numpy(),
        "p_true": logp[rows, y].exp().numpy(),
        "pred": logits.argmax(1).numpy(),
        "p_pred": logp.max(1).values.exp().numpy(),
        "margin": (logits[rows, y] - logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), -torch.inf).max(1).values).numpy(),
        "correct": (logits.argmax(1) == y).numpy(),
    }


def _forward_counter(model: nn.Module) -> list[int]:
    seen = [0]
    model.register_forward_hook(lambda _m, inputs, _o: seen.__setitem__(0, seen[0] + inputs[0].shape[0]))
    return seen


def test_record_scores_every_sample_by_root_index_in_one_forward_pass(tmp_path, model: MLP) -> None:
    root = PairDataset(103)
    subset = Subset(root, list(range(100, 0, -3)))  # 34 samples, root indices 100, 97, ..., 1
    loader = DataLoader(subset, batch_size=8, shuffle=True, drop_last=True)
    forwards = _forward_counter(model)
    rec = DynamicsRecorder(tmp_path / "dyn")
    info = rec.record(model, loader, nn.CrossEntropyLoss(), step=5, epoch=0)
    assert forwards[0] == 34, "one forward pass per sample per record"
    assert info.samples == 34 and info.extra_forward_batches == 0 and info.number == 0 and info.step == 5
    expected_idx = np.array(sorted(range(100, 0, -3)))
    np.testing.assert_array_equal(rec.indices, expected_idx)
    ref = _reference(model, root.x[expected_idx], root.y[expected_idx])
    np.testing.assert_allclose(rec.values("loss"), ref["loss"], atol=1e-6)
    np.testing.assert_allclose(rec.values("p_true"), ref["p_true"], atol=1e-3)  # float16
    np.testing.assert_allclose(rec.values("p_pred"), ref["p_pred"], atol=1e-3)
    np.testing.assert_allclose(rec.values("margin"), ref["margin"], atol=2e-3, rtol=2e-3)
    np.testing.assert_array_equal(rec.values("pred"), ref["pred"])
    np.testing.assert_array_equal(rec.values("correct").astype(bool), ref["correct"])
    np.testing.assert_array_equal(rec.labels, root.y[expected_idx].numpy())
    assert rec.task.kind == "multiclass" and rec.task.num_classes == N_CLASSES and rec.task.output_kind == "logits"
    assert {n: rec.history(n).dtype.name for n in rec.columns} == {
        "loss": "float32", "p_true": "float16", "p_pred": "float16", "pred": "int16", "margin": "float16",
        "correct": "uint8"}
    assert rec.disk_bytes() == 34 * (4 + 2 + 2 + 2 + 2 + 1)


def test_recording_leaves_training_untouched(tmp_path) -> None:
    torch.manual_seed(0)
    model = MLP(dropout=0.5, batchnorm=True)
    model.train()
    data = PairDataset(40)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    DynamicsRecorder(tmp_path).record(model, data, F.cross_entropy, step=1)
    assert random.getstate() == states[0]
    np.testing.assert_array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    assert all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed (BatchNorm statistics must not move)"
    assert all(p.grad is None for p in model.parameters())


def test_records_append_and_reload_from_the_folder(tmp_path, model: MLP, data: PairDataset) -> None:
    folder = tmp_path / "dyn"
    rec = DynamicsRecorder(folder)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for step in (10, 20, 30):
        rec.record(model, data, nn.CrossEntropyLoss(), step=step, epoch=step // 10 - 1, tag=f"e{step}")
        losses.append(rec.values("loss"))
        opt.zero_grad()
        F.cross_entropy(model(data.x), data.y).backward()
        opt.step()
    again = DynamicsRecorder(folder)
    assert [r.step for r in again.records] == [10, 20, 30] and again.last_step == 30
    assert [r.tag for r in again.records] == ["e10", "e20", "e30"]
    np.testing.assert_array_equal(np.asarray(again.history("loss")), np.stack(losses))
    assert not np.allclose(losses[0], losses[2])  # the model did change between records
    manifest = json.loads((folder / "dynamics.json").read_text())
    assert manifest["samples"] == 103 and len(manifest["records"]) == 3
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["dynamics.json", "indices.npy", "labels.npy", "loss.bin", "p_true.bin", "p_pred.bin", "pred.bin",
         "margin.bin", "correct.bin"])  # no spool files left behind


def test_a_crash_mid_record_leaves_the_committed_records_intact(tmp_path, model: MLP, data: PairDataset,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "dyn"
    rec = DynamicsRecorder(folder)
    rec.record(model, data, F.cross_entropy, step=1)
    first = rec.values("loss")
    with torch.no_grad():
        model.head.weight.mul_(3.0)

    def power_cut(_records: object) -> None:
        raise OSError("simulated power cut before the manifest was replaced")

    monkeypatch.setattr(rec, "_commit", power_cut)
    with pytest.raises(OSError, match="power cut"):
        rec.record(model, data, F.cross_entropy, step=2)
    assert (folder / "loss.bin").stat().st_size == 2 * 103 * 4  # the uncommitted block is on disk
    reopened = DynamicsRecorder(folder)
    assert reopened.num_records == 1
    np.testing.assert_array_equal(reopened.values("loss"), first)
    reopened.record(model, data, F.cross_entropy, step=2)  # overwrites the uncommitted tail
    assert DynamicsRecorder(folder).num_records == 2
    assert not np.allclose(reopened.values("loss", 1), first)


def test_a_truncated_column_file_is_reported(tmp_path, model: MLP, data: PairDataset) -> None:
    rec = DynamicsRecorder(tmp_path)
    rec.record(model, data, F.cross_entropy, step=1)
    with open(tmp_path / "margin.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DynamicsError, match=r"margin\.bin.*committed"):
        DynamicsRecorder(tmp_path)


def test_a_record_of_other_samples_or_changed_labels_is_refused(tmp_path, model: MLP, data: PairDataset) -> None:
    rec = DynamicsRecorder(tmp_path)
    rec.record(model, data, F.cross_entropy, step=1)
    with pytest.raises(DynamicsError, match="visit 50 samples, not the 103"):
        rec.record(model, Subset(data, range(50)), F.cross_entropy, step=2)
    relabelled = PairDataset(103)
    relabelled.y = (relabelled.y + 1) % N_CLASSES
    with pytest.raises(DynamicsError, match="103 sample\\(s\\) changed label .* new folder"):
        rec.record(model, relabelled, F.cross_entropy, step=2)
    assert DynamicsRecorder(tmp_path).num_records == 1


def test_cancel_commits_nothing(tmp_path, model: MLP, data: PairDataset) -> None:
    rec = DynamicsRecorder(tmp_path)
    rec.record(model, data, F.cross_entropy, step=1)
    with pytest.raises(ScanCancelled):
        rec.record(model, DataLoader(data, batch_size=10), F.cross_entropy, step=2, cancel=lambda: True)
    assert rec.num_records == 1 and DynamicsRecorder(tmp_path).num_records == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("otf-spool-")]


def test_regression_records_loss_only(tmp_path) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(30, 3), torch.randn(30, 1)
    model = nn.Linear(3, 1)
    rec = DynamicsRecorder(tmp_path)
    rec.record(model, TensorDataset(x, y), nn.MSELoss(), step=1)
    assert rec.task.kind == "loss_only" and rec.columns == ("loss",) and rec.labels is None
    assert "not floating point" not in rec.task.reason
    with torch.no_grad():
        expected = ((model(x) - y) ** 2).reshape(-1).numpy()
    np.testing.assert_allclose(rec.values("loss"), expected, rtol=1e-5)
    summary = rec.summary()
    np.testing.assert_allclose(summary.mislabel, expected, rtol=1e-5)
    with pytest.raises(DynamicsError, match="needs a classification task"):
        summary.metric("confidence")


def test_binary_single_logit(tmp_path) -> None:
    torch.manual_seed(1)
    x = torch.randn(25, 4)
    y = (x[:, 0] > 0).float()
    model = nn.Sequential(nn.Linear(4, 1), nn.Flatten(0))
    rec = DynamicsRecorder(tmp_path)
    rec.record(model, TensorDataset(x, y), nn.BCEWithLogitsLoss(), step=1)
    with torch.no_grad():
        z = model(x)
    p1 = torch.sigmoid(z)
    expected = torch.where(y == 1, p1, 1 - p1).numpy()
    assert rec.task.kind == "binary" and rec.task.output_kind == "logits"
    np.testing.assert_allclose(rec.values("p_true"), expected, atol=1e-3)
    np.testing.assert_array_equal(rec.values("correct").astype(bool), ((z > 0).float() == y).numpy())
    np.testing.assert_allclose(rec.values("margin"), torch.where(y == 1, z, -z).numpy(), atol=2e-3, rtol=2e-3)


def test_probability_outputs_are_read_as_probabilities(tmp_path) -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 3), nn.Softmax(dim=1))
    data = PairDataset(20)
    data.y = data.y % 3

    def nll_of_probs(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return -probs.gather(1, target[:, None]).log().squeeze(1)

    rec = DynamicsRecorder(tmp_path)
    rec.record(model, data, nll_of_probs, step=1)
    with torch.no_grad():
        probs = model(data.x)
    assert rec.task.output_kind == "probs"
    np.testing.assert_allclose(rec.values("p_true"), probs[torch.arange(20), data.y].numpy(), atol=1e-3)


@dataclass
class Output:
    logits: torch.Tensor
    hidden: torch.Tensor


class DictModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, N_CLASSES)

    def forward(self, features: torch.Tensor) -> Output:
        h = features * 2
        return Output(self.lin(h), h)


class DictData(Dataset):
    def __init__(self) -> None:
        self.base = PairDataset(17)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self.base[i]
        return {"features": x, "labels": y}


def test_dict_batches_and_structured_outputs(tmp_path) -> None:
    torch.manual_seed(0)
    model = DictModel()
    rec = DynamicsRecorder(tmp_path)
    rec.record(model, DictData(), nn.CrossEntropyLoss(), step=1)
    with torch.no_grad():
        logits = model(DictData().base.x).logits
    np.testing.assert_array_equal(rec.values("pred"), logits.argmax(1).numpy())
    np.testing.assert_allclose(rec.values("loss"), F.cross_entropy(logits, DictData().base.y, reduction="none").numpy(),
                               atol=1e-6)


def test_batch_scalar_loss_uses_the_batched_call_outputs(tmp_path, model: MLP, data: PairDataset) -> None:
    def mean_only(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)  # a batch mean: per-sample values come from vmap

    rec = DynamicsRecorder(tmp_path)
    info = rec.record(model, DataLoader(data, batch_size=16), mean_only, step=1)
    assert info.per_sample_method == "vmap" and info.extra_forward_batches == 0
    ref = _reference(model, data.x, data.y)
    np.testing.assert_allclose(rec.values("loss"), ref["loss"], atol=1e-5)
    np.testing.assert_array_equal(rec.values("pred"), ref["pred"])


def test_a_loss_that_hides_the_model_call_costs_one_extra_forward(tmp_path, model: MLP, data: PairDataset) -> None:
    def closure(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(net.forward(x), y, reduction="none")  # .forward skips hooks

    rec = DynamicsRecorder(tmp_path)
    info = rec.record(model, DataLoader(data, batch_size=50), closure, step=1)
    assert info.extra_forward_batches == 3  # 103 samples in batches of 50
    np.testing.assert_array_equal(rec.values("pred"), _reference(model, data.x, data.y)["pred"])


def test_output_kind_must_match_the_folder(tmp_path, model: MLP, data: PairDataset) -> None:
    DynamicsRecorder(tmp_path).record(model, data, F.cross_entropy, step=1)
    with pytest.raises(DynamicsError, match="output_kind='logits'.*'probs'"):
        DynamicsRecorder(tmp_path, output_kind="probs")
    with pytest.raises(ValueError, match="output_kind must be one of"):
        DynamicsRecorder(tmp_path, output_kind="softmax")
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        DynamicsRecorder(tmp_path).record(model, data, F.cross_entropy, step=-1)


def test_schedule_is_due_at_epoch_ends_and_every_n_steps() -> None:
    every_epoch = DynamicsSchedule()
    assert every_epoch.due(step=30, epoch=0, epoch_end=True)
    assert not every_epoch.due(step=30, epoch=0, epoch_end=False)
    assert not every_epoch.due(step=30, epoch=0, epoch_end=True, last_step=30)
    every_other = DynamicsSchedule(every_epochs=2)
    assert [every_other.due(step=10 * (e + 1), epoch=e, epoch_end=True) for e in range(4)] == [False, True, False, True]
    steps = DynamicsSchedule(every_epochs=None, every_steps=25)
    assert [s for s in range(101) if steps.due(step=s, epoch=0, epoch_end=False)] == [25, 50, 75, 100]
    assert not steps.due(step=50, epoch=0, epoch_end=True)
    with pytest.raises(ValueError, match="every_epochs or every_steps"):
        DynamicsSchedule(every_epochs=None)
    with pytest.raises(ValueError, match="every_steps must be a positive int"):
        DynamicsSchedule(every_steps=0)
