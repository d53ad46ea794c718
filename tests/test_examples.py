"""The examples run and do what they say (fixed seeds)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_fork_and_merge_helps_the_hard_subpopulation(tmp_path):
    result = load_example("fork_and_merge").run("fisher", seed=0, save_dir=str(tmp_path), verbose=False)
    assert result["merge"] == "merge1" and result["fork"] == "fork1"
    assert result["merged_hard"] < result["baseline_hard"]
    assert result["merged_rest"] <= 1.05 * result["baseline_rest"]
    assert result["report_samples"] == 6000 and result["subset"] == 600


def test_quickstart_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ONTHEFLY_HOME", str(tmp_path))
    monkeypatch.setenv("ONTHEFLY_TRANSPORT", "off")
    assert load_example("quickstart").main(["--epochs", "1", "--samples", "512"]) == 0
    out = capsys.readouterr().out
    assert "finished: completed" in out and "event log" in out
    assert list(tmp_path.rglob("events.db")) and list(tmp_path.rglob("step-*.pt"))
