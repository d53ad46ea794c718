"""A dashboard that stops reading: the event log stays complete, memory stays bounded, order holds.

The dashboard here is a real loopback socket that accepts and then does not read, so the
backend's `sendall` blocks exactly as it would against a frozen VS Code window.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

from onthefly.control import ControlBus, EventLog, TcpClientChannel

from .conftest import WAIT, wait_until

PAD = "p" * 8000  # ~8 KB per event: a few thousand overflow every socket buffer on the way


class SilentDashboard:
    """Accepts one connection and reads nothing until `start_reading()`; then records every line."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # small window: stalls sooner
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.conn: socket.socket | None = None
        self.lines: list[str] = []
        self._reader: threading.Thread | None = None
        self._accepted = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.conn, _ = self.listener.accept()
        self._accepted.set()

    def wait_accepted(self) -> bool:
        return self._accepted.wait(WAIT)

    def start_reading(self) -> None:
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buffer = b""
        assert self.conn is not None
        while True:
            try:
                data = self.conn.recv(1 << 20)
            except OSError:
                return
            if not data:
                return
            buffer += data
            *complete, buffer = buffer.split(b"\n")
            self.lines.extend(raw.decode("utf-8") for raw in complete)

    def messages(self) -> list[dict]:
        return [json.loads(line) for line in list(self.lines)]

    def send(self, obj: dict) -> None:
        assert self.conn is not None
        self.conn.sendall(json.dumps(obj).encode("utf-8") + b"\n")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


def stalled_bus(dashboard: SilentDashboard, tmp_path, **kwargs) -> ControlBus:
    bus = ControlBus(
        TcpClientChannel(port=dashboard.port, reconnect_initial=0.01),
        event_log=EventLog(tmp_path / "events.db"),
        **kwargs,
    )
    bus.start()
    assert dashboard.wait_accepted() and wait_until(lambda: bus.connected)
    return bus


def emit_until_stalled(bus: ControlBus, count: int) -> None:
    for i in range(1, count + 1):
        bus.emit("trainStep", {"step": i, "pad": PAD})
        if i % 200 == 0:
            time.sleep(0.005)  # a training loop's pace


def test_a_stalled_dashboard_never_holds_up_the_event_log_and_memory_stays_bounded(tmp_path):
    dashboard = SilentDashboard()
    bus = stalled_bus(dashboard, tmp_path, window_bytes=256 * 1024)
    try:
        emit_until_stalled(bus, 3000)  # ~24 MB: far more than the socket buffers hold
        # The log is complete and current while the sender is stuck in sendall.
        assert bus.flush(2.0, wire=False), "persisting waited on the socket"
        assert bus.event_log.count() == 3000 and bus.event_log.last_seq() == 3000
        assert bus.sent_seq < 3000, "the dashboard was never stalled; the test proves nothing"
        assert bus.buffered_bytes <= 256 * 1024
        # Another process sees the same: events.db is readable and current during the stall.
        with sqlite3.connect(str(tmp_path / "events.db")) as reader:
            assert reader.execute("SELECT MAX(seq), COUNT(*) FROM events").fetchone() == (3000, 3000)
        # A request arrives during the stall; its reply must follow every event emitted before it.
        dashboard.send({"id": "q1", "cmd": "status"})
        request = bus.next_request(timeout=WAIT)
        assert request is not None and request.id == "q1"
        bus.reply("q1", {"step": 3000})
        for i in range(3001, 3101):
            bus.emit("trainStep", {"step": i, "pad": PAD})
        assert bus.buffered_bytes <= 256 * 1024 + 4096
        dashboard.start_reading()
        assert bus.flush(WAIT), "the backlog was never delivered"
        assert wait_until(lambda: len(dashboard.lines) == 3101)
        messages = dashboard.messages()
        seqs = [m["event_seq"] for m in messages if "event_seq" in m]
        assert seqs == list(range(1, 3101))  # every event once, in order, memory or log
        reply_at = next(i for i, m in enumerate(messages) if m.get("id") == "q1")
        assert reply_at == 3000 and messages[reply_at] == {"id": "q1", "ok": True, "data": {"step": 3000}}
        assert bus.replayed_events > 0  # part of the backlog really came from the log
    finally:
        bus.close(timeout=2.0)
        bus.event_log.close()
        dashboard.close()


