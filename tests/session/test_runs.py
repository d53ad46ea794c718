"""Reports, region lookups, subset export, fork and merge driven over the wire (in-memory channel)."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from onthefly import Trainer
from onthefly.checkpoints import load_checkpoint

from .helpers import MemoryDashboard, make_model, wait_until


class RecordingDataset(Dataset):
    """A labelled dataset that records which indices were read (num_workers=0)."""

    def __init__(self, n: int = 240, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.reads: list[int] = []

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        self.reads.append(int(i))
        return self.x[i], self.y[i]


def sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def start(tmp_path, dataset):
    trainer = Trainer(project="runs", max_epochs=1, transport="memory", save_dir=str(tmp_path),
                      allowed_paths=(str(tmp_path),), serve_after_training=True)
    session = trainer.session
    session.channel.connect()
    dash = MemoryDashboard(session.channel)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loader = DataLoader(dataset, batch_size=16, shuffle=True)
    thread = threading.Thread(
        target=trainer.fit,
        kwargs=dict(model=model, optimizer=opt, loss_fn=torch.nn.CrossEntropyLoss(), train_loader=loader,
                    val_loader=DataLoader(dataset, batch_size=64), seed=0,
                    model_factory=make_model),
        daemon=True,
    )
    thread.start()
    wait_until(lambda: dash.events("trainingFinished"), 30, "first training to finish")
    return trainer, session, dash, thread


def test_report_region_export_fork_and_merge(tmp_path):
    dataset = RecordingDataset()
    trainer, session, dash, thread = start(tmp_path, dataset)

    report = dash.request("generate_report", {"subset_on": "train", "reqId": 7})
    assert report["reqId"] == 7 and report["owner_run_id"] == "baseline"
    losses = np.array(report["losses"])
    indices = np.array(report["sample_indices"])
    assert sorted(indices.tolist()) == list(range(240))
    # The losses are the real per-sample cross-entropy of the live model.
    with torch.no_grad():
        session.model.eval()
        expected = torch.nn.functional.cross_entropy(session.model(dataset.x), dataset.y, reduction="none")
        session.model.train()
    assert np.allclose(losses, expected.numpy()[indices], atol=1e-6)

    lo, hi = float(np.quantile(losses, 0.5)), float(losses.max())
    region = dash.request("get_selected_region_indices", {"run_id": "baseline", "min_loss": lo, "max_loss": hi})
    assert sorted(region["indices"]) == sorted(indices[(losses >= lo) & (losses <= hi)].tolist())

    out = tmp_path / "subset.parquet"
    exported = dash.request("export_subset", {"run_id": "baseline", "format": "parquet", "out_path": str(out),
                                              "subset_indices": region["indices"]})
    table = pd.read_parquet(out)
    assert exported["rows"] == len(region["indices"]) == len(table)
    assert sorted(table["sample_id"].tolist()) == sorted(region["indices"])
    assert table.set_index("sample_id").loc[region["indices"][0], "label"] == int(dataset.y[region["indices"][0]])

    parent_ckpts = dash.request("list_checkpoints", {"run_id": "baseline"})["checkpoints"]
    parent_opt = {k: v.clone() for k, v in session.optimizer.state_dict()["state"][0].items()}
    fork = dash.request("fork", {"selection": {"kind": "quantile", "from": 0.9, "to": 1.0},
                                 "hparams": {"lr": 0.001}})
    assert fork["new_run"] == "fork1"
    chosen = fork["subset_indices"]
    cutoff = np.quantile(losses, 0.9)
    assert sorted(chosen) == sorted(indices[losses >= cutoff].tolist())
    # The parent's checkpoint files are untouched and hold the parent's optimizer state.
    parent_after = dash.request("list_checkpoints", {"run_id": "baseline"})["checkpoints"]
    saved = [c for c in parent_after if c["path"] == fork["init_from"]][0]
    ckpt = load_checkpoint(saved["path"])
    for k, v in parent_opt.items():
        assert torch.equal(ckpt["optimizer"]["state"][0][k], v)
    for before in parent_ckpts:
        assert sha(before["path"]) == sha(before["path"])  # still readable, same bytes
        assert Path(before["path"]).is_file()
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == 0.01
    assert session.optimizer.param_groups[0]["lr"] == 0.001  # the child's own lr

    # The child's loader yields exactly the selected indices.
    dataset.reads.clear()
    for _ in session.train_loader:
        pass
    assert sorted(dataset.reads) == sorted(chosen)

    # Train the child: a resume after the fork starts training the new run.
    finished_before = len(dash.events("trainingFinished"))
    dash.send("resume", rid="go")
    wait_until(lambda: len(dash.events("trainingFinished")) > finished_before, 30, "child training")
    assert dash.events("trainingFinished")[-1]["run_id"] == "fork1"

    merged = dash.request("merge", {"parents": ["baseline", "fork1"], "strategy": "swa"})
    assert merged["new_run"] == "merge1" and merged["parents"] == ["baseline", "fork1"]
    a = load_checkpoint(merged["paths"][0])["model"]
    b = load_checkpoint(merged["paths"][1])["model"]
    for k, v in session.model.state_dict().items():
        assert torch.allclose(v, (a[k] + b[k]) / 2, atol=1e-7)
    runs = {r["run_id"]: r for r in dash.request("list_runs")["runs"]}
    assert runs["merge1"]["parents"] == ["baseline", "fork1"] and runs["fork1"]["parents"] == ["baseline"]
    assert runs["merge1"]["kind"] == "merge" and runs["fork1"]["kind"] == "fork"

    types = [e["type"] for e in dash.events() if e["type"] in ("runTransition", "finalizeRun", "newRun")]
    assert types == ["newRun", "runTransition", "finalizeRun", "newRun", "runTransition", "finalizeRun", "newRun"]
    kinds = [e["meta"]["kind"] for e in dash.events("newRun")]
    assert kinds == ["root", "fork", "merge"]

    dash.request("stop")
    thread.join(30)
    assert not thread.is_alive()


def test_bad_fork_and_merge_payloads(tmp_path):
    trainer, session, dash, thread = start(tmp_path, RecordingDataset(64))
    bad = dash.reply(dash.send("fork", {"selection": {"kind": "indices", "ids": [1, 999]}}))
    assert not bad["ok"] and bad["code"] == "bad_payload" and "999" in bad["error"]
    bad = dash.reply(dash.send("fork", {"selection": {"kind": "bogus"}}))
    assert not bad["ok"] and bad["code"] == "bad_payload"
    bad = dash.reply(dash.send("merge", {"parents": ["baseline", "nope"]}))
    assert not bad["ok"] and bad["code"] == "not_found" and "nope" in bad["error"]
    bad = dash.reply(dash.send("merge", {"parents": ["a", "b"], "strategy": "magic"}))
    assert not bad["ok"] and bad["code"] == "bad_payload" and "swa" in bad["error"]
    bad = dash.reply(dash.send("switch_run", {"run_id": "ghost"}))
    assert not bad["ok"] and bad["code"] == "not_found"
    bad = dash.reply(dash.send("load_ckpt", {"path": "/etc/passwd"}))
    assert not bad["ok"] and bad["code"] == "bad_payload" and "/etc/passwd" in bad["error"]  # not a checkpoint
    bad = dash.reply(dash.send("get_selected_region_indices", {"min_loss": 0, "max_loss": 1}))
    assert not bad["ok"] and bad["code"] == "not_found"
    ok = dash.request("fork", {"selection": {"kind": "indices", "ids": [3, 1, 2]}, "run_name": "mine"})
    assert ok["new_run"] == "mine" and ok["subset_indices"] == [1, 2, 3]
    dup = dash.reply(dash.send("fork", {"selection": {"kind": "indices", "ids": [1]}, "run_name": "mine"}))
    assert not dup["ok"] and "exists" in dup["error"]
    dash.request("stop")
    thread.join(30)
