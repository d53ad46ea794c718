"""trainStep telemetry: the emission cadence, the interval loss, and the diagnostics throttle."""

from __future__ import annotations

import json

import pytest
import torch

from onthefly import Trainer
from onthefly.session.config import ConfigError, SessionConfig
from onthefly.control.jsonsafe import encode_text
from onthefly.telemetry import IntervalMean, StepTelemetry, mean_lr, sum_of

from .helpers import MemoryDashboard, loaders, make_model


def test_count_reports_due_steps_and_the_interval_mean_loss():
    telemetry = StepTelemetry(log_every=3, diag_every=1, diag_interval=0.0)
    losses = [torch.tensor(1.0), torch.tensor(2.0), torch.tensor(6.0)]
    due = [telemetry.count(step, 8, loss) for step, loss in zip((1, 2, 3), losses)]
    assert due == [False, False, True]
    fields = telemetry.fields(3, 0, None, loss=losses[2], lr=0.5)
    # The mean is taken when the event is encoded (on the writer thread), not here.
    assert isinstance(fields["loss"], IntervalMean)
    assert json.loads(encode_text(fields))["loss"] == pytest.approx(3.0)
    assert fields["throughput"] > 0 and fields["lr"] == 0.5 and fields["step"] == 3
    # The next interval starts empty: its loss is its own.
    assert [telemetry.count(s, 8, torch.tensor(10.0)) for s in (4, 5, 6)] == [False, False, True]
    assert float(telemetry.fields(6, 0, None, loss=torch.tensor(10.0))["loss"]) == pytest.approx(10.0)


def test_sum_of_numbers_tensors_and_what_does_not_mix():
    assert sum_of([1.0, 2.0, 6.0]) == pytest.approx(9.0)
    assert sum_of([torch.tensor([2.0]), torch.tensor(4.0)]).item() == pytest.approx(6.0)
    assert sum_of([1.0, torch.tensor(5.0)]) is None  # mixed kinds
    assert sum_of([torch.ones(3), torch.tensor(5.0)]) is None  # not scalars


def test_an_interval_of_losses_that_do_not_mix_reports_its_last_loss():
    telemetry = StepTelemetry(log_every=3)
    last = torch.tensor(5.0)
    for step, loss in ((1, 1.0), (2, 2.0), (3, last)):
        telemetry.count(step, 1, loss)
    assert telemetry.fields(3, 0, None)["loss"].tolist() == 5.0


def test_diagnostics_every_n_steps_and_no_more_often_than_the_interval():
    every_other = StepTelemetry(log_every=1, diag_every=2, diag_interval=0.0)
    assert [every_other.diagnostics_due(s) for s in range(1, 7)] == [False, True, False, True, False, True]
    throttled = StepTelemetry(log_every=1, diag_every=1, diag_interval=3600.0)
    assert [throttled.diagnostics_due(s) for s in range(1, 5)] == [True, False, False, False]
    throttled.restart()  # a new training starts a new throttle window
    assert throttled.diagnostics_due(5)


def test_add_diagnostics_fills_norms_accuracy_and_memory():
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    out = model(x)
    torch.nn.functional.cross_entropy(out, y).backward()
    telemetry = StepTelemetry()
    fields = telemetry.fields(1, 0, None, loss=None)
    telemetry.add_diagnostics(fields, model, torch.device("cpu"), out, y)
    expected = torch.linalg.vector_norm(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert fields["weight_norm"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert fields["grad_norm"].item() > 0
    assert fields["accuracy"].item() == pytest.approx((out.argmax(1) == y).float().mean().item())
    assert fields["mem_vram"] > 0


def test_mean_lr_over_groups():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.3}])
    assert mean_lr(opt) == pytest.approx(0.2)
    assert mean_lr(None) is None


def test_diagnostics_interval_is_validated():
    with pytest.raises(ConfigError, match="diagnostics_interval_s"):
        SessionConfig(diagnostics_interval_s=-1)
    assert SessionConfig(diagnostics_interval_s=2).diagnostics_interval_s == 2.0


def train_recording_losses(trainer: Trainer) -> tuple[MemoryDashboard, list[float]]:
    """Train 16 steps per epoch with a step that records each step's loss; returns the dashboard and the losses."""
    trainer.session.channel.connect()
    dash = MemoryDashboard(trainer.session.channel)
    seen: list[float] = []

    @trainer.training_step
    def step(batch, state):
        x, y = batch
        state.optimizer.zero_grad()
        loss = state.loss_fn(state.model(x), y)
        loss.backward()
        state.optimizer.step()
        seen.append(loss.item())
        return {"loss": loss.detach()}

    model = make_model()
    train, _ = loaders("user", 0)
    trainer.fit(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                loss_fn=torch.nn.CrossEntropyLoss(), train_loader=train)
    return dash, seen


def test_trainer_emits_every_n_steps_with_the_mean_loss_of_the_interval(tmp_path):
    trainer = Trainer(project="tele", max_epochs=1, transport="memory", save_dir=str(tmp_path),
                      serve_after_training=False, log_every_n_steps=4)
    dash, seen = train_recording_losses(trainer)
    events = dash.events("trainStep")
    assert [e["step"] for e in events] == [4, 8, 12, 16]
    for event in events:
        window = seen[event["step"] - 4:event["step"]]
        assert event["loss"] == pytest.approx(sum(window) / 4, rel=1e-6)


def test_default_cadence_is_time_bounded_and_reports_the_skipped_tail(tmp_path):
    """log_every_n_steps=None: the first step at once, then at most one event per log_interval_s;
    the epoch's last step, skipped by the cadence, is reported at the epoch end with the mean loss."""
    trainer = Trainer(project="tele", max_epochs=2, transport="memory", save_dir=str(tmp_path),
                      serve_after_training=False, log_interval_s=3600)
    dash, seen = train_recording_losses(trainer)
    events = [e for e in dash.events() if e["type"] in ("trainStep", "epoch_end")]
    assert [(e["type"], e.get("step", e.get("epoch"))) for e in events] == [
        ("trainStep", 1), ("trainStep", 16), ("epoch_end", 0), ("trainStep", 32), ("epoch_end", 1)]
    assert events[0]["loss"] == pytest.approx(seen[0], rel=1e-6)
    assert events[1]["loss"] == pytest.approx(sum(seen[1:16]) / 15, rel=1e-6)
    assert events[3]["loss"] == pytest.approx(sum(seen[16:32]) / 16, rel=1e-6)
    assert events[3]["epoch"] == 1 and events[3]["throughput"] > 0


def test_many_unreported_losses_are_folded_into_one_device_sum():
    telemetry = StepTelemetry(log_every=1000, diag_every=10)
    values = [float(i % 7) for i in range(1, 1001)]
    due = [telemetry.count(i, 1, torch.tensor(v)) for i, v in enumerate(values, start=1)]
    assert due[-1] and not any(due[:-1])
    assert len(telemetry._losses) < 256  # compacted on the way
    loss = telemetry.fields(1000, 0, None)["loss"]
    assert loss.item() == pytest.approx(sum(values) / 1000, rel=1e-6)
