"""`onthefly replay` end to end: edited ledgers as new runs, bundles, a stopped run, an autopilot run,
and every refusal (runs that were switched, tampered bundles, bad edit files, bad plans)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from onthefly import Trainer, export_session
from onthefly.cli.program import build_parser
from onthefly.cli.replay import ReplaySourceError, build_plan, read_edits, read_source
from onthefly.client import DashboardServer
from onthefly.mixins.replay import REPLAY_ENV, ReplayError

from conformance.runtimes import WAIT, make_problem
from conformance.test_bit_exact import assert_same, finish, fresh_process
from conformance.test_replay import pause_at

REPO = Path(__file__).resolve().parents[2]
TRAIN = make_problem().train_indices


def run_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    args = build_parser().parse_args(list(argv))
    return int(args.handler(args, io.StringIO(), out)), out.getvalue()


def manifest_of(folder: str | Path, run: str) -> dict:
    return json.loads((Path(folder) / "runs" / run / "run.json").read_text())


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> dict:
    """A Trainer run (fresh process) with two edits over the wire, stopped by the dashboard at step ~20."""
    tmp = tmp_path_factory.mktemp("stopped")
    with DashboardServer(port=0) as server:
        proc = fresh_process("trainer", tmp, "original", "--delay", "0.03", port=server.port, background=True)
        server.wait_connected(WAIT * 2)
        pause_at(server, 4)
        server.request("set_hparams", {"lr": 0.02}, timeout=WAIT)
        server.request("drop_samples", {"indices": TRAIN[::7]}, timeout=WAIT)
        server.request("resume", timeout=WAIT)
        pause_at(server, 18)
        server.request("stop", timeout=WAIT)
        result = finish(proc, proc.out_path)
    result["tmp"] = tmp
    return result


def test_a_stopped_run_replays_to_the_same_step_bit_exactly(stopped_run):
    original = manifest_of(stopped_run["folder"], "baseline")
    assert original["final"]["status"] == "stopped" and 18 <= original["final"]["step"] < 30
    code, printed = run_cli("replay", stopped_run["folder"])
    assert code == 0 and "bit-exact" in printed, printed
    replayed = torch.load(stopped_run["tmp"] / "original.pt", weights_only=True)
    assert_same(stopped_run["weights"], replayed["weights"])
    again = manifest_of(replayed["folder"], "baseline-replay")
    assert again["final"]["step"] == original["final"]["step"] and again["final"]["status"] == "stopped"


def test_an_edited_ledger_runs_as_a_new_run_in_the_same_lineage(stopped_run, tmp_path):
    ledger = manifest_of(stopped_run["folder"], "baseline")["ledger"]
    edits = [e for e in ledger if e["replay"] == "edit"]
    assert [e["cmd"] for e in edits] == ["set_hparams", "drop_samples"]
    same = tmp_path / "same.json"
    same.write_text(json.dumps({"ledger": ledger}))  # the recorded ledger, unchanged, through --edit
    code, printed = run_cli("replay", stopped_run["folder"], "--edit", str(same), "--run-name", "same-edits")
    assert code == 0 and "edited" in printed, printed
    unchanged = torch.load(stopped_run["tmp"] / "original.pt", weights_only=True)
    assert_same(stopped_run["weights"], unchanged["weights"])

    changed = [dict(e) for e in edits]
    changed[0]["payload"] = {**changed[0]["payload"], "lr": 0.001}  # "what if the lr had been lower?"
    changed[1]["step"] = 10  # ... and the samples dropped later
    changed[1].pop("epoch"), changed[1].pop("batch_in_epoch")
    what_if = tmp_path / "what_if.json"
    what_if.write_text(json.dumps(changed))
    code, printed = run_cli("replay", stopped_run["folder"], "--edit", str(what_if))
    assert code == 0 and "applied 2, failed 0, missed 0" in printed, printed
    edited = torch.load(stopped_run["tmp"] / "original.pt", weights_only=True)
    assert any(not torch.equal(edited["weights"][k], v) for k, v in stopped_run["weights"].items())
    manifest = manifest_of(edited["folder"], "baseline-edit")
    assert manifest["parents"] == ["baseline"] and manifest["meta"]["edited"] is True
    assert manifest["meta"]["replay_of"]["run_id"] == "baseline"
    assert [(e["cmd"], e["step"]) for e in manifest["ledger"]] == [("set_hparams", edits[0]["step"]),
                                                                    ("drop_samples", 10)]
    assert manifest["ledger"][0]["payload"]["lr"] == 0.001
    source = manifest_of(edited["folder"], "baseline")  # the source run is on record in the new session
    assert source["imported_from"] == str(Path(stopped_run["folder"]).resolve())


def test_a_bundle_archive_replays_bit_exactly_and_a_tampered_one_is_refused(stopped_run, tmp_path):
    archive = export_session(stopped_run["folder"], tmp_path / "bundle.tar.gz")
    code, printed = run_cli("replay", str(archive))
    assert code == 0 and "bit-exact" in printed, printed
    assert_same(stopped_run["weights"], torch.load(stopped_run["tmp"] / "original.pt", weights_only=True)["weights"])

    folder = export_session(stopped_run["folder"], tmp_path / "bundle")
    code, printed = run_cli("replay", str(folder), "--dry-run")
    assert code == 0 and '"run_name": "baseline-replay"' in printed and '"stop_at"' in printed
    manifest = folder / "runs" / "baseline" / "run.json"
    manifest.write_text(manifest.read_text().replace('"lr": 0.02', '"lr": 0.5'))
    with pytest.raises(ReplaySourceError, match="checksum"):
        read_source(folder)
    code, _ = run_cli("replay", str(folder))
    assert code == 2


def test_runs_that_were_switched_or_have_no_launch_record_are_refused(tmp_path):
    (tmp_path / "runs" / "baseline").mkdir(parents=True)
    (tmp_path / "session.json").write_text(json.dumps({"session_id": "sess-1", "project": "p"}))
    entries = [{"seq": 1, "cmd": "set_hparams", "replay": "edit", "ok": True, "step": 3, "payload": {"lr": 0.1}},
               {"seq": 2, "cmd": "fork", "replay": "moves", "ok": True, "step": 5, "payload": {}},
               {"seq": 3, "cmd": "load_ckpt", "replay": "moves", "ok": False, "step": 6, "payload": {}}]
    manifest = {"run_id": "baseline", "kind": "root", "launch": {"argv": ["python", "x.py"], "cwd": str(tmp_path)},
                "ledger": entries, "final": {"status": "completed", "step": 9, "weights_sha256": "0" * 64}}
    (tmp_path / "runs" / "baseline" / "run.json").write_text(json.dumps(manifest))
    source = read_source(tmp_path)
    with pytest.raises(ReplaySourceError, match=r"switched or rewound by fork \(entry 2, step 5\)"):
        build_plan(source, "baseline")
    plan = build_plan(source, "baseline", edits=[entries[0]])  # an edited ledger without the fork is fine
    assert plan["entries"] == [{"seq": 1, "cmd": "set_hparams", "payload": {"lr": 0.1}, "step": 3}]
    assert plan["expected"] is None and plan["stop_at"] is None and plan["run_name"] == "baseline-edit"
    del manifest["launch"]
    (tmp_path / "runs" / "baseline" / "run.json").write_text(json.dumps(manifest))
    code, _ = run_cli("replay", str(tmp_path))
    assert code == 2
    assert run_cli("replay", str(tmp_path / "nowhere"))[0] == 2
    bad = tmp_path / "bad.json"
    for text, words in (("[1, 2]", "needs `cmd`"), ('[{"cmd": "set_hparams"}]', "needs `step`"),
                        ("{}", "expected a list"), ("not json", "cannot read")):
        bad.write_text(text)
        with pytest.raises(ReplaySourceError, match=words):
            read_edits(bad)


def test_a_bad_plan_fails_the_script_with_the_entry_named(tmp_path, monkeypatch):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": "onthefly.replay", "run_name": "baseline-replay", "entries": [
        {"seq": 4, "cmd": "set_hparams", "payload": {"lr": -1.0}, "step": 3}]}))
    monkeypatch.setenv(REPLAY_ENV, str(plan))
    trainer = Trainer(project="p", transport="off", save_dir=str(tmp_path))
    assert trainer.session.cfg.run_name == "baseline-replay"
    model = torch.nn.Linear(8, 3)
    problem = make_problem()
    with pytest.raises(ReplayError, match=r"entry 4 \(set_hparams at step 3\): payload.lr: must be >= 0"):
        trainer.fit(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(),
                    problem.train_loader, progress=False)
    plan.write_text(json.dumps({"format": "onthefly.replay", "run_name": "x", "entries": [
        {"cmd": "fork", "payload": {}, "step": 3}]}))
    trainer = Trainer(project="p", transport="off", save_dir=str(tmp_path))
    with pytest.raises(ReplayError, match="not an edit a replay can apply"):
        trainer.fit(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(),
                    problem.train_loader, progress=False)
    plan.write_text("{}")
    with pytest.raises(ReplayError, match="not an onthefly replay plan"):
        Trainer(project="p", transport="off", save_dir=str(tmp_path))


AUTOPILOT_SCRIPT = '''
import sys, time, torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, default_collate
import onthefly

class Poison:
    calls = 0
    def __call__(self, items):
        self.calls += 1
        x, y = default_collate(items)
        return (x * 1000, (y + 1) % 3) if self.calls == 20 else (x, y)

class Slow(nn.Module):
    def forward(self, o, t):
        time.sleep(0.01)
        return nn.functional.cross_entropy(o, t)

x = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
y = (x @ torch.randn(8, 3, generator=torch.Generator().manual_seed(9))).argmax(1)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1),
                    collate_fn=Poison())
trainer = onthefly.Trainer(project="ap", max_epochs=3, transport="off", save_dir=sys.argv[1], ckpt_every_steps=5,
                           autopilot=True)
session = trainer.fit(model, torch.optim.Adam(model.parameters(), lr=0.01), Slow(), loader, seed=0, progress=False)
torch.save({"weights": model.state_dict(), "folder": str(session.storage.folder)}, sys.argv[2])
'''


def test_an_autopilot_run_replays_its_recorded_rollback_bit_exactly(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(AUTOPILOT_SCRIPT)
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    out = tmp_path / "result.pt"
    subprocess.run([sys.executable, str(script), str(tmp_path / "store"), str(out)], cwd=tmp_path, env=env,
                   check=True, timeout=300)
    original = torch.load(out, weights_only=True)
    ledger = manifest_of(original["folder"], "baseline")["ledger"]
    assert [(e["cmd"], e["origin"]) for e in ledger] == [("rollback", "autopilot"), ("set_hparams", "autopilot")]
    code, printed = run_cli("replay", original["folder"])
    assert code == 0 and "bit-exact" in printed and "applied 2" in printed, printed
    replayed = torch.load(out, weights_only=True)
    assert replayed["folder"] != original["folder"]
    assert_same(original["weights"], replayed["weights"])
    replay_ledger = manifest_of(replayed["folder"], "baseline-replay")["ledger"]
    assert [(e["cmd"], e["origin"], e.get("rule")) for e in replay_ledger] == [("rollback", "replay", None),
                                                                               ("set_hparams", "replay", None)]


def test_a_replay_refuses_edits_from_outside_its_plan(tmp_path, monkeypatch):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": "onthefly.replay", "run_name": "r", "entries": []}))
    monkeypatch.setenv(REPLAY_ENV, str(plan))
    trainer = Trainer(project="p", transport="off", save_dir=str(tmp_path), max_epochs=1)
    session = trainer.session
    model = torch.nn.Linear(8, 3)
    problem = make_problem()
    session.bind(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                 loss_fn=torch.nn.CrossEntropyLoss(), train_loader=problem.train_loader)
    from onthefly.control.errors import ProtocolError

    with pytest.raises(ProtocolError, match="is a replay"):
        session.call("set_hparams", {"lr": 0.5})
    assert session.call("save_ckpt")["step"] == 0  # neutral commands are fine
    assert session.optimizer.param_groups[0]["lr"] == 0.1
    session.close()
