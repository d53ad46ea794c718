"""The autopilot: rules judged from the persisted telemetry, actions recorded in the ledger, and a poisoned
batch that is detected and rolled back, so the run ends better than without the autopilot."""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, default_collate

from onthefly import Trainer
from onthefly.control.errors import ProtocolError
from onthefly.mixins.autopilot import RuleBook, RuleSpec

POISONED_BATCH = 20


class PoisonedCollate:
    """default_collate, except that one batch (the n-th) is scaled up and mislabelled."""

    def __init__(self, at: int, scale: float) -> None:
        self.calls, self.at, self.scale = 0, at, scale

    def __call__(self, items):
        self.calls += 1
        x, y = default_collate(items)
        if self.calls == self.at:
            return x * self.scale, (y + 1) % 3
        return x, y


class SlowLoss(nn.Module):
    """Cross-entropy that takes ~10 ms a step, so the autopilot reacts within a few dozen steps."""

    def forward(self, outputs, targets):
        time.sleep(0.01)
        return nn.functional.cross_entropy(outputs, targets)


def dataset(n: int, seed: int) -> TensorDataset:
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))
    w = torch.randn(8, 3, generator=torch.Generator().manual_seed(99))
    return TensorDataset(x, (x @ w).argmax(1))


def train(tmp_path, autopilot, *, scale: float = 1000.0, epochs: int = 6) -> tuple[float, object]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    loader = DataLoader(dataset(512, 0), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1),
                        collate_fn=PoisonedCollate(POISONED_BATCH, scale))
    trainer = Trainer(project="autopilot", max_epochs=epochs, transport="off", save_dir=str(tmp_path),
                      ckpt_every_steps=5, autopilot=autopilot)
    session = trainer.fit(model, torch.optim.Adam(model.parameters(), lr=0.01), SlowLoss(), loader, seed=0,
                          progress=False)
    test = dataset(1024, 5)
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(model(test.tensors[0]), test.tensors[1]))
    return loss, session


def test_a_poisoned_batch_is_rolled_back_and_the_run_ends_better(tmp_path):
    plain, plain_session = train(tmp_path / "plain", None)
    auto, session = train(tmp_path / "auto", True)
    actions = [e for e in session.ledger_of() if e["origin"] == "autopilot"]
    assert [e["cmd"] for e in actions] == ["rollback", "set_hparams"], actions
    rollback, scale = actions
    assert rollback["rule"] == "spike" and rollback["ok"] and scale["payload"]["lr_scale"] == 0.5
    # Back to a checkpoint from before the poisoned step (weights after step 19 at the latest).
    assert rollback["result"]["step"] < POISONED_BATCH <= rollback["step"]
    assert session.optimizer.param_groups[0]["lr"] == 0.005
    fired = session.autopilot.history
    assert len(fired) == 1 and fired[0]["kind"] == "loss_spike" and fired[0]["good_step"] < POISONED_BATCH
    assert not [e for e in plain_session.ledger_of() if e["origin"] == "autopilot"]
    assert math.isfinite(plain) and auto < 0.5 * plain, (auto, plain)


def test_a_nan_loss_is_rolled_back_by_the_nonfinite_rule(tmp_path):
    rules = [{"name": "nan", "kind": "nonfinite_loss", "lr_scale": 0.5}]
    loss, session = train(tmp_path, rules, scale=float("nan"), epochs=3)
    actions = [e for e in session.ledger_of() if e["origin"] == "autopilot"]
    assert [e["cmd"] for e in actions] == ["rollback", "set_hparams"] and actions[0]["rule"] == "nan"
    assert actions[0]["result"]["step"] < POISONED_BATCH
    assert math.isfinite(loss)  # without the rollback, NaN weights stay NaN
    assert all(torch.isfinite(p).all() for p in session.model.parameters())


def test_without_a_checkpoint_the_action_only_scales_the_learning_rate(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 3))
    loader = DataLoader(dataset(256, 0), batch_size=16, collate_fn=PoisonedCollate(6, 1000.0))
    trainer = Trainer(project="autopilot", max_epochs=4, transport="off", save_dir=str(tmp_path),
                      autopilot=[{"name": "spike", "kind": "loss_spike", "min_history": 3, "max_fires": 1}])
    session = trainer.fit(model, torch.optim.SGD(model.parameters(), lr=0.1), SlowLoss(), loader, progress=False)
    fired = session.autopilot.history
    assert len(fired) == 1 and fired[0]["rolled_back"] is False and "ckpt_every_steps" in fired[0]["rollback_skipped"]
    assert [e["cmd"] for e in session.ledger_of() if e["origin"] == "autopilot"] == ["set_hparams"]
    assert session.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_bad_rules_are_refused_by_the_python_api():
    trainer = Trainer(project="autopilot", transport="off")
    try:
        with pytest.raises(ProtocolError, match="kind"):
            trainer.session.configure_autopilot([{"name": "x", "kind": "magic"}])
        with pytest.raises(ProtocolError, match="unique"):
            trainer.session.configure_autopilot([{"name": "x", "kind": "loss_spike"}] * 2)
    finally:
        trainer.session.close()


# ---- the rules on their own ------------------------------------------------------------------------


def step(n: int, loss, run: str = "r") -> dict:
    return {"type": "trainStep", "step": n, "loss": loss, "run_id": run}


def test_loss_spike_fires_against_the_running_median_and_knows_the_last_good_step():
    book = RuleBook()
    book.set_rules([RuleSpec("spike", "loss_spike", factor=3.0, window=5, min_history=3, max_fires=2,
                             cooldown_steps=10)])
    assert [book.feed(step(i, 1.0 - 0.01 * i)) for i in range(1, 6)] == [None] * 5
    decision = book.feed(step(6, 10.0))
    assert decision is not None and decision.rule == "spike" and decision.good_step == 5 and decision.rollback
    assert "running median" in decision.reason
    assert book.feed(step(7, 12.0)) is None  # within the cooldown
    assert book.feed(step(8, 0.9)) is None and book.good_step == 8  # spikes never enter the median
    assert book.feed(step(20, 9.0)).step == 20  # the second (and last) fire
    assert book.feed(step(40, 9.0)) is None  # max_fires reached
    assert book.rules["spike"].fires == 2


def test_nonfinite_needs_finite_losses_first_and_a_new_run_starts_a_new_history():
    book = RuleBook()
    book.set_rules([RuleSpec("nan", "nonfinite_loss")])
    assert book.feed(step(1, None)) is None  # a loop that reports no loss is not a NaN
    assert book.feed(step(2, 0.5)) is None
    assert book.feed(step(3, None)).good_step == 2
    assert book.feed(step(4, None, run="fork1")) is None  # another run: no finite loss seen there yet


def test_val_plateau_lowers_the_learning_rate_without_a_rollback():
    book = RuleBook()
    book.set_rules([RuleSpec("flat", "val_plateau", patience=2, min_delta=0.01, lr_scale=0.1)])
    events = [0.9, 0.8, 0.795, 0.79]
    fired = [book.feed({"type": "epoch_end", "epoch": i, "val_loss": v, "run_id": "r"}) for i, v in enumerate(events)]
    assert fired[:3] == [None, None, None]
    assert fired[3] is not None and fired[3].rollback is False and fired[3].lr_scale == 0.1
    disabled = RuleBook()
    disabled.set_rules([RuleSpec("flat", "val_plateau", patience=1, enabled=False)])
    assert all(disabled.feed({"type": "epoch_end", "epoch": i, "val_loss": 1.0, "run_id": "r"}) is None
               for i in range(5))
