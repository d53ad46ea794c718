"""Forks keep their promises: a budget trains exactly that much and hands control back, patience
early-stops on validation (or is refused), and switch_run leaves a run `train()` continues."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from onthefly import OnTheFlySession, ProtocolError, SessionConfig
from onthefly.control.bus import events_since_page

from .helpers import make_dataset, make_model


def session_with(tmp_path, *, val: bool = False, **settings) -> OnTheFlySession:
    cfg = SessionConfig(project="budget", transport="memory", save_dir=str(tmp_path), seed=0, **settings)
    session = OnTheFlySession(cfg)
    model = make_model()
    session.bind(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), loss_fn=nn.CrossEntropyLoss(),
                 train_loader=DataLoader(make_dataset(128), batch_size=16, shuffle=True),
                 val_loader=DataLoader(make_dataset(64, seed=3), batch_size=32) if val else None)
    return session


def budget_events(session: OnTheFlySession) -> list[dict]:
    session.bus.flush(timeout=5)
    page = events_since_page(session.bus.event_log, 0, 10_000)
    return [e for e in page["events"] if e["type"] == "fork_budget_reached"]


def run_with_timeout(fn, timeout: float = 60.0):
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "train() did not return: the run hangs without a dashboard"
    return result[0]


def test_a_step_budget_trains_exactly_its_steps_and_train_returns(tmp_path):
    # docs/runs.md, literally: report, fork with a 200-step budget, train.
    with session_with(tmp_path) as session:
        assert session.train() == "completed" and session.state.step == 8  # max_epochs=1: 128/16 steps
        session.call("generate_report", {"subset_on": "train"})
        fork = session.call("fork", {"selection": {"kind": "quantile", "from": 0.8, "to": 1.0},
                                     "hparams": {"lr": 1e-3, "max_steps": 200}})
        assert fork["budget_steps"] == 200 and 20 <= fork["subset_count"] <= 30  # ~3 batches an epoch
        assert run_with_timeout(session.train) == "completed"
        assert session.state.step - 8 == 200  # exactly the budget, across many epochs of the subset
        [reached] = budget_events(session)
        assert reached["trained_steps"] == 200 and reached["reason"] == "budget_reached"
        assert reached["run_id"] == fork["new_run"] and reached["region_loss"] is not None


def test_an_epoch_budget_is_epochs_of_the_subset(tmp_path):
    with session_with(tmp_path) as session:
        session.train()
        fork = session.call("fork", {"selection": {"kind": "indices", "ids": list(range(40))},
                                     "hparams": {"epochs": 3, "batch_size": 8}})
        assert fork["budget_steps"] == 3 * 5
        run_with_timeout(session.train)
        assert session.state.step - 8 == 15 and session.state.epoch == 3


def test_patience_stops_the_child_once_validation_stops_improving(tmp_path):
    with session_with(tmp_path, val=True, max_epochs=1) as session:
        session.train()
        session.cfg.max_epochs = 50
        fork = session.call("fork", {"selection": {"kind": "indices", "ids": list(range(64))},
                                     "hparams": {"lr": 20.0, "patience": 2}})  # a learning rate that diverges
        assert run_with_timeout(session.train) == "completed"
        [reached] = budget_events(session)
        assert reached["reason"] == "patience" and reached["run_id"] == fork["new_run"]
        assert 3 <= session.state.epoch < 50  # stopped early: best epoch, then two that did not improve


def test_patience_needs_validation(tmp_path):
    with session_with(tmp_path) as session:
        session.train()
        with pytest.raises(ProtocolError, match="patience needs validation") as info:
            session.call("fork", {"selection": {"kind": "indices", "ids": [1, 2]}, "hparams": {"patience": 2}})
        assert info.value.code == "bad_payload"


def test_switch_run_between_trainings_leaves_a_run_that_train_continues(tmp_path):
    with session_with(tmp_path) as session:
        session.train()
        fork = session.call("fork", {"selection": {"kind": "indices", "ids": list(range(32))}})
        run_with_timeout(session.train)
        child_steps = session.state.step
        switched = session.call("switch_run", {"run_id": "baseline"})
        assert switched["paused"] is False and switched["step"] == 8 and session.cfg.run_name == "baseline"
        session.cfg.max_epochs = 2
        assert run_with_timeout(session.train) == "completed"  # no pause was left behind
        assert session.state.step == 16 and child_steps == 8 + 2
        assert fork["new_run"] in session.known_runs()
