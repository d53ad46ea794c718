"""What a Lightning run reports: trainStep from logged values, epoch_end, tests, datamodules, lazy import."""

from __future__ import annotations

import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch

import onthefly
from onthefly.integrations.lightning import canonical_metric_name

from .helpers import Driver, dashboard, events, wait_until
from .lit import AtStep, LitClassifier, LitData, loaders, make_trainer

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec"),  # raised inside Lightning itself
]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_train_steps_come_from_what_lightning_computed(tmp_path, accumulate):
    pl.seed_everything(0, verbose=False)
    model = LitClassifier()
    trainer = make_trainer(accumulate_grad_batches=accumulate, log_every_n_steps=2)
    train, val, _ = loaders()
    forwards = []
    model.net.register_forward_hook(lambda *a: forwards.append(1))
    with dashboard() as server:
        onthefly.attach_lightning(trainer=trainer, model=model, log_every_n_steps=1, project="lit", transport="tcp",
                                  dashboard_port=server.port, save_dir=str(tmp_path), diagnostics_every_n_steps=4,
                                  diagnostics_interval_s=0)
        server.wait_connected()
        trainer.fit(model, train, val)
        server.wait_for_event("trainingFinished")
        history = events(server)
    # No extra forward pass: one per training batch and one per validation batch, nothing else.
    assert len(forwards) == 2 * 16 + 2 * 2
    steps = [e for e in history if e["type"] == "trainStep"]
    per_epoch = 16 // accumulate
    assert [s["step"] for s in steps] == list(range(1, 2 * per_epoch + 1)) == list(range(1, trainer.global_step + 1))
    assert [s["epoch"] for s in steps] == [0] * per_epoch + [1] * per_epoch
    # The loss of a step is the mean over its accumulated micro-batches, as the module computed them.
    for s in steps:
        window = model.batch_losses[(s["step"] - 1) * accumulate: s["step"] * accumulate]
        assert s["loss"] == pytest.approx(sum(window) / accumulate, rel=1e-6)
        # What the module logged (train_acc) comes with every reported step.
        assert 0.0 <= s["accuracy"] <= 1.0
    assert steps[0]["lr"] == pytest.approx(0.02) and steps[-1]["lr"] == pytest.approx(0.01)  # StepLR per epoch
    assert steps[per_epoch]["val_loss"] is not None and steps[0]["val_loss"] is None
    assert all(s["weight_norm"] > 0 and s["grad_norm"] > 0 for s in steps if s["step"] % 4 == 0)
    ends = [e for e in history if e["type"] == "epoch_end"]
    assert [e["epoch"] for e in ends] == [0, 1] and all(e["val_loss"] > 0 for e in ends)
    types = [e["type"] for e in history]
    assert types[0] == "session_started" and types.index("newRun") < types.index("trainStep")
    assert types[-1] == "trainingFinished" and history[-1]["status"] == "completed"


def test_datamodule_fit_test_now_and_final_test(tmp_path):
    """`fit(model, datamodule=dm)` works unchanged; tests run the datamodule's test loader through Lightning."""
    pl.seed_everything(0, verbose=False)
    model, dm = LitClassifier(), LitData()
    holder: dict = {}

    def ask_for_test(trainer, module):
        holder["driver"] = Driver(server, lambda s, r: r.update(test=s.request("test_now", {"label": "mid"})))
        wait_until(lambda: session.gate.pending, what="test_now queued")

    trainer = make_trainer(max_epochs=1, callbacks=[AtStep(3, ask_for_test)])
    with dashboard() as server:
        session = onthefly.attach_lightning(trainer=trainer, model=model, datamodule=dm, do_test_after=True,
                                            log_every_n_steps=1,
                                            project="lit", transport="tcp", dashboard_port=server.port,
                                            save_dir=str(tmp_path))
        server.wait_connected()
        trainer.fit(model, datamodule=dm)
        mid = holder["driver"].join()["test"]
        auto = server.wait_for_event("auto_test_complete")
        finished = server.wait_for_event("trainingFinished")
        history = events(server)
    assert model.test_end_labels == ["test_1", "test_2"]
    assert model.test_labels == ["test_1"] * 3 + ["test_2"] * 3  # 48 test samples in batches of 16
    assert "test" in dm.setups and dm.trainer is trainer and model.trainer is trainer
    assert mid["label"] == "mid" and mid["step"] == 4 and mid["avg_loss"] > 0
    assert auto["label"] == "final" and auto["source"] == "auto" and auto["env_test_label"] == "test_2"
    assert history.index(auto) < history.index(finished) and finished["status"] == "completed"
    assert session.train_root_loader is not None  # taken from the datamodule once fit started


def test_module_without_test_step_uses_the_loss_fn(tmp_path):
    class NoTest(LitClassifier):
        test_step = pl.LightningModule.test_step

    pl.seed_everything(0, verbose=False)
    model = NoTest()
    _, _, test = loaders()
    holder: dict = {}

    def ask_for_test(trainer, module):
        holder["driver"] = Driver(server, lambda s, r: r.update(test=s.request("test_now")))
        wait_until(lambda: session.gate.pending, what="test_now queued")

    trainer = make_trainer(max_steps=4, callbacks=[AtStep(2, ask_for_test)])
    train, val, _ = loaders()
    with dashboard() as server:
        session = onthefly.attach_lightning(trainer=trainer, model=model, log_every_n_steps=1, test_loader=test,
                                            loss_fn=torch.nn.functional.cross_entropy, project="lit",
                                            transport="tcp", dashboard_port=server.port, save_dir=str(tmp_path))
        server.wait_connected()
        trainer.fit(model, train, val)
        result = holder["driver"].join()["test"]
    assert result["avg_loss"] > 0 and model.test_labels == []


