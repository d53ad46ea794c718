"""Bit-exactness on every runtime: a pause mid-epoch changes nothing, and a checkpoint saved
mid-epoch continues, in a fresh process, to exactly the weights of the uninterrupted run
(loaded over the wire with `load_ckpt`, with `resume_from`, or from an exported session bundle).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from onthefly import export_session
from onthefly.client import DashboardServer

from .runtimes import RUNTIMES, WAIT, weights

EPOCHS = 3
CKPT_EVERY = 13  # 10 steps per epoch: step 13 is in the middle of the second epoch
REPO = Path(__file__).resolve().parents[2]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"weights differ at {key}: max |diff| {(a[key] - b[key]).abs().max()}"


def fresh_process(runtime: str, tmp_path: Path, name: str, *args: str, port: int | None = None,
                  background: bool = False) -> subprocess.Popen | dict:
    out = tmp_path / f"{name}.pt"
    cmd = [sys.executable, "-m", "tests.conformance.fresh_process", runtime, str(out), str(tmp_path / name),
           "--epochs", str(EPOCHS), *args]
    if port is not None:
        cmd += ["--port", str(port)]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if background:
        proc.out_path = out  # type: ignore[attr-defined]
        return proc
    return finish(proc, out)


def finish(proc: subprocess.Popen, out: Path) -> dict:
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-4000:]
    return torch.load(out, weights_only=True)


@pytest.fixture(params=sorted(RUNTIMES))
def runtime(request: pytest.FixtureRequest) -> str:
    return request.param


def test_pause_mid_epoch_with_commands_is_bit_exact(runtime, tmp_path):
    torch.set_num_threads(1)
    plain = RUNTIMES[runtime](0, tmp_path / "plain", epochs=EPOCHS, transport="off").start()
    plain.join(WAIT * 4)
    with DashboardServer(port=0) as server:
        run = RUNTIMES[runtime](server.port, tmp_path / "paused", epochs=EPOCHS, delay=0.02).start()
        server.wait_connected(WAIT)
        server.wait_for_event(lambda e: e.get("type") == "trainStep" and e.get("step", 0) >= 7, WAIT)
        paused = server.request("pause", timeout=WAIT)
        assert 7 <= paused["step"] < EPOCHS * 10
        server.request("status", timeout=WAIT)
        server.request("test_now", {"label": "mid"}, timeout=WAIT)
        server.request("save_ckpt", timeout=WAIT)
        server.request("generate_report", {"subset_on": "train"}, timeout=WAIT)
        server.request("numerics_health", timeout=WAIT)
        server.request("resume", timeout=WAIT)
        run.join(WAIT * 4)
    assert_same(weights(plain.model), weights(run.model))


def checkpoint_of(result: dict, step: int) -> Path:
    path = Path(result["folder"]) / "runs" / "baseline" / "checkpoints" / f"step-{step:08d}.pt"
    assert path.is_file(), f"no checkpoint at step {step}: {sorted(p.name for p in path.parent.iterdir())}"
    return path


def test_load_ckpt_in_a_fresh_process_continues_bit_exactly(runtime, tmp_path):
    reference = fresh_process(runtime, tmp_path, "reference", "--ckpt-every", str(CKPT_EVERY))
    ckpt = checkpoint_of(reference, CKPT_EVERY)
    with DashboardServer(port=0) as server:
        proc = fresh_process(runtime, tmp_path, "loaded", port=server.port, background=True)
        server.wait_connected(WAIT * 2)
        loaded = server.request("load_ckpt", {"path": str(ckpt)}, timeout=WAIT * 2)
        assert loaded["step"] == CKPT_EVERY
        result = finish(proc, proc.out_path)
    assert_same(reference["weights"], result["weights"])


def test_resume_from_a_checkpoint_and_from_a_bundle_is_bit_exact(runtime, tmp_path):
    reference = fresh_process(runtime, tmp_path, "reference", "--ckpt-every", str(CKPT_EVERY))
    ckpt = checkpoint_of(reference, CKPT_EVERY)
    resumed = fresh_process(runtime, tmp_path, "resumed", "--resume", str(ckpt))
    assert_same(reference["weights"], resumed["weights"])
    # A bundle of the session as it was at step 13 (its later checkpoints removed first).
    folder = Path(result_folder := reference["folder"])
    for later in (folder / "runs" / "baseline" / "checkpoints").glob("step-*.pt"):
        if later != ckpt:
            later.unlink()
    bundle = export_session(result_folder, tmp_path / "bundle")
    from_bundle = fresh_process(runtime, tmp_path, "from_bundle", "--resume", str(bundle), "--resume-run", "baseline")
    assert_same(reference["weights"], from_bundle["weights"])


# A checkpoint at an epoch's last batch resumes with that epoch's validation and end, then the next
# epoch's first batch (Lightning's own restart skipped both; the HF Trainer ended on the empty epoch).
@pytest.mark.parametrize("epoch_end_runtime", sorted(RUNTIMES))
def test_a_checkpoint_at_an_epochs_last_batch_resumes_bit_exactly(epoch_end_runtime, tmp_path):
    reference = fresh_process(epoch_end_runtime, tmp_path, "reference", "--ckpt-every", "10")
    ckpt = checkpoint_of(reference, 10)  # the last of the first epoch's 10 batches
    document = torch.load(ckpt, weights_only=True)
    assert (document["epoch"], document["batch_in_epoch"]) == (0, 10)
    resumed = fresh_process(epoch_end_runtime, tmp_path, "resumed", "--resume", str(ckpt))
    assert_same(reference["weights"], resumed["weights"])
