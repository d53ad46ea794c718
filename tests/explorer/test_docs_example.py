"""The worked example in docs/data_explorer.md runs and finds what it says it finds."""

from __future__ import annotations

import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[2] / "docs" / "data_explorer.md"


def test_worked_example_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    code = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    assert namespace["result"].meta["samples"] == 2000
    assert namespace["table"].rows == 200
    assert (tmp_path / "exports" / "hard.parquet").exists()
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "2000 reduction_none"
    assert float(out[1]) > 0.9
    assert out[-1] == "200 ['sample_id', 'label', 'loss', 'cluster', 'x0']"


def test_dynamics_example_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    code = next(c for c in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S) if "DynamicsRecorder(" in c)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: one thread is several times faster on a busy host
    try:
        exec(compile(code, str(DOC), "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "30 multiclass [0 1 2]"
    end_loss, mislabel = (float(v) for v in out[1].split())
    assert mislabel >= 0.8 and mislabel > end_loss + 0.2  # the dynamics see what the last scan no longer does
    cut = namespace["cut"]
    assert cut.warning is None and 0.03 < cut.noise_rate < 0.15 and float(out[3]) > 0.8
    assert (tmp_path / "dynamics" / "baseline" / "dynamics.json").is_file()
