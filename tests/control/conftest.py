"""Shared fixtures for the control-plane tests: a loopback stand-in dashboard and bus factories."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from typing import Callable, Iterator

import pytest

from onthefly.control import ControlBus, MemoryChannel, TcpClientChannel

WAIT = 15.0  # upper bound for any wait in these tests; they normally finish in milliseconds


class LineServer:
    """A minimal dashboard: listens on 127.0.0.1 (port 0 → chosen by the OS), one connection at a
    time, and records every line it reads. On EOF it closes its side (like Node's net.Socket).

    `on_line(server, line)` is called on the server thread for each line (for gap-fill logic).
    """

    def __init__(self, on_line: Callable[["LineServer", str], None] | None = None) -> None:
        self.on_line = on_line
        self.lines: list[str] = []
        self.accepted = 0
        self.cond = threading.Condition()
        self.conn: socket.socket | None = None
        self._stop = False
        self._listener = self._listen(0)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="test-dashboard", daemon=True)
        self._thread.start()

    @staticmethod
    def _listen(port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(8)
        return sock

    # ---- server thread ----
    def _serve(self) -> None:
        while not self._stop:
            listener = self._listener
            if listener is None:
                with self.cond:
                    self.cond.wait_for(lambda: self._listener is not None or self._stop, WAIT)
                continue
            try:
                conn, _ = listener.accept()
            except OSError:
                continue  # listener closed (stop_listening / close)
            with self.cond:
                self.conn = conn
                self.accepted += 1
                self.cond.notify_all()
            self._read(conn)

    def _read(self, conn: socket.socket) -> None:
        buffer = b""
        while True:
            try:
                data = conn.recv(1 << 16)
            except OSError:
                break
            if not data:
                break
            buffer += data
            *complete, buffer = buffer.split(b"\n")
            for raw in complete:
                line = raw.decode("utf-8")
                with self.cond:
                    if self.conn is not conn:
                        break  # killed by on_line: the rest of this read is lost, as in a crash
                    self.lines.append(line)
                    self.cond.notify_all()
                if self.on_line is not None:
                    self.on_line(self, line)
        with self.cond:
            if self.conn is conn:
                self.conn = None
            self.cond.notify_all()
        conn.close()  # close() of a dead socket does not raise

    # ---- test thread ----
    def wait_for(self, predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def wait_connected(self, count: int = 1, timeout: float = WAIT) -> bool:
        return self.wait_for(lambda: self.accepted >= count and self.conn is not None, timeout)

    def send(self, data: bytes) -> None:
        with self.cond:
            conn = self.conn
        assert conn is not None, "no backend connected"
        conn.sendall(data)

    def send_json(self, obj: dict) -> None:
        self.send(json.dumps(obj).encode("utf-8") + b"\n")

    def messages(self) -> list[dict]:
        with self.cond:
            return [json.loads(line) for line in self.lines]

    def replies(self) -> dict[str, dict]:
        return {m["id"]: m for m in self.messages() if "ok" in m}

    def events(self, type: str | None = None) -> list[dict]:
        return [m for m in self.messages() if "type" in m and (type is None or m["type"] == type)]

    def kill(self) -> None:
        """Abort the current connection with a RST (data in flight is lost)."""
        with self.cond:
            conn, self.conn = self.conn, None
        if conn is not None:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    def close_gracefully(self) -> None:
        """Close the current connection with a FIN after everything sent to it was read."""
        with self.cond:
            conn = self.conn
        if conn is not None:
            conn.shutdown(socket.SHUT_RDWR)

    def stop_listening(self) -> None:
        with self.cond:
            listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept (Linux)
            except OSError:
                pass  # not every platform allows shutdown on a listener; close still stops it
            listener.close()

    def listen_again(self) -> None:
        with self.cond:
            self._listener = self._listen(self.port)
            self.cond.notify_all()

    def close(self) -> None:
        self._stop = True
        self.stop_listening()
        with self.cond:
            conn = self.conn
        if conn is not None:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes the server thread blocked in recv
            except OSError:
                conn.close()  # already dead; closing is all that is left to do
        with self.cond:
            self.cond.notify_all()
        self._thread.join(WAIT)


@pytest.fixture
def line_server() -> Iterator[Callable[..., LineServer]]:
    """Factory for `LineServer`s, all closed at teardown."""
    servers: list[LineServer] = []

    def make(**kwargs) -> LineServer:
        server = LineServer(**kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def make_bus() -> Iterator[Callable[..., ControlBus]]:
    """Factory for started `ControlBus`es, all closed at teardown."""
    buses: list[ControlBus] = []

    def make(channel=None, **kwargs) -> ControlBus:
        bus = ControlBus(channel if channel is not None else MemoryChannel(), **kwargs)
        bus.start()
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        bus.close(timeout=2.0)


@pytest.fixture
def tcp_bus(line_server, make_bus) -> Callable[..., tuple[LineServer, ControlBus]]:
    """A started bus connected over loopback TCP to a fresh `LineServer`."""

    def make(server: LineServer | None = None, **kwargs) -> tuple[LineServer, ControlBus]:
        server = server or line_server()
        channel = TcpClientChannel(port=server.port, reconnect_initial=0.01, reconnect_max=0.1)
        bus = make_bus(channel, **kwargs)
        assert server.wait_connected(), "backend never connected"
        assert wait_until(lambda: bus.connected), "bus never saw the connection"
        return server, bus

    return make


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    """A bounded polling wait, for state no condition variable announces (e.g. `bus.connected`)."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= end:
            return False
        time.sleep(0.002)
    return True


@pytest.fixture
def waiter() -> Callable[..., bool]:
    return wait_until
