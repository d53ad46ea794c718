"""Every command, the same payloads and the same assertions, on every runtime, over the real wire.

Each test drives a live run (paused before its first step by the `live` fixture) of every runtime
in `runtimes.RUNTIMES`: the native Trainer, an own loop (`attach` with `session.epochs()` /
`session.batches()`), Lightning and the Hugging Face Trainer.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import numpy as np
import torch

from onthefly import verify_bundle
from onthefly.checkpoints import load_checkpoint

from .conftest import live_run
from .runtimes import BATCH, N_TRAIN, WAIT, make_problem, weights

HEALTH = ("dist_health", "activations_health", "numerics_health", "determinism_health", "throughput_health")
MERGE_STRATEGIES = ("swa", "fisher", "adapter", "task_arithmetic", "ties", "distill")


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"weights differ at {key}"


def test_control_checkpoints_and_probes(live, runtime, tmp_path):
    dash, run = live
    info = dash.request("server_info")
    assert info["runtime"] == runtime and re.fullmatch(r"\d+\.\d+\.\d+.*", info["version"])
    assert tuple(int(x) for x in info["version"].split(".")[:2]) >= (0, 2)
    assert "fork" in info["capabilities"] and info["capabilities"] == sorted(info["capabilities"])

    status = dash.request("status")
    assert status["paused"] is True and status["running"] is True and status["runtime"] == runtime
    step0 = status["step"]
    assert dash.events("paused") and dash.events("paused")[-1]["step"] == step0
    time.sleep(0.3)
    assert dash.request("status")["step"] == step0  # paused means no step is taken

    # set_hparams: applied to every group, announced; bad values refused and nothing half-applied
    hp = dash.request("set_hparams", {"lr": 0.005})
    assert [g["lr"] for g in hp["param_groups"]] == [0.005]
    assert run.session.optimizer.param_groups[0]["lr"] == 0.005
    assert dash.wait("hparams_changed")["changes"] == {"lr": 0.005}
    for payload in ({"betas": [1.0, 0.999]}, {"weight_decay": 1e308}, {"lr": -1.0}, {"momentum": 0.9},
                    {"lr": 0.1, "betas": [0.9, 2.0]}):
        err = dash.error("set_hparams", payload)
        assert err.code == "bad_payload", (payload, err)
    assert run.session.optimizer.param_groups[0]["lr"] == 0.005
    assert run.session.optimizer.param_groups[0]["betas"] == (0.9, 0.999)

    # tests, inside the pause and as a pause window of its own
    tested = dash.request("test_now", {"label": "mid"})
    assert tested["status"] == "ok" and math.isfinite(tested["avg_loss"]) and Path(tested["ckpt_path"]).is_file()
    again = dash.request("test", {"label": "again"})
    assert again["label"] == "again" and math.isfinite(again["avg_loss"])
    assert dash.wait("test_complete", label="again")["avg_loss"] == again["avg_loss"]

    # save, list, train on, load back
    saved = dash.request("save_ckpt")
    assert Path(saved["path"]).is_file() and saved["step"] == step0
    listed = dash.request("list_checkpoints")
    assert saved["path"] in [c["path"] for c in listed["checkpoints"]]
    saved_weights = load_checkpoint(saved["path"])["model"]
    dash.request("resume")
    dash.wait("resumed")
    dash.wait_steps("baseline", step0 + 5)
    paused = dash.request("pause")
    assert paused["step"] >= step0 + 5 and Path(paused["ckpt"]).is_file()
    loaded = dash.request("load_ckpt", {"path": saved["path"]})
    assert loaded["step"] == step0 and dash.request("status")["step"] == step0
    assert_same(weights(run.model), saved_weights)
    assert dash.wait("checkpoint_loaded")["path"] == saved["path"]

    # the event log, counters, context
    page = dash.request("events_since", {"event_seq": 0, "limit": 20})
    seqs = [e["event_seq"] for e in page["events"]]
    assert len(seqs) == 20 and seqs == sorted(seqs) and page["more"] is True
    assert page["events"][0]["type"] == "session_started"
    assert dash.request("set_counter_seeds", {"fork_counter_init": 4})["fork_counter_seed"] == 4
    context = dash.request("attach_context", {})
    assert context["run_id"] == "baseline" and context["ok"] is True

    for cmd in HEALTH:
        reply = dash.request(cmd)
        assert reply["text"].startswith("Run: baseline"), (cmd, reply["text"][:80])
    cleaned = dash.request("clean_disk", {"scope": "checkpoints"})
    assert cleaned["ok"] is True and cleaned["scope"] == "checkpoints"

    dash.request("resume")
    dash.wait_steps("baseline", step0 + 3)
    assert dash.request("stop")["status"] == "stopping"
    assert dash.wait("trainingFinished")["status"] == "stopped"


def test_reports_forks_and_merges(live, runtime, tmp_path):
    dash, run = live
    train_indices = make_problem().train_indices
    report = dash.request("generate_report", {"subset_on": "train", "reqId": 7})
    assert report["reqId"] == 7 and report["owner_run_id"] == "baseline"
    indices = np.array(report["sample_indices"])
    losses = np.array(report["losses"], dtype=float)
    # the report covers exactly the training split, named by true dataset indices
    assert sorted(indices.tolist()) == train_indices and len(losses) == N_TRAIN and np.isfinite(losses).all()
    lo, hi = float(np.quantile(losses, 0.6)), float(losses.max())
    expected = sorted(int(i) for i, v in zip(indices, losses) if lo <= v <= hi)

    region = dash.request("get_selected_region_indices", {"min_loss": lo, "max_loss": hi})
    assert region["indices"] == expected and region["count"] == len(expected)
    everything = dash.request("export_subset", {"format": "csv", "out_path": str(tmp_path / "all.csv")})
    assert everything["rows"] == N_TRAIN and everything["export_all"] is True
    exported = dash.request("export_subset", {"format": "csv", "region": {"minLoss": lo, "maxLoss": hi},
                                              "out_path": str(tmp_path / "region.csv")})
    assert exported["rows"] == len(expected)
    rows = Path(exported["out_path"]).read_text().splitlines()
    assert sorted(int(r.split(",")[0]) for r in rows[1:]) == expected
    proposals = dash.request("propose_subsets", {"k": 3})
    assert len(proposals["clusters"]) == 3 and sum(c["size"] for c in proposals["clusters"]) == N_TRAIN

    # fork on the region the user saw: exactly those samples
    fork = dash.request("fork", {"region": {"minLoss": lo, "maxLoss": hi}, "hparams": {"lr": 0.002}})
    child = fork["new_run"]
    assert fork["subset_indices"] == expected and fork["parent"] == "baseline"
    announced = dash.wait("newRun", run_id=child)
    assert announced["parents"] == ["baseline"] and announced["meta"]["kind"] == "fork"
    status = dash.request("status")
    assert status["run_id"] == child and status["active_subset_size"] == len(expected)
    assert run.session.optimizer.param_groups[0]["lr"] == 0.002
    dash.request("resume")
    # The child trains on its subset: a whole epoch of it is ceil(subset / batch) steps (Lightning
    # switches loaders at an epoch end, so look at the child's second epoch).
    first = dash.wait("epoch_end", run_id=child)
    second = dash.server.wait_for_event(lambda e: e.get("type") == "epoch_end" and e.get("run_id") == child
                                        and e.get("epoch") == first["epoch"] + 1, WAIT)
    steps = [e["step"] for e in dash.events("trainStep", run_id=child)
             if first["event_seq"] < e["event_seq"] < second["event_seq"]]
    assert len(steps) == math.ceil(len(expected) / BATCH), steps
    dash.request("pause")

    merged = []
    for strategy in MERGE_STRATEGIES:
        reply = dash.request("merge", {"parents": ["baseline", child], "strategy": strategy,
                                       "fisher_batches": 2, "distill_steps": 3}, timeout=60)
        assert reply["strategy"] == strategy and Path(reply["ckpt"]).is_file()
        event = dash.wait("newRun", run_id=reply["new_run"])
        assert event["meta"]["kind"] == "merge" and event["parents"] == ["baseline", child]
        merged.append(reply["new_run"])
    runs = dash.request("list_runs")
    assert {"baseline", child, *merged} <= {r["run_id"] for r in runs["runs"]}
    assert runs["current"] == merged[-1]
    assert dash.request("status")["active_subset_size"] is None  # a merge trains on the whole training set
    dash.request("resume")
    dash.wait_steps(merged[-1], dash.request("status")["step"] + 2)
    dash.request("pause")

    switched = dash.request("switch_run", {"run_id": "baseline"})
    assert switched["run_id"] == "baseline" and switched["ckpt_loaded"] is True
    status = dash.request("status")
    assert status["run_id"] == "baseline" and status["active_subset_size"] is None
    dash.request("resume")
    dash.wait_steps("baseline", status["step"] + 2)


def test_reset_bundles_and_version_veto(live, runtime, tmp_path):
    dash, run = live
    start = run.initial
    dash.request("resume")
    dash.wait_steps("baseline", 4)
    dash.request("pause")
    assert any(not torch.equal(start[k], v) for k, v in weights(run.model).items())
    reset = dash.request("reset_session", {"reason": "again"})
    assert reset["run_id"] == "baseline-2" and reset["ok"] is True
    assert_same(weights(run.model), start)
    status = dash.request("status")
    assert status["step"] == 0 and status["run_id"] == "baseline-2" and status["paused"] is True

    bundle = dash.request("prepare_export", {"dir": str(tmp_path / "exports")})
    info = verify_bundle(bundle["bundle"])
    assert {"baseline", "baseline-2"} <= set(info.runs)
    spilled = dash.request("spill_all", {"dir": str(tmp_path / "spill")})
    assert spilled and all(Path(s["path"]).is_file() for s in spilled)

    vetoed = dash.request("enforce_version", {"message": "onthefly too old for this dashboard"})
    assert vetoed["status"] == "fatal"
    finished = dash.wait("trainingFinished")
    assert finished["status"] == "stopped"
    if runtime == "trainer":
        run.join(WAIT, expect_error=RuntimeError)
        assert "too old" in str(run.error)


def test_training_dynamics_reports_and_forks(runtime, tmp_path):
    with live_run(runtime, tmp_path, dynamics_every_epochs=1) as (dash, run):
        dash.request("resume")
        dash.wait("dynamics_recorded")
        second = dash.server.wait_for_event(lambda e: e.get("type") == "dynamics_recorded" and e.get("record") == 1,
                                            WAIT)
        assert second["samples"] == N_TRAIN
        dash.request("pause")
        report = dash.request("generate_report", {"subset_on": "train", "metric": "mislabel",
                                                  "suggest_cutoff": True})
        assert report["meta"]["metric"] == "mislabel" and report["meta"]["records"] >= 2
        assert sorted(report["sample_indices"]) == make_problem().train_indices
        assert set(report["cutoff"]["flagged"]) <= set(report["sample_indices"])
        fork = dash.request("fork", {"selection": {"kind": "quantile", "from": 0.9, "to": 1.0, "metric": "variability"}})
        assert 10 <= fork["subset_count"] <= 20 and set(fork["subset_indices"]) <= set(report["sample_indices"])
        dash.request("resume")
        dash.wait_steps(fork["new_run"], dash.request("status")["step"] + 2)


BAD_PAYLOADS = [
    ("pause", {"reason": 5}, "bad_payload"),
    ("fork", {"selection": {"kind": "nope"}}, "bad_payload"),
    ("fork", {"selection": {"kind": "indices", "ids": [100_000]}}, "bad_payload"),
    ("fork", {}, "bad_payload"),
    ("fork", {"selection": {"kind": "indices", "ids": [1]}, "hparams": {"lr": -1}}, "bad_payload"),
    ("merge", {"parents": ["baseline"]}, "bad_payload"),
    ("merge", {"parents": ["baseline", "nope"]}, "not_found"),
    ("merge", {"parents": ["baseline", "x"], "strategy": "magic"}, "bad_payload"),
    ("load_ckpt", {"path": "no-such-checkpoint.pt"}, "not_found"),
    ("switch_run", {"run_id": "nope"}, "not_found"),
    ("switch_run", {}, "bad_payload"),
    ("generate_report", {"subset_on": "test"}, "bad_payload"),
    ("export_subset", {"format": "xlsx"}, "bad_payload"),
    ("clean_disk", {"scope": "everything"}, "bad_payload"),
    ("set_hparams", {"lr": "fast"}, "bad_payload"),
    ("events_since", {"event_seq": -1}, "bad_payload"),
    ("activations_health", {"topk": 0}, "bad_payload"),
    ("list_checkpoints", {"run_id": "nope"}, "not_found"),
    ("set_hparams", {"no_such_key": 1.0}, "bad_payload"),
    ("set_hparams", {"accumulate_grad_batches": 0}, "bad_payload"),
    ("layer_op", {"path": "no.such.module", "op": "freeze"}, "not_found"),
    ("layer_op", {"path": "", "op": "set_dropout", "p": -0.1}, "bad_payload"),
    ("list_modules", {"path": "no.such.module"}, "not_found"),
    ("set_data_weights", {"weights": [1.0, 2.0]}, "bad_payload"),
    ("set_data_weights", {"indices": [0], "weight": -2.0}, "bad_payload"),
    ("drop_samples", {"indices": [100_000]}, "bad_payload"),
    ("drop_samples", {}, "bad_payload"),
    ("restore_samples", {"indices": [-1]}, "bad_payload"),
    ("rollback", {"step": 123_456}, "not_found"),
    ("autopilot", {"action": "explode"}, "bad_payload"),
    ("no_such_command", {}, "unknown_command"),
]


def test_bad_payloads_get_the_same_codes_and_training_continues(live, runtime, tmp_path):
    dash, run = live
    validation_index = int(make_problem().val.indices[0])
    cases = BAD_PAYLOADS + [("fork", {"selection": {"kind": "indices", "ids": [validation_index]}}, "bad_payload")]
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("hello")
    cases.append(("load_ckpt", {"path": str(not_a_checkpoint)}, "bad_payload"))
    before = dash.request("status")
    for cmd, payload, code in cases:
        err = dash.error(cmd, payload)
        assert err.code == code, (cmd, payload, err.code, str(err))
    status = dash.request("status")
    assert status["run_id"] == "baseline" and status["step"] == before["step"]
    assert [r["run_id"] for r in dash.request("list_runs")["runs"]] == ["baseline"]  # no failed fork left behind
    assert run.session.sampling_plan is None and dash.request("data_sampling")["dropped"] == []
    dash.request("resume")
    dash.wait_steps("baseline", before["step"] + 3)
