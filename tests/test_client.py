"""Tests for onthefly.client, driven by a fake trainer that speaks the wire over a plain socket."""

from __future__ import annotations

import json
import socket
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from onthefly.client import (
    MAX_LINE_BYTES,
    DashboardServer,
    ProcessDashboard,
    RequestError,
    TrainerDisconnected,
    resolve_port,
)

WAIT = 10.0


class FakeError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class FakeTrainer:
    """A tiny training-side peer: replies to requests, stamps events, keeps an event store.

    The store survives reconnects, like the real session's event log, so `events_since` can
    serve events that were lost on a dead socket.
    """

    def __init__(self, port: int, session_id: str = "sess-fake", page_size: int = 2) -> None:
        self.port = port
        self.session_id = session_id
        self.page_size = page_size
        self.store: list[dict[str, Any]] = []
        self.seq = 0
        self.received: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.write_lock = threading.Lock()
        self.handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
            "status": lambda p: {"step": 42, "epoch": 1, "paused": False},
            "echo": lambda p: {"echo": p},
            "events_since": self.events_since,
        }
        self.sock: socket.socket | None = None
        self.thread: threading.Thread | None = None
        self.connect()

    def connect(self) -> None:
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=WAIT)
        self.sock.settimeout(None)
        self.thread = threading.Thread(target=self._serve, args=(self.sock,), daemon=True)
        self.thread.start()

    def disconnect(self, join: bool = True) -> None:
        assert self.sock is not None
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError as exc:  # the dashboard already closed its end
            print(f"fake trainer: shutdown: {exc}")
        self.sock.close()
        assert self.thread is not None
        if join:
            self.thread.join(WAIT)

    def write(self, obj_or_bytes: Any) -> None:
        data = obj_or_bytes if isinstance(obj_or_bytes, bytes) else (json.dumps(obj_or_bytes) + "\n").encode()
        assert self.sock is not None
        with self.write_lock:
            self.sock.sendall(data)

    def emit(self, type_: str, *, send: bool = True, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        event = {"type": type_, **fields, "run_id": "run-a", "run_gen": 0, "ts": time.time(),
                 "session_id": self.session_id, "event_seq": self.seq}
        self.store.append(event)
        if send:
            self.write(event)
        return event

    def events_since(self, payload: dict[str, Any]) -> dict[str, Any]:
        after = payload["event_seq"]
        later = [e for e in self.store if e["event_seq"] > after]
        page = later[: self.page_size]
        return {"events": page, "next_seq": page[-1]["event_seq"] if page else after,
                "more": len(later) > len(page)}

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = WAIT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for msg in self.received:
                    if predicate(msg):
                        return msg
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("fake trainer never received the expected message")
                self.cond.wait(remaining)

    def _serve(self, sock: socket.socket) -> None:
        with sock.makefile("rb") as rfile:
            for raw in rfile:
                msg = json.loads(raw)
                with self.cond:
                    self.received.append(msg)
                    self.cond.notify_all()
                handler = self.handlers.get(msg.get("cmd"))
                try:
                    if handler is None:
                        raise FakeError("unknown_command", f"Unknown cmd: {msg.get('cmd')}")
                    reply: dict[str, Any] = {"ok": True, "data": handler(msg.get("payload") or {})}
                except FakeError as exc:
                    reply = {"ok": False, "error": exc.message, "code": exc.code}
                if msg.get("id"):
                    try:
                        self.write({"id": msg["id"], **reply})
                    except OSError:
                        return


@pytest.fixture
def server():
    srv = DashboardServer(port=0).start()
    yield srv
    srv.close()


@pytest.fixture
def trainer(server):
    fake = FakeTrainer(server.port)
    server.wait_connected(WAIT)
    yield fake
    if fake.sock is not None:
        fake.sock.close()


def seqs(server: DashboardServer) -> list[int]:
    return [e["event_seq"] for e in server.history() if "event_seq" in e]


def wait_seq(server: DashboardServer, seq: int) -> None:
    server.wait_for_event(lambda e: e.get("event_seq") == seq, timeout=WAIT)


# ---------------------------------------------------------------- construction and bad input


def test_port_resolution_and_bad_ports(monkeypatch):
    monkeypatch.delenv("ONTHEFLY_DASHBOARD_PORT", raising=False)
    assert resolve_port(None) == 47621
    monkeypatch.setenv("ONTHEFLY_DASHBOARD_PORT", "5123")
    assert resolve_port(None) == 5123
    assert DashboardServer().port == 5123
    monkeypatch.setenv("ONTHEFLY_DASHBOARD_PORT", "abc")
    with pytest.raises(ValueError, match="ONTHEFLY_DASHBOARD_PORT must be an integer port, got 'abc'"):
        DashboardServer()
    with pytest.raises(ValueError, match="port must be in 0..65535, got 70000"):
        DashboardServer(port=70000)
    with pytest.raises(TypeError, match="port must be an int, got str"):
        DashboardServer(port="80")  # type: ignore[arg-type]


def test_non_loopback_host_refused_unless_allowed():
    with pytest.raises(ValueError, match="non-loopback host '0.0.0.0'"):
        DashboardServer(port=0, host="0.0.0.0")
    with pytest.raises(ValueError, match="non-loopback host 'example.com'"):
        DashboardServer(port=0, host="example.com")
    assert DashboardServer(port=0, host="0.0.0.0", allow_remote=True).host == "0.0.0.0"
    assert DashboardServer(port=0, host="localhost").host == "localhost"


def test_bound_port_and_no_trainer(server):
    assert server.port > 0
    assert server.address == ("127.0.0.1", server.port)
    assert not server.connected
    with pytest.raises(TrainerDisconnected) as info:
        server.request("status")
    assert info.value.code == "disconnected"
    assert "no trainer connected" in str(info.value)
    with pytest.raises(TimeoutError, match="no trainer connected within 0.05 s"):
        server.wait_connected(0.05)


def test_bad_request_arguments(server, trainer):
    with pytest.raises(ValueError, match="cmd must be a non-empty string"):
        server.request("")
    with pytest.raises(TypeError, match="payload for 'echo' must be a dict, got list"):
        server.request("echo", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="payload for 'echo' cannot be sent as JSON"):
        server.request("echo", {"lr": float("nan")})
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        server.request("echo", {}, timeout=0)
    # Nothing malformed reached the trainer; the link still works.
    assert server.request("echo", {"x": 1}) == {"echo": {"x": 1}}


# ---------------------------------------------------------------- requests and replies


def test_request_reply_and_wire_shape(server, trainer):
    assert server.request("status") == {"step": 42, "epoch": 1, "paused": False}
    assert server.request("echo", {"a": [1, 2], "s": "é"}) == {"echo": {"a": [1, 2], "s": "é"}}
    msg = trainer.wait_for(lambda m: m.get("cmd") == "echo")
    assert isinstance(msg["id"], str) and msg["id"]
    assert msg["payload"] == {"a": [1, 2], "s": "é"}
    status_msg = trainer.wait_for(lambda m: m.get("cmd") == "status")
    assert status_msg["payload"] == {}


def test_error_reply_raises_request_error_with_code(server, trainer):
    def not_paused(payload):
        raise FakeError("not_paused", "Model must be paused before generate_report")

    trainer.handlers["generate_report"] = not_paused
    with pytest.raises(RequestError) as info:
        server.request("generate_report", {"owner_run_id": "run-a"})
    err = info.value
    assert not isinstance(err, TrainerDisconnected)
    assert err.cmd == "generate_report"
    assert err.code == "not_paused"
    assert err.message == "Model must be paused before generate_report"
    assert err.data["ok"] is False and err.data["code"] == "not_paused"
    with pytest.raises(RequestError) as info:
        server.request("no_such_cmd")
    assert info.value.code == "unknown_command"


def test_fire_and_forget_has_no_id(server, trainer):
    server.send("resume")
    msg = trainer.wait_for(lambda m: m.get("cmd") == "resume")
    assert msg == {"cmd": "resume"}
    server.send("pause", {"reason": "x"})
    msg = trainer.wait_for(lambda m: m.get("cmd") == "pause")
    assert msg == {"cmd": "pause", "payload": {"reason": "x"}}
    # No reply came back, so nothing is pending and nothing was counted late.
    assert server.request("status")["step"] == 42
    assert server.late_replies == 0


def test_send_raw_reaches_trainer_verbatim(server, trainer):
    server.send_raw('{"id": "raw-1", "cmd": "echo", "payload": {"k": 2}}')
    msg = trainer.wait_for(lambda m: m.get("id") == "raw-1")
    assert msg["payload"] == {"k": 2}
    with pytest.raises(TypeError, match="send_raw takes str or bytes"):
        server.send_raw(123)  # type: ignore[arg-type]


def test_reply_after_timeout_is_dropped(server, trainer):
    release = threading.Event()

    def slow(payload):
        release.wait(WAIT)
        return {"late": True}

    trainer.handlers["slow"] = slow
    with pytest.raises(TimeoutError, match="no reply to 'slow' within 0.2 s"):
        server.request("slow", timeout=0.2)
    release.set()
    # The late reply arrives before this one (the fake answers in order) and is dropped.
    assert server.request("status") == {"step": 42, "epoch": 1, "paused": False}
    assert server.late_replies == 1
    assert server.request("echo", {"n": 3}) == {"echo": {"n": 3}}


def test_pending_request_fails_when_trainer_disconnects(server, trainer):
    entered = threading.Event()
    release = threading.Event()

    def hang(payload):
        entered.set()
        release.wait(WAIT)
        return {}

    trainer.handlers["hang"] = hang
    outcome: dict[str, BaseException] = {}

    def call():
        try:
            server.request("hang", timeout=WAIT)
        except BaseException as exc:  # recorded for the assertion below
            outcome["exc"] = exc

    caller = threading.Thread(target=call)
    caller.start()
    assert entered.wait(WAIT)
    trainer.disconnect(join=False)  # its serving thread is still inside `hang`
    caller.join(WAIT)
    release.set()
    trainer.thread.join(WAIT)
    exc = outcome["exc"]
    assert isinstance(exc, TrainerDisconnected)
    assert exc.code == "disconnected" and exc.cmd == "hang"
    server.wait_disconnected(WAIT)
    assert not server.connected


# ---------------------------------------------------------------- connections


def test_second_connection_refused_then_reconnect_accepted(server, trainer):
    intruder = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
    assert intruder.recv(1) == b""  # closed by the dashboard
    intruder.close()
    note = server.wait_for_event(lambda e: "refused a second trainer" in e.get("text", ""))
    assert note["type"] == "log" and note["text"].startswith("[onthefly]")
    assert server.request("status")["step"] == 42  # the first trainer is unaffected
    assert server.connection_count == 1

    trainer.disconnect()
    server.wait_disconnected(WAIT)
    trainer.connect()
    server.wait_connected(WAIT)
    assert server.connection_count == 2
    assert server.request("echo", {"again": True}) == {"echo": {"again": True}}


def test_connection_callbacks(server):
    changes: list[bool] = []
    seen = threading.Condition()

    def on_change(up: bool) -> None:
        with seen:
            changes.append(up)
            seen.notify_all()

    server.on_connection_change(on_change)
    fake = FakeTrainer(server.port)
    server.wait_connected(WAIT)
    fake.disconnect()
    with seen:
        assert seen.wait_for(lambda: len(changes) == 2, WAIT)
    assert changes == [True, False]


# ---------------------------------------------------------------- events


def test_events_in_order_legacy_and_unparsable(server, trainer):
    for i in range(30):
        trainer.emit("trainStep", step=i + 1, loss=1.0 / (i + 1))
    trainer.write({"type": "error", "text": "legacy, unstamped"})
    trainer.write(b"this is not json\n")
    trainer.write(b"[1, 2]\n")
    trainer.write({"event": "renamed"})
    wait_seq(server, 30)
    server.wait_for_event(lambda e: e.get("type") == "renamed")
    history = server.history()
    assert seqs(server) == list(range(1, 31))
    assert [e["step"] for e in history[:30]] == list(range(1, 31))
    tail = history[30:]
    assert tail[0] == {"type": "error", "text": "legacy, unstamped"}
    assert tail[1]["type"] == "log" and tail[1]["text"] == "this is not json" and tail[1]["unparsed"]
    assert tail[2]["text"] == "[1, 2]"
    assert tail[3] == {"type": "renamed"}
    assert server.last_seq == 30
    assert server.received is server.received and len(server.received) == 34


def test_duplicates_are_dropped(server, trainer):
    e1 = trainer.emit("log", text="one")
    e2 = trainer.emit("log", text="two")
    trainer.write(e2)
    trainer.write(e1)
    e3 = trainer.emit("log", text="three")
    trainer.write(e3)
    trainer.emit("log", text="four")
    wait_seq(server, 4)
    assert [e["text"] for e in server.history()] == ["one", "two", "three", "four"]
    assert server.duplicates_dropped == 3


def test_gap_fill_across_reconnect_delivers_each_event_once_in_order(server, trainer):
    for _ in range(5):
        trainer.emit("trainStep")
    wait_seq(server, 5)
    # 6 and 7 were "written" into a socket that then died: the dashboard never sees them.
    trainer.emit("trainStep", send=False)
    trainer.emit("trainStep", send=False)
    trainer.disconnect()
    server.wait_disconnected(WAIT)

    asked = threading.Event()
    release = threading.Event()
    serve_page = trainer.events_since

    def held_events_since(payload):
        asked.set()
        release.wait(WAIT)  # keep the fill open while live events arrive
        return serve_page(payload)

    trainer.handlers["events_since"] = held_events_since
    trainer.connect()
    server.wait_connected(WAIT)
    trainer.emit("trainStep")  # 8: a gap after 5
    assert asked.wait(WAIT)
    trainer.emit("trainStep")  # 9 and 10 arrive while the fill is pending: buffered
    trainer.emit("trainStep")
    trainer.write(trainer.store[2])  # a stale duplicate (3) in the middle of it
    release.set()
    wait_seq(server, 10)
    for _ in range(2):
        trainer.emit("trainStep")
    wait_seq(server, 12)

    assert seqs(server) == list(range(1, 13))
    assert server.last_seq == 12
    fills = [m["payload"]["event_seq"] for m in trainer.received if m.get("cmd") == "events_since"]
    assert fills == [5, 7, 9]  # paged two at a time: (6,7) (8,9) (10)
    assert server.duplicates_dropped >= 3  # 8, 9 and 10 came both live and from the store, plus 3
    assert not any(e.get("source") == "client" for e in server.history())


def test_gap_without_events_since_support_delivers_what_arrived(server, trainer):
    del trainer.handlers["events_since"]  # a reference-style backend
    trainer.emit("log", text="a")
    trainer.emit("log", text="lost", send=False)
    trainer.emit("log", text="c")
    server.wait_for_event(lambda e: e.get("text") == "c")
    texts = [e["text"] for e in server.history()]
    assert texts[0] == "a" and texts[-1] == "c"
    notes = [t for t in texts if t.startswith("[onthefly]")]
    assert any("could not recover events after event_seq 1" in t and "unknown_command" in t for t in notes)
    assert any("events 2..2 are lost" in t for t in notes)
    trainer.emit("log", text="d")
    server.wait_for_event(lambda e: e.get("text") == "d")
    assert server.last_seq == 4


def test_new_session_restarts_sequence(server, trainer):
    trainer.emit("log", text="old-1")
    trainer.emit("log", text="old-2")
    wait_seq(server, 2)
    trainer.session_id = "sess-new"
    trainer.seq = 0
    trainer.store.clear()
    trainer.emit("session_started", text="new-1")
    trainer.emit("log", text="new-2")
    server.wait_for_event(lambda e: e.get("text") == "new-2")
    assert [e["text"] for e in server.history()] == ["old-1", "old-2", "new-1", "new-2"]
    assert server.last_seq == 2


def test_events_iterator_and_wait_for_event(server, trainer):
    for i in range(3):
        trainer.emit("trainStep", step=i)
    got = [e["step"] for e in server.events(timeout=0.3)]
    assert got == [0, 1, 2]
    assert list(server.events(timeout=0.05)) == []  # shared cursor: nothing new
    trainer.emit("paused", step=3)
    assert [e["type"] for e in server.events(timeout=0.3)] == ["paused"]
    assert [e["event_seq"] for e in server.events(timeout=0.05, since=1)] == [2, 3, 4]
    assert server.wait_for_event("trainStep")["step"] == 0
    assert server.wait_for_event("trainStep", since=2)["step"] == 2
    with pytest.raises(TimeoutError, match="no 'resumed' event within 0.1 s"):
        server.wait_for_event("resumed", timeout=0.1)
    with pytest.raises(TypeError, match="needs an event type or a predicate"):
        server.wait_for_event(5)  # type: ignore[arg-type]


def test_on_event_callback_may_call_request(server, trainer):
    statuses: list[Any] = []
    done = threading.Event()

    def on_event(event):
        if event["type"] == "paused":
            statuses.append(server.request("status", timeout=WAIT))
            done.set()

    server.on_event(on_event)
    trainer.emit("trainStep")
    trainer.emit("paused", step=1)
    assert done.wait(WAIT)
    assert statuses == [{"step": 42, "epoch": 1, "paused": False}]


def test_wait_callbacks_returns_once_every_delivered_event_was_dispatched(server, trainer):
    seen: list[int] = []

    def slow(event):
        time.sleep(0.01)
        seen.append(event["event_seq"])

    server.on_event(slow)
    for i in range(20):
        trainer.emit("log", text=str(i))
    server.wait_for_event(lambda e: e.get("event_seq") == 20, timeout=WAIT)
    assert len(seen) < 20  # the callbacks trail delivery...
    assert server.wait_callbacks(timeout=WAIT) is True
    assert seen == list(range(1, 21))  # ...and have all run once wait_callbacks returns
    assert DashboardServer(port=0).wait_callbacks() is True  # no callbacks: nothing to wait for


def test_drop_connection_cuts_the_link_and_the_trainer_may_come_back(server, trainer):
    assert server.drop_connection() is True
    server.wait_disconnected(WAIT)
    assert server.drop_connection() is False
    trainer.connect()
    server.wait_connected(WAIT)
    assert server.connection_count == 2


def test_keep_events_bounds_history_with_absolute_indices():
    with DashboardServer(port=0, keep_events=10) as srv:
        fake = FakeTrainer(srv.port)
        srv.wait_connected(WAIT)
        for i in range(40):
            fake.emit("trainStep", step=i)
        wait_seq(srv, 40)
        assert srv.delivered_count == 40
        assert 10 <= len(srv.history()) <= 13
        assert srv.history()[-1]["step"] == 39
        assert srv.wait_for_event("trainStep", since=35)["step"] == 35
        fake.sock.close()
    with pytest.raises(ValueError, match="keep_events must be a positive int"):
        DashboardServer(port=0, keep_events=0)


def test_overlong_line_is_dropped_and_stream_stays_usable(server, trainer):
    trainer.write(b"x" * (MAX_LINE_BYTES + 10) + b"\n")
    trainer.emit("log", text="after")
    server.wait_for_event(lambda e: e.get("text") == "after", timeout=WAIT)
    notes = [e["text"] for e in server.history() if e.get("source") == "client"]
    assert notes == [f"[onthefly] dropped a line longer than {MAX_LINE_BYTES} bytes from the trainer"]


def test_multibyte_character_split_across_writes(server, trainer):
    line = (json.dumps({"type": "log", "text": "naïve ✓"}, ensure_ascii=False) + "\n").encode()
    cut = line.index("✓".encode()) + 1
    trainer.write(line[:cut])
    trainer.write(line[cut:])
    assert server.wait_for_event("log")["text"] == "naïve ✓"


def test_close_fails_pending_and_ends_iteration(trainer, server):
    trainer.handlers["hang"] = lambda p: threading.Event().wait(WAIT)
    outcome: dict[str, BaseException] = {}

    def call():
        try:
            server.request("hang", timeout=WAIT)
        except BaseException as exc:  # recorded for the assertion below
            outcome["exc"] = exc

    caller = threading.Thread(target=call)
    caller.start()
    trainer.wait_for(lambda m: m.get("cmd") == "hang")
    server.close()
    caller.join(WAIT)
    assert isinstance(outcome["exc"], TrainerDisconnected)
    assert outcome["exc"].message == "dashboard closed"
    assert list(server.events(timeout=None)) == []  # ended: returns at once
    with pytest.raises(TrainerDisconnected, match="dashboard is closed"):
        server.send("resume")


# ---------------------------------------------------------------- ProcessDashboard

STDIO_SCRIPT = textwrap.dedent(
    """
    import json, os, sys

    seq = 0
    def out(obj):
        sys.stdout.write(json.dumps(obj) + "\\n")
        sys.stdout.flush()

    def emit(**event):
        global seq
        seq += 1
        event.update(run_id="r1", run_gen=0, ts=0.0, session_id="sess-p", event_seq=seq)
        out(event)

    print("booting on stderr", file=sys.stderr, flush=True)
    emit(type="session_started", project="p", run_name="r1", transport=os.environ["ONTHEFLY_TRANSPORT"])
    for line in sys.stdin:
        msg = json.loads(line)
        cmd, rid = msg.get("cmd"), msg.get("id")
        if cmd == "status":
            out({"id": rid, "ok": True, "data": {"step": 3, "paused": False}})
        elif cmd == "stop":
            out({"id": rid, "ok": True, "data": {"status": "stopping"}})
            emit(type="trainingFinished", status="stopped", step=3)
            print("bye", file=sys.stderr, flush=True)
            sys.exit(7)
        elif rid:
            out({"id": rid, "ok": False, "error": "Unknown cmd: " + str(cmd), "code": "unknown_command"})
    """
)


def test_process_dashboard_speaks_stdio(tmp_path):
    script = tmp_path / "train_stdio.py"
    script.write_text(STDIO_SCRIPT)
    with ProcessDashboard([sys.executable, str(script)], env={"EXTRA_VAR": "1"}) as dash:
        started = dash.wait_for_event("session_started")
        assert started["transport"] == "stdio"
        assert dash.connected and dash.returncode is None
        assert dash.request("status") == {"step": 3, "paused": False}
        with pytest.raises(RequestError) as info:
            dash.request("bogus")
        assert info.value.code == "unknown_command"
        assert dash.request("stop") == {"status": "stopping"}
        assert dash.wait(WAIT) == 7
        assert dash.returncode == 7
        assert dash.ended and not dash.connected
        types = [e["type"] for e in dash.history()]
        assert "trainingFinished" in types
        assert dash.stderr_lines == ["booting on stderr", "bye"]
        stderr_events = [e for e in dash.history() if e.get("level") == "stderr"]
        assert [e["text"] for e in stderr_events] == ["booting on stderr", "bye"]
        assert [e["event_seq"] for e in dash.history() if "event_seq" in e] == [1, 2]
        with pytest.raises(TrainerDisconnected):
            dash.request("status")
        assert list(dash.events(timeout=None))[-1]["type"] in {"trainingFinished", "log"}


def test_process_dashboard_close_terminates_a_stuck_script(tmp_path):
    script = tmp_path / "stuck.py"
    script.write_text("import time, sys\nprint('stuck', file=sys.stderr, flush=True)\ntime.sleep(60)\n")
    dash = ProcessDashboard([sys.executable, str(script)], terminate_timeout=0.5).start()
    dash.wait_for_event(lambda e: e.get("text") == "stuck")
    dash.close()
    assert dash.returncode is not None and dash.returncode != 0
    assert dash.ended


def test_process_dashboard_close_input_lets_the_script_finish(tmp_path):
    script = tmp_path / "until_eof.py"
    script.write_text(
        "import sys, json\n"
        "print(json.dumps({'type': 'log', 'text': 'serving', 'event_seq': 1, 'session_id': 's'}), flush=True)\n"
        "n = sum(1 for _ in sys.stdin)\n"
        "print(json.dumps({'type': 'log', 'text': f'got {n} lines', 'event_seq': 2, 'session_id': 's'}), flush=True)\n"
        "sys.exit(5)\n"
    )
    with ProcessDashboard([sys.executable, str(script)]) as dash:
        dash.wait_for_event(lambda e: e.get("text") == "serving")
        dash.send("resume")
        dash.close_input()
        assert dash.wait(WAIT) == 5
        assert [e["text"] for e in dash.history()] == ["serving", "got 1 lines"]
        with pytest.raises(TrainerDisconnected):
            dash.send("resume")


def test_process_dashboard_bad_arguments():
    with pytest.raises(ValueError, match="argv must be a non-empty list"):
        ProcessDashboard([])
    with pytest.raises(ValueError, match="argv must be a non-empty list"):
        ProcessDashboard("python train.py")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="env entries must be str -> str"):
        ProcessDashboard(["python"], env={"A": 1})  # type: ignore[dict-item]
    with pytest.raises(RuntimeError, match="before start"):
        ProcessDashboard(["python"]).wait(0.1)
