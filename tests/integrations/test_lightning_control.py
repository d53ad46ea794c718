"""Lightning under dashboard control over loopback TCP: pause, status, test, save, resume, stop, load."""

from __future__ import annotations

import threading
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

import onthefly
from onthefly.checkpoints import load_checkpoint

from .helpers import Driver, assert_same_weights, dashboard, events, pause_script, wait_until, weights
from .lit import AtStep, LitClassifier, loaders, make_trainer

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec"),  # raised inside Lightning itself
]


def fit(tmp_path, server, *, callbacks=(), accumulate=1, **attach_kw):
    pl.seed_everything(7, verbose=False)
    model = LitClassifier()
    trainer = make_trainer(callbacks=list(callbacks), accumulate_grad_batches=accumulate)
    train, val, test = loaders()
    session = onthefly.attach_lightning(trainer=trainer, model=model, project="lit", test_loader=test,
                                        log_every_n_steps=1,
                                        transport="tcp", dashboard_port=server.port, save_dir=str(tmp_path),
                                        **attach_kw)
    server.wait_connected()
    trainer.fit(model, train, val)
    return model, trainer, session


def start_script(script, landed=lambda session: session.gate.pending):
    """A trigger action: run `script` on the dashboard, and hold the batch until the command has landed."""
    holder: dict = {}

    def action(trainer, module):
        holder["driver"] = Driver(holder["server"], script)
        wait_until(lambda: landed(holder["session"]), what="the command to reach the session")

    return holder, action


@pytest.mark.parametrize("accumulate", [1, 2])
def test_pause_status_test_save_resume_is_bit_exact(tmp_path, accumulate):
    with dashboard() as server:
        reference, _, _ = fit(tmp_path / "a", server, accumulate=accumulate)
    holder, action = start_script(pause_script)
    with dashboard() as server:
        holder["server"] = server
        trigger = AtStep(10, action)
        pl.seed_everything(7, verbose=False)
        model, trainer, session = None, None, None
        model = LitClassifier()
        trainer = make_trainer(callbacks=[trigger], accumulate_grad_batches=accumulate)
        train, val, test = loaders()
        session = onthefly.attach_lightning(trainer=trainer, model=model, project="lit", test_loader=test,
                                            log_every_n_steps=1, transport="tcp", dashboard_port=server.port,
                                            save_dir=str(tmp_path / "b"))
        holder["session"] = session
        server.wait_connected()
        trainer.fit(model, train, val)
        results = holder["driver"].join()
        server.wait_for_event("trainingFinished", timeout=30)  # the last events are in flight
        history = events(server)
    assert trigger.fired
    assert_same_weights(weights(reference), weights(model))
    # With accumulation the pause waits for the window's optimizer step: it lands at step 11 either way.
    assert results["paused"]["step"] == 11 and results["status"]["step"] == 11
    assert results["status"]["paused"] is True
    assert model.test_labels == ["test_1"] * 4 and model.test_end_labels == ["test_1"]
    assert model.test_modes == [False] * 4
    assert results["test"]["avg_loss"] > 0 and results["test"]["env_test_label"] == "test_1"
    steps = [e["step"] for e in history if e["type"] == "trainStep"]
    assert steps == list(range(1, 32 // accumulate + 1))
    types = [e["type"] for e in history]
    assert types.count("paused") == 1 and types.count("resumed") == 1 and types.count("testStep") == 4


def test_acceptance_flow_with_stop(tmp_path):
    """Pause mid-epoch, status, test_now (the module's test_step ran), save_ckpt, resume, then stop."""
    holder, action = start_script(pause_script)
    stop_holder, stop_action = start_script(lambda s, r: r.update(stop=s.request("stop")),
                                            landed=lambda session: not session.state.running)
    with dashboard() as server:
        holder["server"] = stop_holder["server"] = server
        model = LitClassifier()
        trainer = make_trainer(callbacks=[AtStep(5, action), AtStep(8, stop_action)])
        train, val, test = loaders()
        session = onthefly.attach_lightning(trainer=trainer, model=model, project="lit", test_loader=test,
                                            log_every_n_steps=1,
                                            transport="tcp", dashboard_port=server.port, save_dir=str(tmp_path))
        holder["session"] = stop_holder["session"] = session
        server.wait_connected()
        trainer.fit(model, train, val)
        results = holder["driver"].join()
        stopped = stop_holder["driver"].join()["stop"]
        finished = server.wait_for_event("trainingFinished")
        history = events(server)
    assert results["paused"] == {"status": "paused", "step": 6, "ckpt": results["paused"]["ckpt"]}
    assert results["status"]["epoch"] == 0 and results["status"]["batch_in_epoch"] == 6
    # test_now ran Lightning's real test loop: test_step and on_test_end saw the label.
    assert model.test_labels == ["test_1"] * 4 and model.test_end_labels == ["test_1"]
    assert model.training and model.trainer is trainer
    test_loss = [e for e in history if e["type"] == "test_complete"][0]["avg_loss"]
    assert test_loss == pytest.approx(results["test"]["avg_loss"])
    # save_ckpt wrote our ring checkpoint and a native Lightning .ckpt, both loadable weights-only.
    ring = load_checkpoint(results["save"]["path"])
    assert ring["step"] == 6 and ring["model"].keys() == model.state_dict().keys()
    native = torch.load(results["save"]["native_path"], weights_only=True)
    assert native["global_step"] == 6 and native["onthefly"]["run_id"] == "baseline"
    assert results["resumed"]["status"] == "resumed"
    assert stopped["status"] == "stopping"
    assert trainer.global_step == 9 and trainer.should_stop
    assert finished["status"] == "stopped" and finished["step"] == 9


def test_load_ckpt_of_a_lightning_checkpoint_lands_between_two_steps(tmp_path):
    # A Lightning checkpoint from a short first run.
    pl.seed_everything(1, verbose=False)
    first = LitClassifier()
    first_trainer = make_trainer(max_steps=5)
    train, val, _ = loaders()
    first_trainer.fit(first, train, val)
    ckpt = tmp_path / "first.ckpt"
    first_trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)

    snapshots: dict = {}

    def watch(trainer, module):
        snapshots["before"] = weights(module)

    class AfterLoad(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if "reply" in holder and "after" not in snapshots:
                snapshots["after"] = weights(pl_module)
                snapshots["session_step"] = holder["session"].state.step

    holder, action = start_script(lambda s, r: r.update(load=s.request("load_ckpt", {"path": str(ckpt)})))

    def action_and_mark(trainer, module):
        watch(trainer, module)
        action(trainer, module)

    with dashboard() as server:
        holder["server"] = server
        pl.seed_everything(2, verbose=False)
        model = LitClassifier()
        trainer = make_trainer(max_epochs=1, callbacks=[AtStep(8, action_and_mark), AfterLoad()])
        session = onthefly.attach_lightning(trainer=trainer, model=model, project="lit", transport="tcp",
                                            log_every_n_steps=1,
                                            dashboard_port=server.port, save_dir=str(tmp_path / "s"),
                                            allowed_paths=(str(tmp_path),))
        holder["session"] = session
        original = session.load_checkpoint_into_state

        def traced(path, **kw):
            model.trace.append(("load_start", trainer.global_step, threading.current_thread().name))
            info = original(path, **kw)
            model.trace.append(("load_end", trainer.global_step, threading.current_thread().name))
            holder["reply"] = info
            return info

        session.load_checkpoint_into_state = traced
        server.wait_connected()
        trainer.fit(model, train, val)
        reply = holder["driver"].join()["load"]
        server.wait_for_event("trainingFinished", timeout=30)  # the last events are in flight
        history = events(server)
    trace = model.trace
    start = trace.index(("load_start", 9, "MainThread"))
    # The load sits between the end of optimizer step 9 and the start of step 10, on the training thread
    # (inside `optimizer_step`, global_step still counts the steps completed before it).
    assert trace[start - 1] == ("opt_end", 8, "MainThread")
    assert trace[start + 1] == ("load_end", 9, "MainThread")
    assert trace[start + 2] == ("opt_start", 9, "MainThread")
    assert all(name == "MainThread" for _, _, name in trace)
    assert reply["step"] == 5 and reply["path"] == str(ckpt)
    assert_same_weights({k: v for k, v in saved["state_dict"].items()}, snapshots["after"])
    assert any(not torch.equal(saved["state_dict"][k], snapshots["before"][k]) for k in saved["state_dict"])
    assert snapshots["session_step"] == 5
    steps = [e["step"] for e in history if e["type"] == "trainStep"]
    assert steps == list(range(1, 10)) + list(range(6, 6 + 16 - 9))  # counting resumes from the checkpoint
    loaded = [e for e in history if e["type"] == "checkpoint_loaded"]
    assert len(loaded) == 1 and loaded[0]["step"] == 5


class PlateauClassifier(LitClassifier):
    """Halves the lr whenever val_loss went down (mode "max"): a plateau scheduler that acts every epoch."""

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", patience=0, factor=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": plateau, "monitor": "val_loss"}}


