"""A pause reply names its checkpoint only once the file is on disk; a failed write says why."""

from __future__ import annotations

import builtins
import os
import threading

import pytest
import torch
from torch.utils.data import DataLoader

from onthefly import Trainer, fileio

from .helpers import CountingLoss, MemoryDashboard, make_dataset, make_model, wait_until


def start(tmp_path, loss: CountingLoss):
    trainer = Trainer(project="pause", transport="memory", save_dir=str(tmp_path), max_epochs=100_000)  # stopped by the test
    trainer.session.channel.connect()
    dash = MemoryDashboard(trainer.session.channel)
    model = make_model()
    thread = threading.Thread(target=trainer.fit, kwargs=dict(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), loss_fn=loss,
        train_loader=DataLoader(make_dataset(64), batch_size=16), progress=False), daemon=True)
    thread.start()
    return trainer, dash, thread


def test_the_pause_reply_names_a_checkpoint_that_exists(tmp_path):
    trainer, dash, thread = start(tmp_path, CountingLoss())
    reply = dash.request("pause")
    assert reply["ckpt"] is not None and os.path.getsize(reply["ckpt"]) > 0
    dash.request("stop")
    thread.join(20)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) to fill a disk")
def test_a_pause_whose_checkpoint_cannot_be_written_says_so(tmp_path, monkeypatch):
    real_open = builtins.open
    full = threading.Event()

    def open_full(path, mode="r", *args, **kwargs):
        if full.is_set() and "x" in mode and str(path).endswith(".pt") is False and "step-" in str(path):
            return real_open("/dev/full", "wb")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(fileio, "open", open_full, raising=False)
    trainer, dash, thread = start(tmp_path, CountingLoss())
    wait_until(lambda: dash.events("trainStep"), 20, "training")
    full.set()
    reply = dash.request("pause")
    assert reply["status"] == "paused" and reply["ckpt"] is None
    assert "no space left on device" in reply["ckpt_error"]
    full.clear()
    assert dash.request("save_ckpt")["path"]  # the disk has room again: saving works
    dash.request("stop")
    thread.join(20)
