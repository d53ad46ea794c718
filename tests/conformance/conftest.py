"""Fixtures of the conformance suite: a loopback dashboard and a live run of each runtime."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from onthefly.client import DashboardServer, RequestError

from .runtimes import RUNTIMES, WAIT, Run

#: Every command a conformance test sent, so the suite can check it covered all capabilities.
EXERCISED: set[str] = set()


class Dash:
    """A dashboard the tests drive: requests, error replies, and waiting for events."""

    def __init__(self, server: DashboardServer) -> None:
        self.server = server

    def request(self, cmd: str, payload: dict[str, Any] | None = None, timeout: float = WAIT) -> Any:
        EXERCISED.add(cmd)
        return self.server.request(cmd, payload or {}, timeout=timeout)

    def error(self, cmd: str, payload: dict[str, Any] | None = None) -> RequestError:
        EXERCISED.add(cmd)
        try:
            data = self.server.request(cmd, payload or {}, timeout=WAIT)
        except RequestError as exc:
            return exc
        raise AssertionError(f"{cmd} {payload} succeeded but should have failed: {data}")

    def events(self, type_: str | None = None, **match: Any) -> list[dict[str, Any]]:
        return [e for e in self.server.history()
                if (type_ is None or e.get("type") == type_) and all(e.get(k) == v for k, v in match.items())]

    def wait(self, type_: str, timeout: float = WAIT, **match: Any) -> dict[str, Any]:
        return self.server.wait_for_event(
            lambda e: e.get("type") == type_ and all(e.get(k) == v for k, v in match.items()), timeout)

    def wait_steps(self, run_id: str, at_least: int, timeout: float = WAIT) -> dict[str, Any]:
        """The first trainStep of `run_id` at step >= `at_least`."""
        return self.server.wait_for_event(
            lambda e: e.get("type") == "trainStep" and e.get("run_id") == run_id and e.get("step", -1) >= at_least,
            timeout)


@pytest.fixture(params=sorted(RUNTIMES))
def runtime(request: pytest.FixtureRequest) -> str:
    return request.param


@contextlib.contextmanager
def live_run(runtime: str, tmp_path: Any, **settings: Any) -> Iterator[tuple[Dash, Run]]:
    """A run of `runtime` paused before its first optimizer step, with a dashboard attached."""
    server = DashboardServer(port=0).start()
    run = RUNTIMES[runtime](server.port, tmp_path, **settings).start()
    try:
        server.wait_connected(WAIT)
        dash = Dash(server)
        dash.request("pause", {"reason": "conformance"})
        yield dash, run
        if run.thread.is_alive() and server.connected:
            with contextlib.suppress(RequestError):  # already stopping; join() reports a real failure
                dash.request("stop")
        run.join(WAIT)
    finally:
        if run.session is not None:
            run.session.close()
        server.close()


@pytest.fixture
def live(runtime: str, tmp_path: Any) -> Iterator[tuple[Dash, Run]]:
    with live_run(runtime, tmp_path) as pair:
        yield pair
