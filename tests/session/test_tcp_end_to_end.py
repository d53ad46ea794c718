"""A real training steered through loopback TCP with onthefly.client (the dashboard listens)."""

from __future__ import annotations

import threading

import torch
from torch.utils.data import DataLoader

from onthefly import Trainer
from onthefly.checkpoints import load_checkpoint
from onthefly.client import DashboardServer, RequestError

from .helpers import CountingLoss, make_dataset, make_model


def test_drive_training_over_tcp(tmp_path):
    with DashboardServer(port=0) as dash:  # the context manager starts it
        trainer = Trainer(project="tcp", max_epochs=200, dashboard_port=dash.port, save_dir=str(tmp_path),
                          transport="tcp")
        dash.wait_connected(10)
        info = dash.request("server_info")  # answered before fit() starts
        assert info["version"] == "0.2.0" and "pause" in info["capabilities"]

        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        errors: list[BaseException] = []

        def fit() -> None:
            try:
                trainer.fit(model=model, optimizer=opt, loss_fn=CountingLoss(),
                            train_loader=DataLoader(make_dataset(256), batch_size=16, shuffle=True),
                            test_loader=DataLoader(make_dataset(64, seed=4), batch_size=16), seed=1)
            except BaseException as exc:  # surfaced by the assertion below
                errors.append(exc)

        thread = threading.Thread(target=fit, daemon=True)
        thread.start()
        dash.wait_for_event(lambda e: e.get("type") == "trainStep" and e["step"] >= 5, timeout=30)

        paused = dash.request("pause", {"reason": "inspect"})
        assert paused["status"] == "paused" and paused["ckpt"]
        status = dash.request("status")
        assert status["paused"] is True and status["step"] == paused["step"]

        hp = dash.request("set_hparams", {"lr": 0.005})
        assert hp["param_groups"][0]["lr"] == 0.005
        changed = dash.wait_for_event("hparams_changed", timeout=5)
        assert changed["changes"]["lr"] == 0.005

        mark = dash.delivered_count
        test = dash.request("test_now", {"label": "mid"}, timeout=60)
        assert test["status"] == "ok" and test["avg_loss"] > 0 and test["label"] == "mid"
        steps = [e for e in dash.history()[mark:] if e["type"] == "testStep"]
        assert [e["step"] for e in steps] == [1, 2, 3, 4]
        done = dash.wait_for_event("test_complete", since=mark, timeout=5)
        assert done["avg_loss"] == test["avg_loss"]

        saved = dash.request("save_ckpt", timeout=60)
        ckpt = load_checkpoint(saved["path"])
        assert ckpt["step"] == paused["step"]
        assert ckpt["optimizer"]["param_groups"][0]["lr"] == 0.005
        assert set(ckpt["model"]) == set(model.state_dict())

        try:
            dash.request("no_such_command")
        except RequestError as exc:
            assert exc.code == "unknown_command"
        else:
            raise AssertionError("an unknown command must fail")

        mark = dash.delivered_count
        dash.send("resume")  # fire-and-forget, as the VS Code extension sends it
        dash.wait_for_event("resumed", since=mark, timeout=10)
        later = dash.wait_for_event(lambda e: e.get("type") == "trainStep" and e["step"] > paused["step"],
                                    since=mark, timeout=30)
        assert later["lr"] == 0.005

        stopping = dash.request("stop")
        assert stopping["status"] == "stopping"
        finished = dash.wait_for_event("trainingFinished", timeout=30)
        assert finished["status"] == "stopped"
        thread.join(30)
        assert not thread.is_alive() and not errors
        seqs = [e["event_seq"] for e in dash.history()]
        assert seqs == list(range(1, len(seqs) + 1))
