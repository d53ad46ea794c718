"""The worked example in docs/data_explorer.md runs and finds what it says it finds."""

from __future__ import annotations

import re
from pathlib import Path

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
