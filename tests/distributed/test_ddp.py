"""Two-rank jobs under torchrun (gloo, CPU): one dashboard steers every rank, bit-exactly.

Each test launches `python -m torch.distributed.run --standalone --nproc_per_node 2` on
`tests/distributed/worker.py` (a plain DDP script with a `DistributedSampler`) and talks to rank 0
over loopback TCP, as a dashboard would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from onthefly.checkpoints import load_checkpoint
from onthefly.client import DashboardServer
from onthefly.data_explorer import compute_per_sample_losses

from .worker import N_SAMPLES, build_model, dataset

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")

ROOT = Path(__file__).resolve().parents[2]
WAIT = 120.0
RUNTIMES = ("trainer", "own_loop", "lightning")


def torchrun(runtime: str, out: Path, store: Path, *args: str) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("ONTHEFLY_DASHBOARD_PORT", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--max-restarts", "0", "-m", "tests.distributed.worker", runtime, str(out), str(store), *args]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: a failed test kills every rank


def finish(proc: subprocess.Popen, timeout: float = WAIT) -> str:
    output, _ = proc.communicate(timeout=timeout)
    return output


def stop(proc: subprocess.Popen) -> None:
    """Kill a job still running (a failed test) and show what its ranks printed."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate(timeout=30)
        print(output[-8000:])


