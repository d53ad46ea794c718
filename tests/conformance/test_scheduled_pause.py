"""A pause can wait for a step or an epoch, and a run can start paused: on every runtime, over the wire."""

from __future__ import annotations

from .conftest import live, live_run, runtime  # noqa: F401 (fixtures)
from .runtimes import WAIT


def test_pause_at_a_step_and_at_an_epoch(live, runtime):
    dash, run = live
    start = dash.request("status")
    scheduled = dash.request("pause", {"at_step": start["step"] + 5, "reason": "look at step 5"})
    assert scheduled == {"status": "scheduled", "at_step": start["step"] + 5, "step": start["step"]}
    dash.request("resume")
    held = dash.wait("paused", request={"action": "pause", "reason": "look at step 5", "at_step": start["step"] + 5})
    assert held["step"] == start["step"] + 5
    status = dash.request("status")
    assert status["paused"] is True and status["step"] == start["step"] + 5
    assert max(e["step"] for e in dash.events("trainStep")) == start["step"] + 5  # no step past it

    epoch = status["epoch"] + 1
    assert dash.request("pause", {"at_epoch": epoch})["status"] == "scheduled"
    dash.request("resume")
    held = dash.wait("paused", request={"action": "pause", "reason": "manual", "at_epoch": epoch})
    status = dash.request("status")
    assert status["paused"] is True and status["epoch"] == epoch and status["batch_in_epoch"] == 1
    assert held["step"] == status["step"]
    assert [e["epoch"] for e in dash.events("epoch_end")][-1] == epoch - 1  # the epoch before it ended first

    # A step already reached pauses at once (the run is paused: the reply says so).
    assert dash.request("pause", {"at_step": 1})["status"] == "paused"
    for payload, words in (({"at_step": 3, "at_epoch": 1}, "not both"), ({"at_step": -1}, "at_step"),
                           ({"at_epoch": "two"}, "at_epoch")):
        err = dash.error("pause", payload)
        assert err.code == "bad_payload" and words in str(err), (payload, str(err))


def test_a_run_can_start_paused_until_a_dashboard_resumes_it(runtime, tmp_path):
    with live_run(runtime, tmp_path, start_paused=True) as (dash, run):
        first = dash.wait("paused")
        assert first["request"]["reason"] == "start_paused" and dash.events("trainStep") == []
        assert dash.request("status")["step"] == first["step"]
        dash.request("resume")
        dash.wait("trainStep", timeout=WAIT)
        assert dash.request("pause")["status"] == "paused"
