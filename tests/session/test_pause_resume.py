"""Pausing mid-epoch (and running commands while paused) leaves the final weights bit-identical."""

from __future__ import annotations

import threading

import pytest
import torch

from onthefly import Trainer

from .helpers import CountingLoss, MemoryDashboard, assert_same_weights, loaders, make_model, wait_until, weights

CASES = [("epoch_reseed", 0), ("fixed_order", 0), ("user", 0), ("epoch_reseed", 2), ("user", 2)]


def train(tmp_path, policy: str, workers: int, *, interrupt: bool) -> tuple[dict, MemoryDashboard]:
    trainer = Trainer(project="pr", max_epochs=2, transport="memory", save_dir=str(tmp_path),
                      serve_after_training=False)
    session = trainer.session
    dash = MemoryDashboard(session.channel)
    session.channel.connect()
    done = threading.Event()
    results: dict = {}

    def while_paused() -> None:
        results["paused"] = dash.reply("p1")
        results["status"] = dash.request("status")
        results["test"] = dash.request("test_now", {"label": "mid"})
        results["save"] = dash.request("save_ckpt")
        dash.send("resume", rid="r-resume")
        results["resumed"] = dash.reply("r-resume")
        done.set()

    def trigger() -> None:
        dash.send("pause", {"reason": "test"}, rid="p1")
        wait_until(lambda: session.gate.pending, what="pause queued")
        threading.Thread(target=while_paused, daemon=True).start()

    loss = CountingLoss(at_call=11, action=trigger if interrupt else None)
    train_loader, test_loader = loaders(policy, workers)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    trainer.fit(model=model, optimizer=opt, loss_fn=loss, train_loader=train_loader, test_loader=test_loader,
                seed=7, data_order_policy=policy)
    if interrupt:
        assert done.wait(10), "the pause/resume driver did not finish"
        assert results["paused"]["ok"] and results["paused"]["data"]["status"] == "paused"
        assert results["paused"]["data"]["step"] == 11
        assert results["status"]["paused"] is True and results["status"]["step"] == 11
        assert results["test"]["status"] == "ok" and results["test"]["avg_loss"] > 0
        assert results["resumed"]["ok"]
    return weights(model), dash


@pytest.mark.parametrize("policy,workers", CASES)
def test_pause_mid_epoch_is_bit_exact(tmp_path, policy, workers):
    reference, _ = train(tmp_path / "a", policy, workers, interrupt=False)
    paused, dash = train(tmp_path / "b", policy, workers, interrupt=True)
    assert_same_weights(reference, paused)
    types = [e["type"] for e in dash.events()]
    assert types.count("paused") == 1 and types.count("resumed") == 1
    assert "testStep" in types and "test_complete" in types
    finished = dash.events("trainingFinished")
    assert len(finished) == 1 and finished[0]["status"] == "completed"
    seqs = [e["event_seq"] for e in dash.events()]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
