"""reset_session, enforce_version, clean_disk, load_ckpt, set_hparams errors: real effects, checked."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from onthefly import Trainer
from onthefly.checkpoints import load_checkpoint

from .helpers import MemoryDashboard, make_dataset, make_model, wait_until, weights


def serving_session(tmp_path, **kw):
    """A trained session that keeps serving its in-memory dashboard (fit runs in a thread)."""
    trainer = Trainer(project="cmds", max_epochs=1, transport="memory", save_dir=str(tmp_path),
                      serve_after_training=True, **kw)
    session = trainer.session
    session.channel.connect()
    dash = MemoryDashboard(session.channel)
    model = make_model()
    initial = weights(model)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            trainer.fit(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        loss_fn=torch.nn.CrossEntropyLoss(),
                        train_loader=DataLoader(make_dataset(128), batch_size=16, shuffle=True), seed=0)
        except BaseException as exc:  # checked by the tests
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_until(lambda: dash.events("trainingFinished"), 30, "training")
    return session, dash, model, initial, thread, errors


def test_reset_session_restores_the_starting_state(tmp_path):
    session, dash, model, initial, thread, _ = serving_session(tmp_path)
    assert any(not torch.equal(initial[k], v) for k, v in weights(model).items())
    reply = dash.request("reset_session", {"reason": "again"})
    assert reply["ok"] and reply["run_id"] == "baseline-2" and reply["session_id"] == session.session_id
    for k, v in weights(model).items():
        assert torch.equal(initial[k], v), k
    status = dash.request("status")
    assert status["step"] == 0 and status["epoch"] == 0 and status["paused"] and status["run_id"] == "baseline-2"
    assert dash.events("session_reset")[-1]["run_id"] == "baseline-2"
    dash.request("stop")
    thread.join(20)


def test_load_ckpt_restores_weights_and_step(tmp_path):
    session, dash, model, _, thread, _ = serving_session(tmp_path)
    saved = dash.request("save_ckpt")
    snapshot = weights(model)
    dash.request("reset_session")
    loaded = dash.request("load_ckpt", {"path": saved["path"]})
    assert loaded["step"] == saved["step"] == 8
    for k, v in weights(model).items():
        assert torch.equal(snapshot[k], v), k
    assert dash.events("checkpoint_loaded")[-1]["path"] == saved["path"]
    bad = dash.reply(dash.send("load_ckpt", {"path": str(Path(saved["path"]).with_name("nope.pt"))}))
    assert bad["code"] == "not_found"
    corrupt = Path(saved["path"]).with_name("corrupt.pt")
    corrupt.write_bytes(b"not a checkpoint")
    bad = dash.reply(dash.send("load_ckpt", {"path": str(corrupt)}))
    assert bad["code"] == "bad_payload" and "corrupt.pt" in bad["error"]
    dash.request("stop")
    thread.join(20)


def test_clean_disk_removes_only_our_earlier_sessions(tmp_path):
    old = tmp_path / "cmds" / "sess-old"
    old.mkdir(parents=True)
    (old / "session.json").write_text(json.dumps({"session_id": "sess-old"}))
    (old / "events.db").write_bytes(b"x")
    stranger = tmp_path / "cmds" / "not-ours"
    stranger.mkdir()
    (stranger / "keep.txt").write_text("user data")
    user_file = tmp_path / "cmds" / "train.py"
    user_file.write_text("print('hi')")
    session, dash, *_rest, thread, _ = serving_session(tmp_path)
    saved = dash.request("save_ckpt")
    reply = dash.request("clean_disk", {"scope": "all"})
    assert reply["ok"] and reply["removed"] == ["sess-old/"]
    assert not old.exists() and (stranger / "keep.txt").exists() and user_file.exists()
    assert session.storage.folder.exists() and Path(saved["path"]).is_file()
    dash.request("stop")
    thread.join(20)


def test_enforce_version_stops_training_and_fit_raises(tmp_path):
    trainer = Trainer(project="cmds", max_epochs=10_000, transport="memory", save_dir=str(tmp_path))
    session = trainer.session
    session.channel.connect()
    dash = MemoryDashboard(session.channel)
    rid = dash.send("enforce_version", {"message": "onthefly >= 9.0 required", "required": "9.0"})
    model = make_model()
    with pytest.raises(RuntimeError, match="onthefly >= 9.0 required"):
        trainer.fit(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                    loss_fn=torch.nn.CrossEntropyLoss(), train_loader=DataLoader(make_dataset(64), batch_size=16))
    assert dash.reply(rid)["data"] == {"status": "fatal", "message": "onthefly >= 9.0 required"}
    assert dash.events("trainingFinished")[-1]["status"] == "stopped"


def test_set_hparams_validates_against_the_optimizer(tmp_path):
    session, dash, *_rest, thread, _ = serving_session(tmp_path)
    bad = dash.reply(dash.send("set_hparams", {"betas": [0.9, 0.99]}))
    assert bad["code"] == "bad_payload" and "betas" in bad["error"] and "SGD" in bad["error"]
    bad = dash.reply(dash.send("set_hparams", {"lr": "fast"}))
    assert bad["code"] == "bad_payload" and "lr" in bad["error"]
    bad = dash.reply(dash.send("set_hparams", {"lr": 0.2, "param_group": 3}))
    assert bad["code"] == "bad_payload" and "param_group" in bad["error"]
    ok = dash.request("set_hparams", {"lr": 0.05, "momentum": 0.9, "grad_clip_norm": 1.0})
    assert ok["param_groups"][0]["lr"] == 0.05 and ok["param_groups"][0]["momentum"] == 0.9
    assert ok["grad_clip_norm"] == 1.0 and session.cfg.grad_clip_norm == 1.0
    saved = dash.request("save_ckpt")
    assert load_checkpoint(saved["path"])["optimizer"]["param_groups"][0]["lr"] == 0.05
    dash.request("stop")
    thread.join(20)
