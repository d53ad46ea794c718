"""A checkpoint saved mid-epoch, loaded in a fresh process, continues to bit-identical weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tests.session.resume_script", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("policy,workers", [("user", 0), ("epoch_reseed", 0), ("user", 2)])
def test_resume_in_fresh_process_is_bit_exact(tmp_path, policy, workers):
    full = run(str(tmp_path / "full.pt"), str(tmp_path / "a"), policy, str(workers))
    ckpt = Path(full["ckpt_dir"]) / "step-00000021.pt"  # 13 steps per epoch: step 21 is mid-epoch 2
    assert ckpt.is_file(), sorted(p.name for p in Path(full["ckpt_dir"]).iterdir())
    resumed = run(str(tmp_path / "resumed.pt"), str(tmp_path / "b"), policy, str(workers), str(ckpt))
    assert resumed["step"] == full["step"] == 39
    a = torch.load(tmp_path / "full.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed.pt", weights_only=True)
    for k in a:
        assert torch.equal(a[k], b[k]), f"weights differ at {k}"