def test_replies_during_a_stall_are_bounded_and_counted(tmp_path):
    dashboard = SilentDashboard()
    bus = stalled_bus(dashboard, tmp_path, window_bytes=64 * 1024, reply_window_bytes=64 * 1024)
    try:
        emit_until_stalled(bus, 3000)
        assert bus.flush(2.0, wire=False)
        assert bus.sent_seq < 3000
        big = {"blob": "r" * 1000}
        for i in range(200):  # ~200 KB of replies against a 64 KB bound
            bus.reply(f"r{i}", big)
        assert bus.flush(2.0, wire=False)
        assert bus.buffered_bytes <= 2 * 64 * 1024
        assert bus.dropped_replies >= 200 - 64
    finally:
        bus.close(timeout=1.0)
        bus.event_log.close()
        dashboard.close()


def test_close_is_bounded_during_a_stall_and_keeps_the_log(tmp_path):
    dashboard = SilentDashboard()
    bus = stalled_bus(dashboard, tmp_path)
    try:
        emit_until_stalled(bus, 3000)
        started = time.monotonic()
        bus.close(timeout=1.0)
        assert time.monotonic() - started < 5.0
        assert bus.event_log.count() == 3000
    finally:
        bus.event_log.close()
        dashboard.close()


KILLED_CHILD = textwrap.dedent(
    """
    import sys, time
    from onthefly.control import ControlBus, EventLog, TcpClientChannel
    bus = ControlBus(TcpClientChannel(port=int(sys.argv[1]), reconnect_initial=0.01),
                     event_log=EventLog(sys.argv[2]))
    bus.start()
    deadline = time.monotonic() + 10
    while not bus.connected and time.monotonic() < deadline:
        time.sleep(0.005)
    i = 0
    while True:
        i += 1
        bus.emit("trainStep", {"step": i, "pad": "k" * 4000})
        if i % 20 == 0:
            print(i, time.time(), bus.sent_seq, flush=True)
            time.sleep(0.01)  # ~2,000 events (8 MB) a second: stalls within a couple of seconds
    """
)


def test_kill_9_during_a_stall_loses_at_most_the_last_linger_interval(tmp_path):
    dashboard = SilentDashboard()
    db = tmp_path / "events.db"
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_CHILD, str(dashboard.port), str(db)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert dashboard.wait_accepted()
        reports: list[tuple[int, float, int]] = []
        deadline = time.monotonic() + 30
        stalled_since = None
        # Run until the dashboard has stalled (the sent seq stops moving) for two seconds.
        while time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            step, wall, sent = line.split()
            reports.append((int(step), float(wall), int(sent)))
            if len(reports) > 1 and reports[-2][2] == int(sent):
                stalled_since = stalled_since or float(wall)
            else:
                stalled_since = None
            if stalled_since is not None and float(wall) - stalled_since > 2.0:
                break
        child.send_signal(signal.SIGKILL)
        child.wait(WAIT)
        assert stalled_since is not None, child.stderr.read()
        killed_at = reports[-1][1]
        assert reports[-1][2] < reports[-1][0] - 1000  # the dashboard was far behind
        with sqlite3.connect(str(db)) as reader:
            last, count = reader.execute("SELECT MAX(seq), COUNT(*) FROM events").fetchone()
            body = reader.execute("SELECT body FROM events WHERE seq = ?", (last,)).fetchone()[0]
        assert count == last  # complete: no holes
        # Events reported as emitted well before the kill (older than a few linger intervals
        # plus scheduling slack on a shared machine) are all on disk.
        settled = [step for step, wall, _ in reports if wall <= killed_at - 1.0]
        assert settled and last >= settled[-1]
        assert killed_at - json.loads(body)["ts"] < 1.0
    finally:
        if child.poll() is None:
            child.kill()
        dashboard.close()