def resumable_fit(folder, *, validate: bool, resume_from=None):
    """Three epochs of 16 batches, a checkpoint every 8; with `validate`, validation after every 8 batches."""
    pl.seed_everything(3, verbose=False)
    model = PlateauClassifier() if validate else LitClassifier()
    trainer = make_trainer(max_epochs=3, val_check_interval=0.5 if validate else 1.0,
                           limit_val_batches=1.0 if validate else 0)
    train, val, test = loaders()
    session = onthefly.attach_lightning(trainer=trainer, model=model, project="lit", transport="off",
                                        save_dir=str(folder), ckpt_every_steps=8, resume_from=resume_from)
    trainer.fit(model, train, val)
    return model, session


@pytest.mark.parametrize("validate", [True, False], ids=["validating", "no-validation"])
def test_a_checkpoint_where_validation_or_the_epochs_end_is_due_resumes_bit_exactly(tmp_path, validate):
    """Lightning's own restart skips what followed the saved batch: the validation due then and, after
    an epoch's last batch, the epoch's end. onthefly's resume runs them, as the saved run did."""
    reference, session = resumable_fit(tmp_path / "reference", validate=validate)
    ring = session.storage.checkpoint_dir("baseline")
    for step in (8, 16):  # validation due mid-epoch (validating); the first epoch's last batch
        ckpt = ring / f"step-{step:08d}.pt"
        assert load_checkpoint(ckpt)["step"] == step
        resumed, _ = resumable_fit(tmp_path / f"from-{step}", validate=validate, resume_from=str(ckpt))
        assert_same_weights(weights(reference), weights(resumed))
