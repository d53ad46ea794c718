"""examples/hf_quickstart.py runs with both runtimes and its model learns (fixed seeds, no download)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the HF example needs transformers (dev extra)")

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "hf_quickstart.py"


@pytest.mark.parametrize("runtime", ["trainer", "accelerate"])
def test_hf_quickstart_learns(tmp_path, monkeypatch, capsys, runtime):
    monkeypatch.setenv("ONTHEFLY_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ONTHEFLY_TRANSPORT", "off")
    spec = importlib.util.spec_from_file_location("example_hf_quickstart", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    args = ["--runtime", runtime, "--epochs", "2", "--samples", "128", "--output-dir", str(tmp_path / "out")]
    assert module.main(args) == 0  # the second epoch's loss is below the first's
    out = capsys.readouterr().out
    assert "finished: completed at step 8" in out
    assert list((tmp_path / "home").rglob("events.db"))
