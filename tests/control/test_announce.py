"""Connect announcements: on every (re)connection, before the replay and before live lines."""

from __future__ import annotations

import json
import logging
import threading

from onthefly.control import MemoryChannel, TcpClientChannel

from .conftest import WAIT, wait_until


def parsed(channel: MemoryChannel) -> list[dict]:
    return [json.loads(line) for line in channel.sent]


class FakeSession:
    """Stands in for the session's announcer: the session and every run, computed when called."""

    def __init__(self) -> None:
        self.runs = [("baseline", [])]
        self.calls = 0
        self.lock = threading.Lock()

    def announce(self) -> list[dict]:
        with self.lock:
            self.calls += 1
            events = [{"type": "session_started", "project": "p", "run_name": "baseline"}]
            events += [{"type": "newRun", "run_id": run, "parents": parents, "event_seq": 999}
                       for run, parents in self.runs]
            return events


def test_announcements_come_first_on_every_connection_stamped_without_seq(make_bus):
    session = FakeSession()
    channel = MemoryChannel()
    bus = make_bus(channel, session_id="sess-1")
    bus.set_context(run_id="baseline", run_gen=0)
    bus.set_connect_announcer(session.announce)
    bus.emit("log", {"text": "before any dashboard"})
    assert bus.flush(WAIT)
    channel.connect()
    assert channel.wait_for(lambda sent: len(sent) == 3)
    first = parsed(channel)
    assert [m["type"] for m in first] == ["session_started", "newRun", "log"]
    for announcement in first[:2]:
        assert "event_seq" not in announcement
        assert announcement["session_id"] == "sess-1" and announcement["run_id"] == "baseline"
        assert announcement["run_gen"] == 0 and isinstance(announcement["ts"], float)
    assert first[2]["event_seq"] == 1  # then the replay of what this dashboard missed

    # The dashboard wipes its state and reconnects after a fork: the announcement is recomputed.
    channel.disconnect()
    session.runs.append(("fork1", ["baseline"]))
    bus.set_context(run_id="fork1", run_gen=1)
    bus.emit("log", {"text": "while away"})
    assert bus.flush(WAIT)
    channel.sent.clear()
    channel.connect()
    channel.inject('{"id":"q","cmd":"status"}')
    request = bus.next_request(timeout=WAIT)
    bus.reply(request.id, {"ok": True})
    bus.emit("log", {"text": "live"})
    assert bus.flush(WAIT)
    second = parsed(channel)
    assert [m.get("type", m.get("id")) for m in second] == [
        "session_started", "newRun", "newRun", "log", "q", "log",
    ]
    assert second[2]["run_id"] == "fork1" and second[2]["parents"] == ["baseline"]
    assert second[2]["run_gen"] == 1 and "event_seq" not in second[2]
    assert [m["event_seq"] for m in second if "event_seq" in m] == [2, 3]
    assert session.calls == 2 and bus.announced_events == 5
    # Announcements are not log entries: the log holds only the three events.
    assert [json.loads(body)["type"] for _, body in bus.event_log.read_after(0)] == ["log", "log", "log"]


def test_a_failing_announcer_is_logged_and_the_stream_goes_on(make_bus, caplog):
    def broken() -> list[dict]:
        raise RuntimeError("runs table locked")

    channel = MemoryChannel()
    bus = make_bus(channel)
    bus.set_connect_announcer(broken)
    bus.emit("log", {"text": "x"})
    with caplog.at_level(logging.ERROR, logger="onthefly.control"):
        channel.connect()
        assert channel.wait_for(lambda sent: len(sent) == 1)
    assert parsed(channel)[0]["text"] == "x"
    assert "connect announcer failed" in caplog.text


def test_announcements_over_tcp_precede_the_replay_on_each_new_connection(line_server, make_bus):
    session = FakeSession()
    server = line_server()
    bus = make_bus(TcpClientChannel(port=server.port, reconnect_initial=0.01, reconnect_max=0.05))
    bus.set_connect_announcer(session.announce)
    assert server.wait_connected()
    for i in range(1, 51):
        bus.emit("trainStep", {"step": i})
    assert server.wait_for(lambda: len(server.events("trainStep")) == 50)
    server.close_gracefully()  # the dashboard is reset; a new connection follows
    assert server.wait_connected(count=2)
    bus.emit("trainStep", {"step": 51})
    assert server.wait_for(lambda: len(server.events("trainStep")) >= 51)
    types = [m.get("type") for m in server.messages()]
    # Each connection begins with the two announcements.
    assert types[:2] == ["session_started", "newRun"]
    second_start = types.index("session_started", 1)
    assert types[second_start:second_start + 2] == ["session_started", "newRun"]
    assert all(t == "trainStep" for t in types[2:second_start])
    assert wait_until(lambda: session.calls == 2)
