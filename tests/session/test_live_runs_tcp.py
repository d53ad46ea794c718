"""Reports, subset export, fork, merge and run switching through onthefly.client on a live training."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from onthefly import Trainer
from onthefly.client import DashboardServer, RequestError

from .helpers import make_dataset, make_model


def test_reports_forks_merges_and_switches_on_a_live_training(tmp_path):
    with DashboardServer(port=0) as dash:
        trainer = Trainer(project="live", max_epochs=10_000, dashboard_port=dash.port, save_dir=str(tmp_path),
                          transport="tcp", allowed_paths=(str(tmp_path),))
        dash.wait_connected(10)
        model = make_model()
        data = make_dataset(192)
        fit = threading.Thread(target=trainer.fit, kwargs=dict(
            model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
            loss_fn=torch.nn.CrossEntropyLoss(), train_loader=DataLoader(data, batch_size=16, shuffle=True),
            seed=0, model_factory=make_model), daemon=True)
        fit.start()
        dash.wait_for_event(lambda e: e.get("type") == "trainStep" and e["step"] >= 20, timeout=60)

        # --- issue: data explorer through the wire -------------------------------------------
        paused = dash.request("pause")
        report = dash.request("generate_report", {"subset_on": "train", "reqId": 1}, timeout=120)
        losses, indices = np.array(report["losses"]), np.array(report["sample_indices"])
        assert sorted(indices.tolist()) == list(range(192)) and report["meta"]["at_step"] == paused["step"]
        lo, hi = np.quantile(losses, [0.75, 1.0])
        region = dash.request("get_selected_region_indices", {"run_id": "baseline", "min_loss": lo, "max_loss": hi})
        expected = sorted(indices[(losses >= lo) & (losses <= hi)].tolist())
        assert sorted(region["indices"]) == expected
        out = tmp_path / "hard.parquet"
        exported = dash.request("export_subset", {"run_id": "baseline", "format": "parquet", "out_path": str(out),
                                                  "subset_indices": region["indices"]}, timeout=60)
        table = pd.read_parquet(out)
        assert exported["rows"] == len(table) == len(expected)
        assert sorted(table["sample_id"].tolist()) == expected
        assert table.set_index("sample_id")["label"].to_dict() == {i: int(data.tensors[1][i]) for i in expected}
        proposals = dash.request("propose_subsets", {"k": 3}, timeout=120)
        assert sum(c["size"] for c in proposals["clusters"]) == 192
        means = [c["mean_loss"] for c in proposals["clusters"]]
        assert means == sorted(means, reverse=True)

        # --- issue: run management through the wire ----------------------------------------------
        mark = dash.delivered_count
        fork1 = dash.request("fork", {"region": {"minLoss": lo, "maxLoss": hi}, "hparams": {"lr": 1e-3}}, timeout=120)
        assert fork1["new_run"] == "fork1" and sorted(fork1["subset_indices"]) == expected
        fork2 = dash.request("fork", {"parent_run_id": "baseline",
                                      "selection": {"kind": "kmeans", "k": 3, "feature": "loss|embed"}}, timeout=120)
        assert fork2["new_run"] == "fork2" and fork2["subset_count"] > 0
        seq = [e["type"] for e in dash.history()[mark:] if e["type"] in ("runTransition", "finalizeRun", "newRun")]
        assert seq == ["runTransition", "finalizeRun", "newRun"] * 2
        new_runs = [e for e in dash.history()[mark:] if e["type"] == "newRun"]
        assert [(e["run_id"], e["parents"], e["meta"]["kind"]) for e in new_runs] == [
            ("fork1", ["baseline"], "fork"), ("fork2", ["baseline"], "fork")]

        dash.send("resume")  # train fork2 on its subset for a while
        dash.wait_for_event(lambda e: e.get("type") == "trainStep" and e.get("run_id") == "fork2", since=mark,
                            timeout=60)
        dash.request("pause")
        mark = dash.delivered_count
        merged = dash.request("merge", {"parents": ["fork1", "fork2"], "strategy": "swa"}, timeout=120)
        assert merged["new_run"] == "merge1"
        new_run = dash.wait_for_event("newRun", since=mark, timeout=10)
        assert new_run["parents"] == ["fork1", "fork2"] and new_run["meta"]["kind"] == "merge"

        switched = dash.request("switch_run", {"run_id": "fork1"}, timeout=60)
        assert switched["run_id"] == "fork1" and switched["ckpt_loaded"] and switched["paused"]
        status = dash.request("status")
        assert status["run_id"] == "fork1" and status["active_subset_size"] == len(expected)
        attached = dash.request("attach_context", {"runId": "merge1", "fork_counter_init": 7})
        assert attached["run_id"] == "merge1" and attached["fork_counter_seed"] == 7
        fork8 = dash.request("fork", {"selection": {"kind": "indices", "ids": [0, 1, 2, 3]}}, timeout=60)
        assert fork8["new_run"] == "fork8"  # counters seeded by attach_context are used
        try:
            dash.request("switch_run", {"run_id": "fork1", "init_ckpt": str(tmp_path / "missing.pt")})
        except RequestError as exc:
            assert exc.code == "not_found" and "missing.pt" in exc.message
        else:
            raise AssertionError("a missing init_ckpt must be an error")
        runs = {r["run_id"]: r for r in dash.request("list_runs")["runs"]}
        assert {"baseline", "fork1", "fork2", "merge1", "fork8"} <= set(runs)
        assert runs["fork8"]["parents"] == ["merge1"]

        dash.request("stop")
        assert dash.wait_for_event("trainingFinished", timeout=30)["status"] == "stopped"
        fit.join(30)
        assert not fit.is_alive()
        seqs = [e["event_seq"] for e in dash.history()]
        assert seqs == list(range(1, len(seqs) + 1))
