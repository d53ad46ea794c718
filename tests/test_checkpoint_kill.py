"""A SIGKILL at any moment leaves every checkpoint complete or absent (DESIGN guarantee 4).

Each round forks a child that writes ~4 MB checkpoints back to back through CheckpointWriter and
CheckpointRing, kills it with SIGKILL after a seeded random delay, then checks the folder. The
children are forked (torch is already imported), so twenty rounds take a few seconds.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from onthefly.checkpoints import (
    CheckpointRing,
    CheckpointWriter,
    load_checkpoint,
)
from onthefly.rng import capture_rng_state
from onthefly.snapshot import snapshot_to_host

pytestmark = pytest.mark.skipif(
    sys.platform == "win32", reason="SIGKILL and fork do not exist on Windows"
)

ROUNDS = 20
KEEP = 3
SIDE = 1024  # a 1024x1024 float32 weight: 4 MiB per checkpoint


def write_until_killed(folder: str, ready) -> None:
    """Child process: write step after step; signal `ready` once the first write is under way."""
    # The parent's OpenMP pool does not survive fork; stay single-threaded like DataLoader workers.
    torch.set_num_threads(1)
    ring = CheckpointRing(folder, keep=KEEP)
    writer = CheckpointWriter()
    model = {"weight": torch.empty(SIDE, SIDE), "bias": torch.empty(SIDE)}
    step = 0
    while True:
        step += 1
        # Every tensor holds its step, so a file mixing two writes would be caught.
        model["weight"].fill_(float(step))
        model["bias"].fill_(float(-step))
        payload = snapshot_to_host({"model": model, "step": step, "rng": capture_rng_state()})
        future = writer.submit(ring.path_for(step), payload, meta={"step": step})
        future.add_done_callback(lambda done: ring.register(done.result()))
        if step == 1:
            ready.set()
        future.result()


def test_sigkill_never_leaves_a_partial_checkpoint(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    delays = random.Random(20240601)
    rounds_with_temp = 0
    rounds_with_complete = 0
    for index in range(ROUNDS):
        folder = tmp_path / f"round-{index:02d}"
        ready = context.Event()
        child = context.Process(target=write_until_killed, args=(str(folder), ready), daemon=True)
        child.start()
        try:
            assert ready.wait(timeout=60), f"round {index}: the writer never started"
            time.sleep(delays.uniform(0.0, 0.2))
            os.kill(child.pid, signal.SIGKILL)
            child.join(timeout=30)
        finally:
            if child.is_alive():
                child.kill()
                child.join(timeout=30)
        assert child.exitcode == -signal.SIGKILL, f"round {index}: exit code {child.exitcode}"

        ring = CheckpointRing(folder, keep=KEEP)
        on_disk = sorted(p.name for p in folder.iterdir())
        temps = [name for name in on_disk if ".tmp-" in name]
        finals = [name for name in on_disk if name.endswith(".pt")]
        assert sorted(on_disk) == sorted(temps + finals), f"round {index}: stray files {on_disk}"
        listed = ring.list()
        assert [info.path.name for info in listed] == finals  # temp files are not listed
        assert len(listed) <= KEEP + 1  # at most one written but not yet pruned
        for info in listed:
            document = load_checkpoint(info.path)
            assert document["step"] == info.step and document["meta"] == {"step": info.step}
            weight, bias = document["model"]["weight"], document["model"]["bias"]
            assert weight.shape == (SIDE, SIDE)
            assert bool((weight == info.step).all()) and bool((bias == -info.step).all())

        # The child is dead and reaped, so its temp files are stale and get cleaned.
        assert ring.clean_temp_files() == len(temps)
        assert not any(".tmp-" in p.name for p in folder.iterdir())
        rounds_with_temp += bool(temps)
        rounds_with_complete += bool(listed)

    # The kills really landed mid-write in some rounds and after completed writes in others.
    assert rounds_with_temp >= 1, "no kill landed inside a write; the test proved nothing"
    assert rounds_with_complete >= 1