def test_set_hparams_and_reset_reach_lightnings_optimizer(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = LitClassifier()
    holder: dict = {}

    def script(server, results):
        results["pause"] = server.request("pause")
        results["set"] = server.request("set_hparams", {"lr": 0.5})
        results["reset"] = server.request("reset_session", {"reason": "test"})
        results["resume"] = server.request("resume")

    def start(trainer, module):
        holder["driver"] = Driver(server, script)
        wait_until(lambda: session.gate.pending, what="pause queued")

    trainer = make_trainer(max_epochs=1, callbacks=[AtStep(3, start)])
    train, val, _ = loaders()
    with dashboard() as server:
        session = onthefly.attach_lightning(trainer=trainer, model=model, project="lit", transport="tcp",
                                            log_every_n_steps=1, dashboard_port=server.port, save_dir=str(tmp_path))
        server.wait_connected()
        trainer.fit(model, train, val)
        results = holder["driver"].join()
        server.wait_for_event("trainingFinished", timeout=30)  # the last events are in flight
        history = events(server)
    assert results["pause"]["step"] == 4
    assert results["set"]["param_groups"][0]["lr"] == 0.5
    assert results["reset"]["ok"] is True
    # The reset restored the optimizer and scheduler captured when training started: lr back to 0.02,
    # and the scheduler still halves it at the epoch's end.
    lrs = [e["lr"] for e in history if e["type"] == "trainStep"]
    assert lrs[:4] == [0.02] * 4 and set(lrs[4:]) == {0.02}
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01)
    steps = [e["step"] for e in history if e["type"] == "trainStep"]
    # After the reset at step 4 the run counts from 0 again while Lightning's own counter goes on.
    assert steps == [1, 2, 3, 4] + list(range(1, 16 - 4 + 1))


def test_a_narrowed_train_loader_takes_effect_at_the_next_epoch(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = LitClassifier()
    train, val, _ = loaders()
    seen: list[torch.Tensor] = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 1:
                seen.append(batch[0])

    def narrow(trainer, module):
        loader = session.rebind_train_loader(list(range(40, 72)))
        assert loader.batch_size == 16 and loader.dataset.indices == list(range(40, 72))

    trainer = make_trainer(callbacks=[AtStep(3, narrow), Record()])
    with dashboard() as server:
        session = onthefly.attach_lightning(trainer=trainer, model=model, project="lit", transport="tcp",
                                            log_every_n_steps=1, dashboard_port=server.port, save_dir=str(tmp_path))
        server.wait_connected()
        trainer.fit(model, train, val)
        server.wait_for_event("trainingFinished")
        history = events(server)
    steps = [e["epoch"] for e in history if e["type"] == "trainStep"]
    assert steps == [0] * 16 + [1] * 2  # epoch 0 finishes on the full data; epoch 1 has 32 samples
    rows = torch.cat(seen)
    subset = train.dataset.tensors[0][40:72]
    assert len(rows) == 32 and all(any(torch.equal(r, s) for s in subset) for r in rows)
    assert session.active_subset == list(range(40, 72))


def test_a_pause_sent_before_fit_holds_the_first_batch(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = LitClassifier()
    trainer = make_trainer(max_steps=3)
    train, val, _ = loaders()
    with dashboard() as server:
        session = onthefly.attach_lightning(trainer=trainer, model=model, project="lit", transport="tcp",
                                            log_every_n_steps=1, dashboard_port=server.port, save_dir=str(tmp_path))
        server.wait_connected()
        status = server.request("status")  # read-only: answered at once, before fit
        assert status["step"] == 0 and status["running"] is False

        def script(s, r):
            r["pause"] = s.request("pause")
            r["batches_while_paused"] = len(model.batch_losses)
            r["resume"] = s.request("resume")

        driver = Driver(server, script)
        wait_until(lambda: session.gate.pending, what="pause queued")
        trainer.fit(model, train, val)
        results = driver.join()
    assert results["pause"]["step"] == 0 and results["batches_while_paused"] == 0
    assert trainer.global_step == 3


def test_canonical_metric_names():
    assert canonical_metric_name("train_loss") == "loss" == canonical_metric_name("train/loss")
    assert canonical_metric_name("val_loss") == "val_loss" == canonical_metric_name("validation_loss")
    assert canonical_metric_name("acc") == "accuracy" == canonical_metric_name("train_acc_step")
    assert canonical_metric_name("f1") == "f1"


def test_attach_lightning_rejects_the_wrong_objects(tmp_path):
    with pytest.raises(TypeError, match="LightningModule"):
        onthefly.attach_lightning(trainer=make_trainer(), model=torch.nn.Linear(2, 2), transport="off",
                                  save_dir=str(tmp_path))
    with pytest.raises(TypeError, match="lightning.pytorch.Trainer"):
        onthefly.attach_lightning(trainer=object(), model=LitClassifier(), transport="off", save_dir=str(tmp_path))


def test_import_onthefly_does_not_import_lightning():
    code = ("import sys, onthefly; onthefly.attach; onthefly.OnTheFlyExternalSession; onthefly.FrameworkDelegate; "
            "import onthefly.integrations; print('lightning' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
