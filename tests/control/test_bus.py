"""bus: stamping and ordering, FIFO replies, busy, replay, flush/close and the atexit path."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from onthefly.control.bus import ControlBus, events_since_page
from onthefly.control.channels import MemoryChannel, NullChannel
from onthefly.control.tcp import TcpClientChannel
from onthefly.control.eventlog import EventLog

from .conftest import WAIT, wait_until


def parsed(channel: MemoryChannel) -> list[dict]:
    return [json.loads(line) for line in channel.sent]


def seqs(messages: list[dict]) -> list[int]:
    return [m["event_seq"] for m in messages if "event_seq" in m]


# ---- emitting ------------------------------------------------------------------------------------


def test_emit_stamps_and_orders_events(make_bus):
    channel = MemoryChannel()
    channel.connect()
    bus = make_bus(channel, session_id="sess-1")
    bus.set_context(run_id="baseline", run_gen=0)
    assert bus.last_seq() == 0
    assert bus.emit("newRun", {"run_id": "explicit", "parents": []}) == 1
    assert bus.emit("trainStep", {"step": 1, "loss": float("nan"), "ts": 12.5, "event_seq": 999}) == 2
    bus.set_context(run_id="fork1", run_gen=1)
    assert bus.emit("log", {"type": "not-this", "text": "hi"}) == 3
    assert bus.emit("paused") == 4
    assert bus.last_seq() == 4
    assert bus.flush(WAIT)
    first, second, third, fourth = parsed(channel)
    assert first["run_id"] == "explicit" and first["session_id"] == "sess-1" and first["run_gen"] == 0
    assert isinstance(first["ts"], float)
    assert second == {"type": "trainStep", "step": 1, "loss": None, "ts": 12.5, "event_seq": 2,
                      "run_id": "baseline", "run_gen": 0, "session_id": "sess-1"}
    assert third["type"] == "log" and third["run_id"] == "fork1" and third["run_gen"] == 1
    assert fourth["type"] == "paused" and fourth["event_seq"] == 4
    assert bus.context == {"session_id": "sess-1", "run_id": "fork1", "run_gen": 1}
    with pytest.raises(ValueError, match="event_seq, ts cannot be a default stamp"):
        bus.set_context(ts=1.0, event_seq=5)
    with pytest.raises(ValueError, match="event type must be a non-empty str"):
        bus.emit("")


def test_emit_from_many_threads_keeps_seq_order_equal_to_send_order(make_bus):
    channel = MemoryChannel()
    channel.connect()
    bus = make_bus(channel)

    def worker(name: str) -> None:
        for i in range(500):
            bus.emit("log", {"text": f"{name}-{i}"})

    threads = [threading.Thread(target=worker, args=(f"t{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert bus.flush(WAIT)
    assert seqs(parsed(channel)) == list(range(1, 2001))
    for n in range(4):  # each thread's own events stay in its order
        texts = [m["text"] for m in parsed(channel) if m["text"].startswith(f"t{n}-")]
        assert texts == [f"t{n}-{i}" for i in range(500)]


def test_replies_leave_in_fifo_order_with_events(make_bus):
    channel = MemoryChannel()
    channel.connect()
    bus = make_bus(channel)
    bus.emit("log", {"text": "before"})
    bus.reply("r1", {"status": "paused"})
    bus.emit("paused", {"step": 3})
    bus.reply_error("r2", "not_paused", "model must be paused")
    bus.reply(None, {"ignored": True})  # fire-and-forget: no reply at all
    bus.reply_error(None, "failed", "resume failed")  # ... but failures become an error event
    assert bus.flush(WAIT)
    assert parsed(channel) == [
        {"type": "log", "text": "before", "ts": parsed(channel)[0]["ts"], "event_seq": 1},
        {"id": "r1", "ok": True, "data": {"status": "paused"}},
        {"type": "paused", "step": 3, "ts": parsed(channel)[2]["ts"], "event_seq": 2},
        {"id": "r2", "ok": False, "error": "model must be paused", "code": "not_paused"},
        {"type": "error", "text": "resume failed", "code": "failed", "ts": parsed(channel)[4]["ts"], "event_seq": 3},
    ]


def test_batches_are_coalesced_into_few_sends(make_bus):
    channel = MemoryChannel()
    channel.connect()
    bus = ControlBus(channel)
    for i in range(1000):
        bus.emit("log", {"text": str(i)})
    bus.start()  # everything queued before start goes out in one or two sends
    try:
        assert bus.flush(WAIT)
        assert len(channel.sent) == 1000 and channel.send_calls <= 3
    finally:
        bus.close()


# ---- inbound ------------------------------------------------------------------------------------


def test_requests_are_queued_and_bad_lines_answered_at_once(make_bus):
    channel = MemoryChannel()
    channel.connect()
    bus = make_bus(channel)
    channel.inject('{"id":"a","cmd":"pause","payload":{"reason":"x"}}')
    channel.inject('{"id":"b","payload":{}}')
    channel.inject("not json at all")
    channel.inject(b"\xff\xfe\n")
    request = bus.next_request(timeout=WAIT)
    assert (request.id, request.cmd, request.payload) == ("a", "pause", {"reason": "x"})
    assert bus.next_request(timeout=0) is None
    assert bus.flush(WAIT)
    reply, bad_json, bad_utf8 = parsed(channel)
    assert reply["id"] == "b" and reply["code"] == "bad_envelope" and "no 'cmd'" in reply["error"]
    assert bad_json["type"] == "error" and bad_json["code"] == "bad_json"
    assert bad_utf8["type"] == "error" and bad_utf8["code"] == "bad_json" and "UTF-8" in bad_utf8["text"]


def test_full_queue_answers_busy_and_never_drops(make_bus):
    channel = MemoryChannel()
    channel.connect()
    bus = make_bus(channel, queue_size=3)
    for i in range(10):
        channel.inject(json.dumps({"id": f"q{i}", "cmd": "status"}))
    channel.inject('{"cmd":"resume"}')  # fire-and-forget while full: an error event says so
    assert bus.flush(WAIT)
    busy = {m["id"] for m in parsed(channel) if m.get("code") == "busy" and "id" in m}
    assert busy == {f"q{i}" for i in range(3, 10)}
    assert all("command queue is full (3 waiting)" in m["error"] for m in parsed(channel) if "id" in m)
    event = [m for m in parsed(channel) if m.get("type") == "error"]
    assert len(event) == 1 and event[0]["code"] == "busy" and "'resume'" in event[0]["text"]
    assert [bus.next_request(0).id for _ in range(3)] == ["q0", "q1", "q2"]
    assert bus.busy_replies == 8 and bus.pending_requests == 0


# ---- disconnects and replay ----------------------------------------------------------------------


def test_events_while_disconnected_are_persisted_and_replayed_before_live_ones(make_bus):
    channel = MemoryChannel()
    bus = make_bus(channel)
    for i in range(1, 2501):
        bus.emit("log", {"text": str(i)})
    bus.reply("gone", {"x": 1})  # its requester is not connected: dropped and counted
    assert bus.flush(WAIT)
    assert channel.sent == [] and bus.event_log.count() == 2500 and bus.dropped_replies == 1
    channel.connect()
    bus.emit("log", {"text": "live"})
    assert bus.flush(WAIT)
    assert seqs(parsed(channel)) == list(range(1, 2502))
    assert parsed(channel)[-1]["text"] == "live"
    assert bus.replayed_events == 2500


def test_late_connection_is_replayed_without_any_new_event(make_bus):
    channel = MemoryChannel()
    bus = make_bus(channel)
    bus.emit("session_started", {"project": "p"})
    bus.emit("newRun", {"run_id": "r"})
    assert bus.flush(WAIT)
    channel.connect()  # nothing else is emitted: the connection itself triggers the replay
    assert channel.wait_for(lambda sent: len(sent) == 2)
    assert [m["type"] for m in parsed(channel)] == ["session_started", "newRun"]


def test_failed_send_keeps_the_cursor_so_nothing_is_lost_or_repeated(make_bus):
    channel = MemoryChannel()
    channel.connect()
    bus = make_bus(channel)
    bus.emit("log", {"text": "1"})
    assert bus.flush(WAIT)
    channel.fail_next_sends(1)
    bus.emit("log", {"text": "2"})
    bus.reply("r", {"lost": True})  # in the failed batch or after it: its requester is gone
    bus.emit("log", {"text": "3"})
    assert bus.flush(WAIT)
    assert not channel.connected and seqs(parsed(channel)) == [1]
    bus.emit("log", {"text": "4"})
    channel.connect()
    bus.emit("log", {"text": "5"})
    assert bus.flush(WAIT)
    assert seqs(parsed(channel)) == [1, 2, 3, 4, 5]
    assert bus.dropped_replies == 1
    assert all("ok" not in m for m in parsed(channel))


def test_repeated_disconnects_during_a_stream(make_bus):
    channel = MemoryChannel()
    channel.connect()
    bus = make_bus(channel)
    for i in range(1, 3001):
        bus.emit("log", {"text": str(i)})
        if i % 700 == 0:
            channel.disconnect()
        if i % 700 == 350:
            channel.connect()
    channel.connect()
    assert bus.flush(WAIT)
    assert seqs(parsed(channel)) == list(range(1, 3001))


def test_reused_event_log_continues_the_sequence(tmp_path, make_bus):
    log = EventLog(tmp_path / "events.db")
    first = make_bus(NullChannel(), event_log=log)
    first.emit("log", {"text": "a"})
    first.emit("log", {"text": "b"})
    first.close()
    assert not log.closed  # a log the caller passed in is the caller's to close
    channel = MemoryChannel()
    second = make_bus(channel, event_log=log)
    assert second.emit("log", {"text": "c"}) == 3
    channel.connect()  # only this bus's events are replayed automatically
    assert channel.wait_for(lambda sent: len(sent) == 1)
    assert seqs(parsed(channel)) == [3]
    second.close()
    log.close()


def test_events_since_page(make_bus):
    bus = make_bus(NullChannel())
    for i in range(1, 26):
        bus.emit("log", {"text": str(i)})
    assert bus.flush(WAIT)
    page = events_since_page(bus.event_log, 0, limit=10)
    assert [e["event_seq"] for e in page["events"]] == list(range(1, 11))
    assert page["next_seq"] == 10 and page["more"] is True
    page = events_since_page(bus.event_log, 20, limit=10)
    assert [e["text"] for e in page["events"]] == ["21", "22", "23", "24", "25"]
    assert page["next_seq"] == 25 and page["more"] is False
    assert events_since_page(bus.event_log, 25) == {"events": [], "next_seq": 25, "more": False}
    with pytest.raises(ValueError, match="after_seq must be an integer >= 0, got -1"):
        events_since_page(bus.event_log, -1)
    with pytest.raises(ValueError, match="limit must be an integer in 1..10000, got 0"):
        events_since_page(bus.event_log, 0, limit=0)


# ---- lifecycle ----------------------------------------------------------------------------------


def test_flush_close_and_emit_after_close(caplog):
    channel = MemoryChannel()
    channel.connect()
    bus = ControlBus(channel)
    assert bus.flush(0.1) is True  # nothing queued, writer not started
    bus.emit("log", {"text": "queued before start"})
    assert bus.flush(0.1) is False  # queued, but no writer to handle it yet
    bus.start()
    bus.start()  # idempotent
    temp_log = bus.event_log.path
    bus.close()
    bus.close()  # idempotent
    assert bus.closed and [m["text"] for m in parsed(channel)] == ["queued before start"]
    assert not temp_log.exists()  # the bus's own temporary log is deleted
    with caplog.at_level(logging.WARNING, logger="onthefly.control"):
        bus.emit("log", {"text": "too late"})
    assert bus.dropped_after_close == 1 and "emitted after the control bus closed" in caplog.text
    with pytest.raises(RuntimeError, match="start\\(\\) after close\\(\\)"):
        bus.start()


def test_constructor_checks():
    with pytest.raises(TypeError, match="channel must be an onthefly Channel, got str"):
        ControlBus("tcp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="queue_size must be an integer >= 1, got 0"):
        ControlBus(NullChannel(), queue_size=0)


def test_bus_over_loopback_tcp(tcp_bus):
    server, bus = tcp_bus(session_id="s")
    for i in range(100):
        bus.emit("trainStep", {"step": i, "loss": 0.5})
    server.send_json({"id": "srv-1", "cmd": "status"})
    request = bus.next_request(timeout=WAIT)
    assert request.id == "srv-1"
    bus.reply(request.id, {"step": 99})
    assert server.wait_for(lambda: len(server.lines) == 101)
    messages = server.messages()
    assert seqs(messages) == list(range(1, 101))
    assert messages[-1] == {"id": "srv-1", "ok": True, "data": {"step": 99}}


def test_close_delivers_everything_emitted_right_before_it(tcp_bus):
    server, bus = tcp_bus()
    for i in range(2000):
        bus.emit("log", {"text": f"line {i}", "pad": "x" * 100})
    bus.close()
    assert server.wait_for(lambda: len(server.lines) == 2000)
    assert seqs(server.messages()) == list(range(1, 2001))


def test_close_is_bounded_when_the_dashboard_stops_reading():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    bus = ControlBus(TcpClientChannel(port=listener.getsockname()[1], reconnect_initial=0.01))
    bus.start()
    conn, _ = listener.accept()  # ... and never reads from it
    try:
        assert wait_until(lambda: bus.connected)
        blob = "x" * 65536
        for i in range(400):  # ~26 MB: far more than the socket buffers hold
            bus.emit("log", {"text": blob})
        started = time.monotonic()
        bus.close(timeout=1.0)
        assert time.monotonic() - started < 5.0
        assert bus.closed and bus.event_log.closed  # the writer stopped, so its temp log went too
    finally:
        conn.close()
        listener.close()


ATEXIT_CHILD = textwrap.dedent(
    """
    import sys, time
    from onthefly.control import ControlBus, TcpClientChannel
    bus = ControlBus(TcpClientChannel(port=int(sys.argv[1]), reconnect_initial=0.01))
    bus.start()
    deadline = time.monotonic() + 10
    while not bus.connected and time.monotonic() < deadline:
        time.sleep(0.005)
    for i in range(3000):
        bus.emit("trainStep", {"step": i, "pad": "y" * 200})
    bus.emit("trainingFinished", {"status": "completed"})
    # no close(): the interpreter exits and atexit must still deliver everything
    """
)


def test_atexit_delivers_the_last_event_without_close(line_server):
    server = line_server()
    child = subprocess.run(
        [sys.executable, "-c", ATEXIT_CHILD, str(server.port)], capture_output=True, timeout=WAIT * 2
    )
    assert child.returncode == 0, child.stderr.decode()
    assert server.wait_for(lambda: len(server.lines) == 3001)
    messages = server.messages()
    assert seqs(messages) == list(range(1, 3002))
    assert messages[-1]["type"] == "trainingFinished"


def test_connected_reflects_the_channel(make_bus):
    channel = MemoryChannel()
    bus = make_bus(channel)
    assert bus.connected is False
    channel.connect()
    assert wait_until(lambda: bus.connected)
