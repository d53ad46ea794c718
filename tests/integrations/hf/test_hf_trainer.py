"""The HF Trainer under onthefly: attaching changes nothing, pauses land on optimizer steps and are
bit-exact with gradient accumulation, live hyperparameters reach HF, reports score real tokens,
checkpoints resume (onthefly's and HF's own folder), and HF's TrainerControl stays in charge."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

pytest.importorskip("transformers", reason="the HF integration needs transformers (dev extra)")

from transformers import TrainerCallback  # noqa: E402

import onthefly  # noqa: E402
from onthefly.checkpoints import load_checkpoint  # noqa: E402

from ..helpers import Driver, assert_same_weights, dashboard, events, wait_until, weights  # noqa: E402
from .helpers import AtStep, Sequences, make_trainer, session_options  # noqa: E402

WAIT = 30.0


def train(tmp_path, *, server=None, attach=True, callbacks=(), session_settings=None, **trainer_options):
    trainer = make_trainer(tmp_path, callbacks=list(callbacks), **trainer_options)
    session = None
    if attach:
        session = onthefly.attach_hf(trainer, **session_options(tmp_path, server, **(session_settings or {})))
        if server is not None:
            server.wait_connected(WAIT)
    try:
        trainer.train()
    finally:
        if session is not None:
            session.close()
    return trainer, session


def script_at(step, script, holder):
    """An `AtStep` action: run `script` on the dashboard and hold the step until its first command landed."""
    def action(state):
        holder["driver"] = Driver(holder["server"], script)
        wait_until(lambda: holder["session"]().gate.pending, what="the command to reach the session")
    return AtStep(step, action)


@pytest.mark.parametrize("accumulation", [1, 3])
def test_attaching_changes_nothing(tmp_path, accumulation):
    # 48 samples / 4 = 12 batches: with accumulation 3, four full accumulations per epoch; with
    # 5 batches per accumulation the last one of each epoch would be short — covered below.
    plain, _ = train(tmp_path / "plain", attach=False, gradient_accumulation_steps=accumulation)
    attached, session = train(tmp_path / "attached", gradient_accumulation_steps=accumulation)
    assert_same_weights(weights(plain.model), weights(attached.model))
    assert session.state.step == attached.state.global_step == 24 // accumulation
    assert session.state.epoch == 2 and session.state.status == "completed"


def test_a_short_last_accumulation_trains_as_plain_hf_does(tmp_path):
    plain, _ = train(tmp_path / "plain", attach=False, gradient_accumulation_steps=5)
    attached, session = train(tmp_path / "attached", gradient_accumulation_steps=5)
    assert_same_weights(weights(plain.model), weights(attached.model))
    assert attached.state.global_step == 6  # ceil(12 / 5) per epoch


def pause_script(server, results):
    results["paused"] = server.request("pause", {"reason": "test"}, timeout=WAIT)
    results["status"] = server.request("status", timeout=WAIT)
    results["test"] = server.request("test_now", {"label": "mid"}, timeout=WAIT)
    results["save"] = server.request("save_ckpt", timeout=WAIT)
    results["report"] = server.request("generate_report", {"subset_on": "train"}, timeout=WAIT)
    results["resumed"] = server.request("resume", timeout=WAIT)


def test_pause_with_accumulation_is_bit_exact_and_lands_on_an_optimizer_step(tmp_path):
    test_set = Sequences(8, seed=11)
    reference, _ = train(tmp_path / "a", attach=False, gradient_accumulation_steps=2, logging_strategy="steps",
                         logging_steps=3)
    holder: dict = {}
    with dashboard() as server:
        holder["server"] = server
        trainer = make_trainer(tmp_path / "b", callbacks=[script_at(3, pause_script, holder)],
                               gradient_accumulation_steps=2, logging_strategy="steps", logging_steps=3)
        session = onthefly.attach_hf(trainer, test_dataset=test_set, **session_options(tmp_path / "b", server))
        holder["session"] = lambda: session
        server.wait_connected(WAIT)
        trainer.train()
        results = holder["driver"].join()
        server.wait_for_event(lambda e: e.get("type") == "trainingFinished", WAIT)
        history = events(server)
        session.close()
    assert_same_weights(weights(reference.model), weights(trainer.model))
    assert results["paused"]["step"] == 3 and results["status"]["paused"] is True
    assert results["status"]["runtime"] == "hf" and results["status"]["batch_in_epoch"] == 6  # 3 steps x 2 batches
    saved = load_checkpoint(results["save"]["path"])
    assert saved["step"] == 3 and saved["batch_in_epoch"] == 6 and saved["epoch"] == 0
    assert json.loads(saved["framework"]["trainer_state"])["global_step"] == 3
    # The test is HF's evaluate on the test set, and it did not cancel the log HF planned at step 3.
    logged = trainer.state.log_history
    test_logs = [e for e in logged if "test_loss" in e]
    assert len(test_logs) == 1 and math.isclose(results["test"]["avg_loss"], test_logs[0]["test_loss"])
    assert [e["step"] for e in logged if "loss" in e][:1] == [3]
    assert [e["step"] for e in reference.state.log_history if "loss" in e] == [e["step"] for e in logged if "loss" in e]
    assert sum(1 for e in history if e["type"] == "testStep") == 1  # 8 test samples, batches of 8
    report = results["report"]
    assert sorted(report["sample_indices"]) == list(range(48)) and all(np.isfinite(report["losses"]))
    steps = [e["step"] for e in history if e["type"] == "trainStep"]
    assert steps == sorted(set(steps)) and steps[-1] == 12


def test_report_on_a_padded_causal_lm_matches_a_hand_computation(tmp_path):
    holder: dict = {}

    def script(server, results):
        server.request("pause", timeout=WAIT)
        results["report"] = server.request("generate_report", {"subset_on": "train"}, timeout=WAIT)
        server.request("stop", timeout=WAIT)

    with dashboard() as server:
        holder["server"] = server
        trainer = make_trainer(tmp_path, callbacks=[script_at(2, script, holder)], n=20)
        session = onthefly.attach_hf(trainer, **session_options(tmp_path, server))
        holder["session"] = lambda: session
        server.wait_connected(WAIT)
        trainer.train()
        report = holder["driver"].join()["report"]
        session.close()
    assert trainer.state.global_step == 2  # stopped right after the report: these are the scored weights
    ds, model = trainer.train_dataset, trainer.model.eval()
    expected = {}
    with torch.no_grad():
        for i in range(len(ds)):
            length = int(ds.lengths[i])  # the sequence without its padding
            logits = model(ds.ids[i, :length][None]).logits[0, :-1].double()
            targets = ds.labels[i, 1:length]
            expected[i] = float(F.cross_entropy(logits, targets, reduction="mean"))
    got = dict(zip(report["sample_indices"], report["losses"]))
    assert sorted(got) == list(range(20))
    assert all(abs(got[i] - expected[i]) < 1e-5 for i in got), [(got[i], expected[i]) for i in list(got)[:3]]
    assert report["meta"]["per_sample_method"] == "reduction_none"


def test_set_hparams_reach_every_param_group_the_scheduler_and_hf_args(tmp_path):
    holder: dict = {}

    def script(server, results):
        server.request("pause", timeout=WAIT)
        results["hp"] = server.request("set_hparams", {"lr": 0.003, "weight_decay": 0.02, "grad_clip_norm": 0.5},
                                       timeout=WAIT)
        results["bad"] = None
        try:
            server.request("set_hparams", {"momentum": 0.9}, timeout=WAIT)
        except onthefly.RequestError as exc:
            results["bad"] = exc.code
        server.request("resume", timeout=WAIT)

    seen = {}

    def look(state):
        seen["max_grad_norm"] = trainer.args.max_grad_norm
        seen["base_lrs"] = list(trainer.lr_scheduler.base_lrs)
        seen["groups"] = [(g["lr"], g["weight_decay"]) for g in trainer.optimizer.param_groups]

    with dashboard() as server:
        holder["server"] = server
        trainer = make_trainer(tmp_path, callbacks=[script_at(2, script, holder), AtStep(3, look)], weight_decay=0.1)
        session = onthefly.attach_hf(trainer, **session_options(tmp_path, server))
        holder["session"] = lambda: session
        server.wait_connected(WAIT)
        assert session.hparams_in_force()["grad_clip_norm"] == 1.0  # HF's max_grad_norm is the session's clipping
        trainer.train()
        results = holder["driver"].join()
        session.close()
    groups = results["hp"]["param_groups"]
    assert len(groups) == 2 and all(g["lr"] == 0.003 and g["weight_decay"] == 0.02 for g in groups)
    assert results["hp"]["grad_clip_norm"] == 0.5 and results["bad"] == "bad_payload"
    assert seen["max_grad_norm"] == 0.5 and seen["base_lrs"] == [0.003, 0.003]
    # HF's linear schedule continues from the new base rate: step 3's rate is 0.003 * (1 - 3/24).
    assert all(math.isclose(lr, 0.003 * (1 - 3 / 24)) and wd == 0.02 for lr, wd in seen["groups"])


def test_stop_is_hf_control_and_a_crash_reports_the_run(tmp_path):
    holder: dict = {}
    with dashboard() as server:
        holder["server"] = server
        trainer = make_trainer(tmp_path, callbacks=[script_at(2, lambda s, r: s.request("stop", timeout=WAIT),
                                                              holder)])
        session = onthefly.attach_hf(trainer, **session_options(tmp_path, server))
        holder["session"] = lambda: session
        server.wait_connected(WAIT)
        trainer.train()
        holder["driver"].join()
        finished = server.wait_for_event(lambda e: e.get("type") == "trainingFinished", WAIT)
        session.close()
    assert trainer.state.global_step == 2 and trainer.control.should_training_stop is True
    assert finished["status"] == "stopped" and finished["step"] == 2

    def crash(state):
        raise RuntimeError("boom")

    with dashboard() as server:
        trainer = make_trainer(tmp_path / "crash", callbacks=[AtStep(1, crash)])
        session = onthefly.attach_hf(trainer, **session_options(tmp_path / "crash", server))
        server.wait_connected(WAIT)
        with pytest.raises(RuntimeError, match="boom"):
            trainer.train()
        session.close()  # HF has no exception callback: closing reports the unfinished run
        finished = server.wait_for_event(lambda e: e.get("type") == "trainingFinished", WAIT)
    assert finished["status"] == "stopped" and finished["step"] == 0  # it crashed before step 1 was reported


def test_hf_callback_in_the_trainers_callbacks(tmp_path):
    callback = onthefly.HFCallback(run_name="cb", **session_options(tmp_path))
    trainer = make_trainer(tmp_path, callbacks=[callback], eval_n=8, eval_strategy="epoch")
    session = callback.session  # started when the Trainer was built
    assert session.trainer is trainer and session.cfg.run_name == "cb"
    try:
        trainer.train()
    finally:
        session.close()
    assert session.state.step == 24 and session.state.epoch == 2 and session.state.status == "completed"
    eval_losses = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    assert session.state.last_val_loss == pytest.approx(eval_losses[-1])
    with pytest.raises(RuntimeError, match="already has an onthefly HFCallback"):
        onthefly.attach_hf(trainer, **session_options(tmp_path / "again"))

    # Added after the Trainer was built: the session opens when training begins.
    late = onthefly.HFCallback(run_name="late", **session_options(tmp_path / "late"))
    other = make_trainer(tmp_path / "late")
    other.add_callback(late)
    with pytest.raises(RuntimeError, match="not bound"):
        late.session
    other.train()
    late.session.close()
    assert late.session.trainer is other and late.session.state.step == 24


def test_resume_from_an_onthefly_checkpoint_with_accumulation_is_bit_exact(tmp_path):
    # 12 batches per epoch, accumulation 2: step 9 is 6 batches into the second epoch.
    reference, session = train(tmp_path / "ref", gradient_accumulation_steps=2,
                               session_settings={"ckpt_every_steps": 9})
    ckpt = Path(session.storage.folder) / "runs" / "baseline" / "checkpoints" / "step-00000009.pt"
    saved = load_checkpoint(ckpt)
    assert saved["epoch"] == 1 and saved["batch_in_epoch"] == 6
    resumed, session = train(tmp_path / "resumed", gradient_accumulation_steps=2,
                             session_settings={"resume_from": str(ckpt)})
    assert_same_weights(weights(reference.model), weights(resumed.model))
    assert resumed.state.global_step == 12 and session.state.step == 12 and session.state.epoch == 2
    assert [e["step"] for e in resumed.state.log_history if "train_loss" in e] == [12]


def test_hf_checkpoint_folder_is_written_on_request_and_hf_resumes_from_it(tmp_path):
    holder: dict = {}

    def script(server, results):
        server.request("pause", timeout=WAIT)
        results["save"] = server.request("save_ckpt", timeout=WAIT)
        server.request("resume", timeout=WAIT)

    with dashboard() as server:
        holder["server"] = server
        trainer = make_trainer(tmp_path / "a", callbacks=[script_at(5, script, holder)])
        session = onthefly.attach_hf(trainer, native_checkpoints=True, **session_options(tmp_path / "a", server))
        holder["session"] = lambda: session
        server.wait_connected(WAIT)
        trainer.train()
        saved = holder["driver"].join()["save"]
        session.close()
    folder = Path(saved["native_path"])
    assert folder.is_dir() and folder.name == "step-00000005"
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
            "training_args.bin"} <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == 5
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folder left

    # HF's own resume from the folder: the session starts at the folder's position.
    seen = {}
    resumed = make_trainer(tmp_path / "b", callbacks=[AtStep(6, lambda state: seen.update(
        position=(session.state.step, session.state.epoch, session.state.batch_in_epoch)))])
    session = onthefly.attach_hf(resumed, **session_options(tmp_path / "b"))
    try:
        resumed.train(resume_from_checkpoint=str(folder))
    finally:
        session.close()
    assert seen["position"] == (5, 0, 5)  # before step 6 is counted: where the folder left off
    assert resumed.state.global_step == 24 and session.state.step == 24 and session.state.epoch == 2
    assert_same_weights(weights(trainer.model), weights(resumed.model))  # HF's resume is exact, attached too


def test_load_ckpt_takes_an_hf_checkpoint_folder_into_a_live_trainer(tmp_path):
    holder: dict = {}

    def script(server, results):
        server.request("pause", timeout=WAIT)
        results["save"] = server.request("save_ckpt", timeout=WAIT)
        server.request("stop", timeout=WAIT)

    with dashboard() as server:
        holder["server"] = server
        first = make_trainer(tmp_path / "a", callbacks=[script_at(4, script, holder)])
        session = onthefly.attach_hf(first, native_checkpoints=True, **session_options(tmp_path / "a", server))
        holder["session"] = lambda: session
        server.wait_connected(WAIT)
        first.train()
        folder = Path(holder["driver"].join()["save"]["native_path"])
        session.close()
    at_save = weights(first.model)
    loaded = {}

    def load(state):
        loaded["info"] = second_session.call("load_ckpt", {"path": str(folder)})  # a folder, as on the wire
        loaded["weights"] = weights(second.model)
        loaded["adam_steps"] = {int(s["step"]) for s in second.optimizer.optimizer.state.values()}
        loaded["global_step"] = state.global_step
        second_session.request_stop()

    second = make_trainer(tmp_path / "b", callbacks=[AtStep(1, load)])
    second_session = onthefly.attach_hf(second, **session_options(tmp_path / "b"))
    try:
        second.train()
    finally:
        second_session.close()
    assert_same_weights(at_save, loaded["weights"])
    assert loaded["info"]["step"] == 4 and loaded["global_step"] == 4 and loaded["adam_steps"] == {4}
    with pytest.raises(onthefly.CheckpointError, match="not a Hugging Face checkpoint folder"):
        second_session.framework.load_native_checkpoint(tmp_path, {})


def test_a_fork_shorter_than_an_accumulation_drops_its_last_micro_batches_with_a_warning(tmp_path):
    holder: dict = {}
    subset = list(range(12))  # 3 batches of 4: one accumulation of 2, and one batch left over

    def script(server, results):
        server.request("pause", timeout=WAIT)
        results["fork"] = server.request("fork", {"selection": {"kind": "indices", "ids": subset}}, timeout=WAIT)
        server.request("resume", timeout=WAIT)
        child = results["fork"]["new_run"]
        server.wait_for_event(lambda e: e.get("type") == "epoch_end" and e.get("run_id") == child
                              and e.get("epoch") == 1, WAIT)
        server.request("stop", timeout=WAIT)

    grads = {}
    with dashboard() as server:
        holder["server"] = server
        trainer = make_trainer(tmp_path, callbacks=[script_at(2, script, holder)], gradient_accumulation_steps=2,
                               num_train_epochs=10)

        class GradsAtEpochBegin(TrainerCallback):
            def on_epoch_begin(self, args, state, control, model=None, **kwargs):
                grads[state.global_step] = [p.grad for p in model.parameters() if p.grad is not None]

        trainer.add_callback(GradsAtEpochBegin())
        session = onthefly.attach_hf(trainer, **session_options(tmp_path, server))
        holder["session"] = lambda: session
        server.wait_connected(WAIT)
        trainer.train()
        child = holder["driver"].join()["fork"]["new_run"]
        history = events(server)
        session.close()
    ends = [e for e in history if e["type"] == "epoch_end" and e.get("run_id") == child]
    steps = [e["step"] for e in history if e["type"] == "trainStep" and e.get("run_id") == child
             and ends[0]["event_seq"] < e["event_seq"] < ends[1]["event_seq"]]
    assert len(steps) == 1  # one optimizer step per child epoch: 2 of its 3 batches
    warnings = [e for e in history if e["type"] == "log" and "micro-batch(es) into a gradient accumulation"
                in e["text"]]
    assert len(warnings) == 1
    assert all(not found for found in grads.values())  # no gradient carried into the next epoch
