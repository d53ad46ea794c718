"""Regression tests for defects found by using the library as a newcomer would (issues 10 and 15)."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from onthefly import SessionClosed, Trainer
from onthefly.cli.formatting import format_event
from onthefly.client import DashboardServer
from onthefly.mixins.selection import by_kmeans
from onthefly.progress import ProgressDisplay, wants_progress

from .helpers import MemoryDashboard, make_dataset, make_model, wait_until


def fit(trainer: Trainer, model: nn.Module, n: int = 64, batch: int = 16, **kw):
    return trainer.fit(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                       loss_fn=nn.CrossEntropyLoss(), train_loader=DataLoader(make_dataset(n), batch_size=batch),
                       seed=0, progress=False, **kw)


def test_a_custom_step_keeps_every_metric_it_returns(tmp_path):
    trainer = Trainer(project="defects", transport="memory", save_dir=str(tmp_path), log_every_n_steps=1)
    dash = MemoryDashboard(trainer.session.channel)
    trainer.session.channel.connect()
    model = make_model()

    @trainer.training_step
    def step(batch, state):
        x, y = batch
        state.optimizer.zero_grad()
        out = state.model(x)
        loss = state.loss_fn(out, y)
        loss.backward()
        state.optimizer.step()
        return {"loss": loss.detach(), "top5": torch.tensor(0.5)}  # exactly two metrics

    fit(trainer, model)
    steps = dash.events("trainStep")
    assert steps and all(e["top5"] == 0.5 for e in steps)


def test_training_ends_and_fit_returns_while_a_dashboard_is_connected(tmp_path):
    """One rule for every runtime: after training the script goes on (the extension never sends stop)."""
    with DashboardServer(port=0) as server:
        trainer = Trainer(project="defects", dashboard_port=server.port, save_dir=str(tmp_path))
        server.wait_connected(10)
        done = threading.Event()
        thread = threading.Thread(target=lambda: (fit(trainer, make_model()), done.set()), daemon=True)
        thread.start()
        assert done.wait(30), "Trainer.fit kept serving the dashboard after training"
        assert server.wait_for_event("trainingFinished", 10)["status"] == "completed"


def test_serve_after_training_keeps_answering_until_stop(tmp_path):
    with DashboardServer(port=0) as server:
        trainer = Trainer(project="defects", dashboard_port=server.port, save_dir=str(tmp_path),
                          serve_after_training=True)
        server.wait_connected(10)
        thread = threading.Thread(target=fit, args=(trainer, make_model()), daemon=True)
        thread.start()
        server.wait_for_event("trainingFinished", 30)
        assert thread.is_alive()
        assert server.request("status")["training"] is False
        report = server.request("generate_report", {"subset_on": "train"}, timeout=20)
        assert len(report["losses"]) == 64  # commands still run after training
        server.request("stop")
        thread.join(20)
        assert not thread.is_alive()


def test_a_command_after_fit_returned_says_the_session_is_closed(tmp_path):
    trainer = Trainer(project="defects", transport="off", save_dir=str(tmp_path))
    session = fit(trainer, make_model())
    with pytest.raises(SessionClosed, match="is closed"):
        session.call("generate_report", {"subset_on": "train"})


def test_a_test_is_shown_once_by_the_terminal_dashboard():
    result = {"label": "final", "avg_loss": 0.5, "step": 3}
    assert format_event({"type": "test_complete", **result}).startswith("test 'final' finished")
    assert format_event({"type": "auto_test_complete", **result}) is None


def test_kmeans_selection_ignores_dead_units_instead_of_isolating_one_sample():
    rng = np.random.default_rng(0)
    n = 400
    losses = np.concatenate([rng.normal(0.3, 0.05, 300), rng.normal(2.0, 0.1, 100)])  # 100 hard samples
    embed = np.concatenate([rng.normal(size=(n, 3)), np.zeros((n, 4))], axis=1)
    embed[300:, 0] += 4.0  # the hard samples also sit apart in the embedding
    embed[7, 3] = 50.0  # a dead ReLU unit that fired once: (x - q1) / IQR made it 5e13 and a 1-sample cluster
    chosen, meta = by_kmeans([losses[:, None], embed], losses, np.arange(n), k=2, target_clusters=None,
                             feature="loss|embed")
    assert meta["clusters"][0]["mean_loss"] > 1.5
    assert 80 <= len(chosen) <= 120 and set(range(300, 400)) & set(chosen.tolist())


def test_wants_progress_only_on_a_terminal_unless_asked():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert wants_progress(None, io.StringIO()) is False
    assert wants_progress(None, Tty()) is True
    assert wants_progress(False, Tty()) is False and wants_progress(True, io.StringIO()) is True


def test_progress_off_a_terminal_prints_every_epoch_with_its_val_loss(tmp_path):
    trainer = Trainer(project="defects", transport="off", save_dir=str(tmp_path), max_epochs=3)
    out = io.StringIO()
    display = ProgressDisplay(trainer.session, stream=out).start()
    model = make_model()
    trainer.fit(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), loss_fn=nn.CrossEntropyLoss(),
                train_loader=DataLoader(make_dataset(64), batch_size=16),
                val_loader=DataLoader(make_dataset(32, seed=3), batch_size=16), progress=False)
    display.stop()
    lines = out.getvalue().splitlines()
    epochs = [line for line in lines if " done · val_loss " in line]
    assert [line.split(" · ")[1] for line in epochs] == ["epoch 0 done", "epoch 1 done", "epoch 2 done"]
    assert lines[-1].startswith("baseline · epoch 3 · step 12")


def test_progress_on_a_terminal_redraws_one_line(tmp_path):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    trainer = Trainer(project="defects", transport="off", save_dir=str(tmp_path), max_epochs=2)
    out = Tty()
    display = ProgressDisplay(trainer.session, stream=out).start()
    wait_until(lambda: out.getvalue(), 5, "the first draw")
    fit(trainer, make_model(), n=64)
    display.stop()
    text = out.getvalue()
    assert "baseline · epoch 2 · step 8" in text and "\x1b[" in text  # drawn with terminal control codes
