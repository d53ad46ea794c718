"""The message sequences the OnTheFly VS Code extension really sends, on every runtime.

What the extension's host code does (see shared/reference-protocol.md §1.7 and §3.1): on connect
`server_info`, then `clean_disk {scope: all}` at the first `session_started` and
`set_counter_seeds`; Pause = `pause` + `save_ckpt`; a report then a fork on a region of it with
the webview's hparams (`lr`, `batch_size`, `patience`) and the latest checkpoint, followed by a
fire-and-forget `{"cmd": "resume"}`; `switch_run` to the anchor run before a merge; Export Subset
to a file its save dialog picked; Export Session to a fresh temp folder; and a wipe of its own
state on every new connection. The paths are the extension's defaults (no `allowed_paths`).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest

from onthefly.client import RequestError

from .conftest import live_run
from .runtimes import BATCH, N_TRAIN, WAIT, make_problem


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A home folder of the test's own (the extension's save dialog defaults to ~/Downloads)."""
    folder = tmp_path / "home"
    (folder / "Downloads").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(folder))
    return folder


def latest_checkpoint(dash, run_id: str) -> dict:
    saved = dash.events("checkpoint_saved", run_id=run_id)
    assert saved, f"no checkpoint_saved event for {run_id}"
    return saved[-1]


def test_connect_pause_report_fork_and_resume_like_the_extension(runtime, tmp_path, home):
    with live_run(runtime, tmp_path, allowed_paths=()) as (dash, run):
        info = dash.request("server_info")
        assert tuple(int(x) for x in info["version"].split(".")[:3]) >= (0, 1, 4)
        dash.wait("session_started")
        cleaned = dash.request("clean_disk", {"scope": "all"})
        assert cleaned["ok"] is True
        seeds = dash.request("set_counter_seeds", {"fork_counter_init": 0, "merge_counter_init": 0})
        assert seeds["ok"] is True
        dash.server.send("resume")  # fire-and-forget, as sendCtl does
        dash.wait("resumed")
        dash.wait_steps("baseline", 5)

        # Pause button: pause, then save_ckpt (the same checkpoint, never a null path).
        paused = dash.request("pause", {"reason": "manual"})
        saved = dash.request("save_ckpt")
        assert saved["path"] and paused["ckpt"] == saved["path"] and saved["step"] == paused["step"]
        assert Path(saved["path"]).is_file()

        # Generate Report (subset_on train, reqId) then Fork on a region of it, with the webview's hparams.
        report = dash.request("generate_report", {"owner_run_id": "baseline", "subset_on": "train", "reqId": 1})
        losses = report["losses"]
        lo = sorted(losses)[len(losses) // 2]
        shown = sorted(i for i, v in zip(report["sample_indices"], losses) if v >= lo)
        fork = dash.request("fork", {"parent_run_id": "baseline", "owner_run_id": "baseline",
                                     "parent_ckpt_path": latest_checkpoint(dash, "baseline")["path"],
                                     "region": {"minLoss": lo, "maxLoss": max(losses)},
                                     "hparams": {"lr": 0.003, "batch_size": 8, "patience": 3}})
        child = fork["new_run"]
        assert fork["subset_indices"] == shown  # exactly the samples the user saw in the region
        assert dash.wait("newRun", run_id=child)["meta"]["kind"] == "fork"
        dash.server.send("resume")
        first = dash.wait("epoch_end", run_id=child)
        second = dash.server.wait_for_event(lambda e: e.get("type") == "epoch_end" and e.get("run_id") == child
                                            and e.get("epoch") == first["epoch"] + 1, WAIT)
        steps = [e for e in dash.events("trainStep", run_id=child)
                 if first["event_seq"] < e["event_seq"] < second["event_seq"]]
        assert len(steps) == math.ceil(len(shown) / 8)  # the child's own batch size

        # Merge: switch_run to the anchor run with its latest checkpoint, pause, merge, resume.
        dash.request("pause")
        anchor = latest_checkpoint(dash, "baseline")
        switched = dash.request("switch_run", {"run_id": "baseline", "init_ckpt": anchor["path"],
                                               "init_step": anchor["step"], "fork_counter_init": 1})
        assert switched["run_id"] == "baseline" and switched["step"] == anchor["step"]
        dash.request("pause")
        merged = dash.request("merge", {"parents": ["baseline", child], "strategy": "swa"})
        assert dash.wait("newRun", run_id=merged["new_run"])["parents"] == ["baseline", child]
        dash.server.send("resume")
        dash.wait_steps(merged["new_run"], dash.request("status")["step"] + 2)


def test_the_paths_the_extension_picks_work_by_default_and_others_are_refused(runtime, tmp_path, home):
    with live_run(runtime, tmp_path, allowed_paths=()) as (dash, run):
        dash.request("resume")
        dash.wait_steps("baseline", 3)
        dash.request("pause")
        dash.request("generate_report", {"subset_on": "train"})
        # Export Subset to the save dialog's folder (~/Downloads), no indices: the training split.
        target = home / "Downloads" / "baseline-subset.csv"
        exported = dash.request("export_subset", {"run_id": "baseline", "format": "csv", "out_path": str(target)})
        assert exported["rows"] == N_TRAIN and target.is_file()
        rows = sorted(int(line.split(",")[0]) for line in target.read_text().splitlines()[1:])
        assert rows == make_problem().train_indices
        # Export Session to a fresh temp folder, then switch to a checkpoint inside the bundle in ~/Downloads.
        bundle = dash.request("prepare_export", {"dir": tempfile.mkdtemp(prefix="onthefly-export-"),
                                                 "latest_only": True, "owners": ["baseline"]})
        assert Path(bundle["bundle"]).is_dir()
        loaded = Path(bundle["bundle"])
        downloads_copy = home / "Downloads" / "session-bundle"
        import shutil

        shutil.copytree(loaded, downloads_copy)
        checkpoint = next(downloads_copy.rglob("step-*.pt"))
        switched = dash.request("switch_run", {"run_id": "baseline", "init_ckpt": str(checkpoint)})
        assert switched["ckpt_loaded"] is True
        # What an attacker would want stays refused.
        existing = home / "Downloads" / "notes.csv"
        existing.write_text("mine")
        for path in (home / ".bashrc", home / ".ssh" / "keys.csv", Path("/etc/onthefly.csv"), existing,
                     home / "Downloads" / "report.sh"):
            with pytest.raises(RequestError) as refused:
                dash.request("export_subset", {"format": "csv", "out_path": str(path)})
            assert refused.value.code == "bad_payload", (path, refused.value)
        assert existing.read_text() == "mine" and not (home / ".bashrc").exists()


def test_a_reconnect_after_a_wipe_rebuilds_the_run_list(runtime, tmp_path):
    with live_run(runtime, tmp_path) as (dash, run):
        fork = dash.request("fork", {"selection": {"kind": "indices", "ids": make_problem().train_indices[:2 * BATCH]}})
        seen = len(dash.server.history())
        assert dash.server.drop_connection()
        dash.server.wait_connected(WAIT)
        announced = dash.server.wait_for_event(
            lambda e: e.get("announced") and e.get("type") == "newRun" and e.get("run_id") == fork["new_run"],
            WAIT, since=seen)
        after = dash.server.history()[seen:]
        kinds = [(e["type"], e.get("run_id")) for e in after if e.get("announced")]
        assert kinds[0][0] == "session_started"
        assert ("newRun", "baseline") in kinds and announced["parents"] == ["baseline"]
        assert dash.request("status")["run_id"] == fork["new_run"]
