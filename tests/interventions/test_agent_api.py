"""The agent API: describe_commands as tool specs, argument checks before sending, and the example agent
(examples/agent_loop.py) steering a run whose replay is bit-exact."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from onthefly.cli.program import build_parser
from onthefly.client import ToolArgumentError, check_arguments, tool_specs
from onthefly.session.native import OnTheFlySession

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
    with OnTheFlySession(transport="off", save_dir=str(tmp_path_factory.mktemp("tools"))) as session:
        described = session.call("describe_commands")
        names = set(session.router.names())
    assert set(described["commands"]) == names
    return {tool["name"]: tool for tool in tool_specs(described)}


def test_every_command_is_a_tool_with_a_json_schema(tools):
    layer = tools["layer_op"]
    assert layer["mutating"] is True and "changes the run" in layer["description"]
    assert layer["input_schema"]["required"] == ["path", "op"]
    assert layer["input_schema"]["properties"]["path"]["x-aliases"] == ["module"]
    assert tools["status"]["mutating"] is False and "read-only" in tools["status"]["description"]
    weights = tools["set_data_weights"]["input_schema"]["properties"]["weights"]
    assert weights["anyOf"][0]["items"]["minimum"] == 0  # negative weights are refused by the schema
    read_only = tool_specs({"commands": {n: {"mutating": t["mutating"], "payload": t["input_schema"],
                                             "description": ""} for n, t in tools.items()}}, include_mutating=False)
    assert {t["name"] for t in read_only} >= {"status", "list_modules", "data_sampling", "describe_commands"}
    assert not any(t["mutating"] for t in read_only)


def test_arguments_are_checked_before_they_are_sent(tools):
    check_arguments(tools["layer_op"], {"module": "head", "op": "freeze"})  # an alias is fine
    check_arguments(tools["set_hparams"], {"nesterov": True, "lr": 0.1})  # any param-group key
    check_arguments(tools["pause"], {"_trace": "x"})
    for tool, arguments, words in (("layer_op", {"op": "freeze"}, "payload.path: required"),
                                   ("layer_op", {"path": "a", "op": "melt"}, "one of"),
                                   ("drop_samples", {"indices": "all"}, "does not fit array"),
                                   ("rollback", {"stepp": 3}, "not a field of this command"),
                                   ("set_hparams", {"lr": "fast"}, "payload.lr")):
        with pytest.raises(ToolArgumentError, match=words):
            check_arguments(tools[tool], arguments)


def test_the_example_agent_steers_a_run_and_its_replay_is_bit_exact(tmp_path):
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    env.pop("ONTHEFLY_REPLAY", None)
    done = subprocess.run([sys.executable, "examples/agent_loop.py", "--save-dir", str(tmp_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "agent: drop_samples" in done.stdout and "mislabelled" in done.stdout
    folder = next(line.split()[-1] for line in done.stdout.splitlines() if line.startswith("replay it:"))
    manifest = json.loads((Path(folder) / "runs" / "baseline" / "run.json").read_text())
    wire = [e for e in manifest["ledger"] if e["origin"] == "wire"]
    assert all(e["ok"] for e in wire)
    # The agent holds the run at each epoch's start (pause at_epoch / resume) and edits in between.
    edits = [e for e in wire if e["cmd"] not in ("pause", "resume")]
    assert [e["cmd"] for e in edits][:2] == ["generate_report", "drop_samples"]
    assert {"pause", "resume"} <= {e["cmd"] for e in wire}
    dropped = edits[1]["payload"]["indices"]
    precision = float(done.stdout.split("mislabelled (")[1].split("%")[0]) / 100
    assert len(dropped) == 48 and precision >= 0.7  # most of the highest-loss samples are the flipped ones

    out = io.StringIO()
    args = build_parser().parse_args(["replay", folder])
    code = args.handler(args, io.StringIO(), out)
    assert code == 0 and "bit-exact" in out.getvalue(), out.getvalue()
    replays = [p for p in (tmp_path / "agent").iterdir() if p.is_dir() and str(p) != folder]
    assert len(replays) == 1
    replay = json.loads((replays[0] / "runs" / "baseline-replay" / "run.json").read_text())
    assert replay["final"]["weights_sha256"] == manifest["final"]["weights_sha256"]
    assert torch.cuda.is_available() or replay["launch"]["torch"] == torch.__version__