def weights_of(out: Path) -> list[dict[str, torch.Tensor]]:
    return [torch.load(out / f"rank{r}.pt", weights_only=True)["weights"] for r in (0, 1)]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs by {(a[key] - b[key]).abs().max().item()}"


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    """The uninterrupted 2-rank run of each runtime (final weights, identical on both ranks)."""
    found = {}
    for runtime in RUNTIMES:
        base = tmp_path_factory.mktemp(f"reference-{runtime}")
        proc = torchrun(runtime, base / "out", base / "store")
        output = finish(proc)
        assert proc.returncode == 0, output
        rank0, rank1 = weights_of(base / "out")
        assert_same(rank0, rank1)
        found[runtime] = rank0
    return found


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_pause_report_checkpoint_resume_across_ranks(runtime, references, tmp_path):
    server = DashboardServer(port=0).start()
    proc = torchrun(runtime, tmp_path / "out", tmp_path / "store", "--port", str(server.port), "--delay", "0.02")
    try:
        server.wait_connected(WAIT)
        server.wait_for_event(lambda e: e.get("type") == "trainStep" and e.get("step", 0) >= 10, WAIT)
        paused = server.request("pause", {"reason": "ddp"}, timeout=WAIT)
        assert paused["status"] == "paused" and 10 <= paused["step"] < 63  # mid-epoch (63 steps per rank)
        status = server.request("status")
        assert status["step"] == paused["step"] and status["world_size"] == 2

        saved = server.request("save_ckpt", timeout=WAIT)
        document = load_checkpoint(saved["path"])
        assert document["step"] == paused["step"] and document["ranks"]["world"] == 2
        assert len(document["ranks"]["states"]) == 2 and all(s["rng"] for s in document["ranks"]["states"])

        report = server.request("generate_report", {"subset_on": "train"}, timeout=WAIT)
        assert report["meta"]["samples"] == N_SAMPLES and report["meta"]["ranks"] == 2
        assert report["sample_indices"] == list(range(N_SAMPLES))  # each sample exactly once, no padding
        model = build_model()
        model.load_state_dict({k.removeprefix("net."): v for k, v in document["model"].items()})  # Lightning: net.*
        with compute_per_sample_losses(model, dataset(), nn.CrossEntropyLoss(), batch_size=8, seed=1337) as single:
            losses, indices = single.to_numpy()
        assert indices.tolist() == list(range(N_SAMPLES))
        np.testing.assert_allclose(np.asarray(report["losses"]), losses, rtol=1e-6, atol=1e-7)

        health = server.request("dist_health", timeout=WAIT)
        assert health["world_size"] == 2 and len(health["ranks"]) == 2
        assert health["ranks"][1]["step"] == paused["step"] and health["step_skew"] == 0
        assert health["all_reduce_ms"] > 0 and health["ok"] is True

        server.request("resume")
        finished = server.wait_for_event("trainingFinished", WAIT)
        assert finished["status"] == "completed"
        output = finish(proc)
        assert proc.returncode == 0, output
        assert server.connection_count == 1  # rank 1 never opened a connection
    finally:
        stop(proc)
        server.close()
    rank0, rank1 = weights_of(tmp_path / "out")
    assert_same(rank0, references[runtime])  # the pause changed nothing, on either rank
    assert_same(rank1, references[runtime])

    # A fresh 2-rank job resumes from the mid-epoch checkpoint and ends bit-identically.
    resumed = torchrun(runtime, tmp_path / "resumed", tmp_path / "store2", "--resume", saved["path"])
    output = finish(resumed)
    assert resumed.returncode == 0, output
    for weights in weights_of(tmp_path / "resumed"):
        assert_same(weights, references[runtime])


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_fork_trains_on_both_ranks_then_merge(runtime, tmp_path):
    server = DashboardServer(port=0).start()
    proc = torchrun(runtime, tmp_path / "out", tmp_path / "store", "--port", str(server.port), "--delay", "0.02",
                    "--epochs", "3")
    try:
        server.wait_connected(WAIT)
        server.wait_for_event(lambda e: e.get("type") == "trainStep" and e.get("step", 0) >= 6, WAIT)
        server.request("pause", timeout=WAIT)
        chosen = list(range(0, N_SAMPLES, 5))  # 201 samples
        fork = server.request("fork", {"selection": {"kind": "indices", "ids": chosen},
                                       "hparams": {"max_steps": 10}}, timeout=WAIT)
        child = fork["new_run"]
        assert fork["subset_indices"] == chosen
        start = server.request("status")["step"]
        server.request("resume")
        reached = server.wait_for_event("fork_budget_reached", WAIT)
        assert reached["run_id"] == child and reached["trained_steps"] == 10
        server.wait_for_event(lambda e: e.get("type") == "paused" and e.get("request", {}).get("action")
                              == "fork_budget", WAIT)
        assert server.request("status")["step"] == start + 10
        merged = server.request("merge", {"parents": ["baseline", child], "strategy": "swa"}, timeout=WAIT)
        assert merged["parents"] == ["baseline", child] and Path(merged["ckpt"]).is_file()
        server.request("stop")
        finished = server.wait_for_event("trainingFinished", WAIT)
        assert finished["status"] == "stopped" and finished["run_id"] == merged["new_run"]
        output = finish(proc)
        assert proc.returncode == 0, output
        assert server.connection_count == 1
    finally:
        stop(proc)
        server.close()
    rank0, rank1 = weights_of(tmp_path / "out")
    assert_same(rank0, rank1)  # the merge ran once and reached both ranks
    assert_same(rank0, {k.removeprefix("net."): v for k, v in load_checkpoint(merged["ckpt"])["model"].items()})


def test_a_dead_rank_ends_the_job_with_a_clear_error(tmp_path):
    server = DashboardServer(port=0).start()
    proc = torchrun("trainer", tmp_path / "out", tmp_path / "store", "--port", str(server.port), "--die-at", "12")
    try:
        server.wait_connected(WAIT)
        started = time.monotonic()
        output = finish(proc, timeout=90)
        elapsed = time.monotonic() - started
    finally:
        stop(proc)
    assert proc.returncode != 0 and elapsed < 60, output
    finished = server.wait_for_event("trainingFinished", 10)
    server.close()
    assert finished["status"] == "failed" and finished["rank"] == 0 and finished["world_size"] == 2
    assert "rank" in finished["error"].lower() or "peer" in finished["error"].lower() \
        or "connection" in finished["error"].lower(), finished["error"]
