"""Lifecycle guarantees: trainingFinished exactly once, also on errors and Ctrl+C."""

from __future__ import annotations

import pytest
import torch

from onthefly import Trainer

from .helpers import MemoryDashboard, loaders, make_model


def make_trainer(tmp_path, **kw):
    kw.setdefault("log_every_n_steps", 1)  # these tests follow every step's event
    trainer = Trainer(project="life", max_epochs=1, transport="memory", save_dir=str(tmp_path),
                      serve_after_training=False, **kw)
    trainer.session.channel.connect()
    return trainer, MemoryDashboard(trainer.session.channel)


def test_failing_step_reports_failed_and_reraises(tmp_path):
    trainer, dash = make_trainer(tmp_path)

    @trainer.training_step
    def step(batch, state):
        if state.session.state.step == 3:
            raise ValueError("bad batch shape (3, 7)")
        x, y = batch
        state.optimizer.zero_grad()
        loss = state.loss_fn(state.model(x), y)
        loss.backward()
        state.optimizer.step()
        return {"loss": loss.detach()}

    model = make_model()
    train, _ = loaders("user", 0)
    with pytest.raises(ValueError, match="bad batch shape"):
        trainer.fit(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                    loss_fn=torch.nn.CrossEntropyLoss(), train_loader=train)
    finished = dash.events("trainingFinished")
    assert len(finished) == 1
    assert finished[0]["status"] == "failed"
    assert "ValueError: bad batch shape (3, 7)" in finished[0]["error"]
    assert finished[0]["step"] == 3
    assert [e["step"] for e in dash.events("trainStep")] == [1, 2, 3]


def test_keyboard_interrupt_reports_stopped(tmp_path):
    trainer, dash = make_trainer(tmp_path)

    @trainer.training_step
    def step(batch, state):
        raise KeyboardInterrupt

    model = make_model()
    train, _ = loaders("user", 0)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                    loss_fn=torch.nn.CrossEntropyLoss(), train_loader=train)
    finished = dash.events("trainingFinished")
    assert [f["status"] for f in finished] == ["stopped"]


def test_opening_events_and_metrics(tmp_path):
    trainer, dash = make_trainer(tmp_path, log_every_n_steps=1, diagnostics_every_n_steps=2,
                                 diagnostics_interval_s=0)
    model = make_model()
    train, test = loaders("user", 0)
    trainer.fit(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                loss_fn=torch.nn.CrossEntropyLoss(), train_loader=train, val_loader=test, test_loader=test)
    types = [e["type"] for e in dash.events()]
    assert types[0] == "session_started"
    assert types.index("newRun") < types.index("trainStep")
    assert types[-1] == "trainingFinished"
    steps = dash.events("trainStep")
    assert [s["step"] for s in steps] == list(range(1, 17))
    for s in steps:
        assert isinstance(s["loss"], float) and s["lr"] == pytest.approx(0.1)
        assert s["run_id"] == "baseline" and s["epoch"] == 0
    even = [s for s in steps if s["step"] % 2 == 0]
    assert all(isinstance(s["weight_norm"], float) and s["weight_norm"] > 0 for s in even)
    assert all(isinstance(s["grad_norm"], float) for s in even)
    assert all(0.0 <= s["accuracy"] <= 1.0 for s in even)
    assert all(s["mem_vram"] > 0 for s in even)
    epoch_end = dash.events("epoch_end")
    assert len(epoch_end) == 1 and epoch_end[0]["val_loss"] > 0


def test_stop_ends_training_after_the_current_batch(tmp_path):
    from .helpers import CountingLoss, wait_until

    trainer, dash = make_trainer(tmp_path)
    session = trainer.session
    trainer.config.max_epochs = 50
    session.cfg.max_epochs = 50

    def send_stop() -> None:
        dash.send("stop", rid="s")
        wait_until(lambda: not session.state.running, what="stop to be handled")

    model = make_model()
    train, _ = loaders("user", 0)
    trainer.fit(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                loss_fn=CountingLoss(at_call=5, action=send_stop), train_loader=train)
    steps = [e["step"] for e in dash.events("trainStep")]
    assert steps == [1, 2, 3, 4, 5]
    assert dash.events("epoch_end") == []
    assert dash.events("trainingFinished")[0]["status"] == "stopped"
    assert dash.reply("s")["data"]["status"] == "stopping"
