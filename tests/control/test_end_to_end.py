"""The control plane end to end, through real loopback TCP and through stdio (a subprocess)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from onthefly.client import DashboardServer, ProcessDashboard

ROOT = Path(__file__).resolve().parents[2]
ENV = {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def exercise(dash) -> None:
    """Drive the dummy loop: pause/resume within a batch, mutating on the loop, read-only while busy."""
    dash.wait_for_event(lambda e: e.get("type") == "trainStep" and e["step"] >= 3, timeout=20)
    sent_at = dash.request("ping")["batch"]
    paused = dash.request("pause", timeout=10)
    assert paused["status"] == "paused"
    assert paused["step"] <= sent_at + 2  # at most the in-flight batch plus the one being checked
    event = dash.wait_for_event("paused", timeout=5)
    assert event["step"] == paused["step"] and event["event_seq"] > 0
    # Paused: the loop does not advance, but read-only commands are answered.
    assert dash.request("ping")["batch"] == paused["step"]
    who = dash.request("whoami")
    assert who["thread"] == "training-loop" and who["batch"] == paused["step"]
    resumed = dash.request("resume")
    assert resumed["status"] == "resumed"
    dash.wait_for_event(lambda e: e.get("type") == "trainStep" and e["step"] > paused["step"], timeout=10)
    # A read-only command is answered while the loop is busy inside a long batch.
    dash.request("slow_batch", {"seconds": 1.5})
    import time

    deadline = time.monotonic() + 5
    answered_inside = False
    while time.monotonic() < deadline and not answered_inside:
        answered_inside = dash.request("ping", timeout=1)["in_batch"] and True
    assert answered_inside
    assert dash.request("whoami", timeout=10)["thread"] == "training-loop"
    dash.request("stop")
    finished = dash.wait_for_event("trainingFinished", timeout=10)
    assert finished["status"] == "stopped"
    seqs = [e["event_seq"] for e in dash.history() if "event_seq" in e]
    assert seqs == list(range(1, len(seqs) + 1))


def test_end_to_end_over_tcp():
    import subprocess

    with DashboardServer(port=0) as dash:
        proc = subprocess.Popen([sys.executable, "-m", "tests.control.dummy_trainer", "tcp", str(dash.port)],
                                cwd=ROOT, env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            dash.wait_connected(20)
            exercise(dash)
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


@pytest.mark.parametrize("attempt", [0])
def test_end_to_end_over_stdio(attempt):
    with ProcessDashboard([sys.executable, "-m", "tests.control.dummy_trainer", "stdio"], env=ENV, cwd=ROOT) as dash:
        exercise(dash)
        assert dash.wait(20) == 0
        unparsed = [e for e in dash.history() if e.get("unparsed")]
        assert unparsed == []  # the user's print went to stderr, not into the protocol
        assert any("must not corrupt" in line for line in dash.stderr_lines)
