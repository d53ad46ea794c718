"""Edits are reproducible on every runtime: `onthefly replay` of a run that received five edits over
the wire (lr, weight decay, a layer reset, data weights, dropped samples) ends with bit-identical
weights, and a checkpoint taken after such edits continues bit-exactly in a fresh process.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from onthefly.cli.program import build_parser
from onthefly.client import DashboardServer

from .runtimes import WAIT, make_problem
from .test_bit_exact import assert_same, finish, fresh_process, runtime  # noqa: F401 (the fixture)

TRAIN = make_problem().train_indices


def module_named(server: DashboardServer, suffix: str) -> str:
    stack = [server.request("list_modules", timeout=WAIT)["tree"]]
    while stack:
        node = stack.pop()
        if node["path"] == suffix or node["path"].endswith("." + suffix):
            return node["path"]
        stack.extend(node.get("children", []))
    raise AssertionError(f"no module {suffix}")


def pause_at(server: DashboardServer, step: int) -> dict:
    server.wait_for_event(lambda e: e.get("type") == "trainStep" and e.get("step", -1) >= step, WAIT * 2)
    return server.request("pause", timeout=WAIT)


def pause_exactly_at(server: DashboardServer, step: int) -> None:
    """Schedule a pause at `step` (resuming a paused run), and wait until the run holds there."""
    assert server.request("pause", {"at_step": step}, timeout=WAIT)["status"] == "scheduled"
    if server.request("status", timeout=WAIT)["paused"]:
        server.request("resume", timeout=WAIT)
    held = server.wait_for_event(lambda e: e.get("type") == "paused" and e.get("step", -1) >= step, WAIT * 2)
    assert held["step"] == step, held


def five_edits(server: DashboardServer) -> list[str]:
    """lr, weight decay, a layer reset, data weights, dropped samples — at four pauses of a live run."""
    pause_at(server, 3)
    server.request("set_hparams", {"lr": 0.004}, timeout=WAIT)
    server.request("resume", timeout=WAIT)
    pause_at(server, 8)
    server.request("set_hparams", {"weight_decay": 0.01}, timeout=WAIT)
    server.request("layer_op", {"path": module_named(server, "head"), "op": "reset_parameters"}, timeout=WAIT)
    server.request("resume", timeout=WAIT)
    pause_at(server, 13)
    server.request("set_data_weights", {"indices": TRAIN[::3], "weight": 4.0}, timeout=WAIT)
    server.request("resume", timeout=WAIT)
    pause_at(server, 19)
    server.request("drop_samples", {"indices": TRAIN[1::5]}, timeout=WAIT)
    server.request("resume", timeout=WAIT)
    return ["set_hparams", "set_hparams", "layer_op", "set_data_weights", "drop_samples"]


def run_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    args = build_parser().parse_args(list(argv))
    return int(args.handler(args, io.StringIO(), out)), out.getvalue()


def test_replay_of_five_edits_is_bit_exact(runtime, tmp_path):
    with DashboardServer(port=0) as server:
        proc = fresh_process(runtime, tmp_path, "original", "--delay", "0.03", port=server.port, background=True)
        server.wait_connected(WAIT * 2)
        edits = five_edits(server)
        original = finish(proc, proc.out_path)
    folder = Path(original["folder"])
    manifest = json.loads((folder / "runs" / "baseline" / "run.json").read_text())
    recorded = [e for e in manifest["ledger"] if e["replay"] == "edit"]
    assert [e["cmd"] for e in recorded] == edits and all(e["ok"] and e["origin"] == "wire" for e in recorded)
    assert manifest["launch"]["argv"][1:3] == ["-m", "tests.conformance.fresh_process"]
    assert manifest["final"]["status"] == "completed" and len(manifest["final"]["weights_sha256"]) == 64

    code, printed = run_cli("replay", str(folder))
    assert code == 0, printed
    assert "bit-exact" in printed and "applied 5, failed 0, missed 0" in printed
    replayed = torch.load(tmp_path / "original.pt", weights_only=True)  # the script wrote its result again
    assert replayed["folder"] != original["folder"]
    assert_same(original["weights"], replayed["weights"])
    replay_manifest = json.loads((Path(replayed["folder"]) / "runs" / "baseline-replay" / "run.json").read_text())
    assert replay_manifest["parents"] == ["baseline"] and replay_manifest["kind"] == "replay"
    assert replay_manifest["final"]["weights_sha256"] == manifest["final"]["weights_sha256"]
    assert [(e["cmd"], e["step"], e["origin"]) for e in replay_manifest["ledger"]] == \
        [(e["cmd"], e["step"], "replay") for e in recorded]


def test_a_checkpoint_after_edits_resumes_bit_exactly(runtime, tmp_path):
    with DashboardServer(port=0) as server:
        proc = fresh_process(runtime, tmp_path, "reference", "--delay", "0.03", port=server.port, background=True)
        server.wait_connected(WAIT * 2)
        # Scheduled pauses: the steps are exact, so the checkpoint is mid-epoch on every runtime.
        pause_exactly_at(server, 4)
        server.request("drop_samples", {"indices": TRAIN[::4]}, timeout=WAIT)
        server.request("set_data_weights", {"indices": TRAIN[1::4], "weight": 3.0}, timeout=WAIT)
        server.request("layer_op", {"path": module_named(server, "body"), "op": "freeze"}, timeout=WAIT)
        server.request("layer_op", {"path": module_named(server, "drop"), "op": "set_dropout", "p": 0.4},
                       timeout=WAIT)
        server.request("set_hparams", {"grad_clip_norm": 0.5, "lr": 0.02}, timeout=WAIT)
        pause_exactly_at(server, 14)  # the second epoch, after the new plan took effect everywhere
        saved = server.request("save_ckpt", timeout=WAIT)
        server.request("resume", timeout=WAIT)
        reference = finish(proc, proc.out_path)
    document = torch.load(saved["path"], weights_only=True)
    assert document["layers"]["dropout"] and document["loop_settings"] == {"grad_clip_norm": 0.5}
    assert int(document["data"]["sampling"]["dropped"].sum()) == len(TRAIN[::4])
    resumed = fresh_process(runtime, tmp_path, "resumed", "--resume", saved["path"])
    assert_same(reference["weights"], resumed["weights"])


def test_a_checkpoint_while_a_data_edit_waits_for_the_next_epoch_resumes_bit_exactly(runtime, tmp_path):
    """Lightning and HF take a data edit at the next epoch: a checkpoint in between replays the
    epoch in progress as it was drawn, then switches to the new plan (native loops switch at once)."""
    with DashboardServer(port=0) as server:
        proc = fresh_process(runtime, tmp_path, "reference", "--delay", "0.03", port=server.port, background=True)
        server.wait_connected(WAIT * 2)
        pause_exactly_at(server, 4)
        edit = server.request("drop_samples", {"indices": TRAIN[::4]}, timeout=WAIT)
        server.request("set_data_weights", {"indices": TRAIN[1::4], "weight": 3.0}, timeout=WAIT)
        pause_exactly_at(server, 7)
        saved = server.request("save_ckpt", timeout=WAIT)
        server.request("resume", timeout=WAIT)
        reference = finish(proc, proc.out_path)
    document = torch.load(saved["path"], weights_only=True)
    if edit["takes_effect"] == "next_epoch":
        assert document["data"]["sampling"] is None  # epoch 0 still draws as it began
        assert int(document["data"]["next_epoch"]["sampling"]["dropped"].sum()) == len(TRAIN[::4])
    else:
        assert "next_epoch" not in document["data"]
    resumed = fresh_process(runtime, tmp_path, "resumed", "--resume", saved["path"])
    assert_same(reference["weights"], resumed["weights"])
