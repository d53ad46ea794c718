"""Export a session with two forks and a merge; resume the merged run from the bundle elsewhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tests.session.bundle_script", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_resume_merged_run_from_bundle_is_bit_exact(tmp_path):
    bundle = tmp_path / "exports" / "bundle.tar.gz"
    bundle.parent.mkdir()
    first = json.loads(run("original", str(tmp_path / "a.pt"), str(tmp_path / "root-a"), str(bundle))
                       .stdout.strip().splitlines()[-1])
    assert first["merge"] == "merge1" and Path(first["bundle"]).is_file()
    second = json.loads(run("resume", str(tmp_path / "b.pt"), str(tmp_path / "root-b"), first["bundle"])
                        .stdout.strip().splitlines()[-1])
    assert second["run"] == "merge1" and second["step"] == first["step"]
    assert {"baseline", "fork1", "fork2", "merge1"} <= set(second["runs"])
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    for k in a:
        assert torch.equal(a[k], b[k]), f"weights differ at {k}"

    # One flipped byte anywhere in the bundle: refused, naming the file.
    data = bytearray(Path(first["bundle"]).read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered = tmp_path / "exports" / "tampered.tar.gz"
    tampered.write_bytes(bytes(data))
    proc = run("resume", str(tmp_path / "c.pt"), str(tmp_path / "root-c"), str(tampered), ok=False)
    assert proc.returncode != 0
    assert "BundleError" in proc.stderr and "tampered.tar.gz" in proc.stderr
