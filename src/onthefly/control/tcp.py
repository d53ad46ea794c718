"""The TCP transport: connect out to a dashboard on loopback, reconnecting in the background.

The dashboard (the VS Code extension, `onthefly listen`/`dashboard`, or a test) listens; the
training process connects out and retries without ever blocking the training thread. Remote
hosts are refused unless the user asks for them.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
import time

from .channels import (
    DEFAULT_DASHBOARD_PORT,
    RECV_BYTES,
    Channel,
    LineDecoder,
    LineSink,
    NullChannel,
    StdioChannel,
    deliver,
    notify_connection,
    stderr_note,
)

__all__ = ["TcpClientChannel", "channel_from_env", "dashboard_port_from_env", "is_loopback_host"]

log = logging.getLogger("onthefly.control")


def is_loopback_host(host: str) -> bool:
    """True for `localhost` and literal loopback addresses (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def dashboard_port_from_env() -> int:
    """`ONTHEFLY_DASHBOARD_PORT` when it is an integer in 1..65535, else 47621."""
    raw = os.environ.get("ONTHEFLY_DASHBOARD_PORT", "").strip()
    if not raw:
        return DEFAULT_DASHBOARD_PORT
    try:
        port = int(raw)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        log.warning(
            "onthefly: ONTHEFLY_DASHBOARD_PORT=%r is not a port number (1..65535); using %d",
            raw,
            DEFAULT_DASHBOARD_PORT,
        )
        return DEFAULT_DASHBOARD_PORT
    return port


class TcpClientChannel(Channel):
    """Connects out to a dashboard listening on TCP, and keeps reconnecting in the background.

    A connector thread retries with capped exponential backoff; each connection gets its own
    reader thread. Sockets are blocking with no timeout, so a `sendall` either writes the whole
    batch or reports the connection dead (a line is never split by a timeout).
    """

    name = "tcp"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        connect_timeout: float = 1.0,
        reconnect_initial: float = 0.1,
        reconnect_max: float = 2.0,
        allow_remote: bool = False,
    ) -> None:
        if not isinstance(host, str) or not host.strip():
            raise ValueError(f"dashboard host must be a non-empty string, got {host!r}")
        if not allow_remote and not is_loopback_host(host):
            raise ValueError(
                f"refusing to connect to non-loopback dashboard host {host!r}: the protocol has no "
                "authentication; pass allow_remote=True if you really mean it"
            )
        if port is None:
            port = dashboard_port_from_env()
        elif isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"dashboard port must be an integer in 1..65535, got {port!r}")
        for label, value in (
            ("connect_timeout", connect_timeout),
            ("reconnect_initial", reconnect_initial),
            ("reconnect_max", reconnect_max),
        ):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{label} must be a positive number of seconds, got {value!r}")
        if reconnect_initial > reconnect_max:
            raise ValueError(
                f"reconnect_initial ({reconnect_initial}) must not exceed reconnect_max ({reconnect_max})"
            )
        self.host = host.strip()
        self.port = port
        self.connect_timeout = float(connect_timeout)
        self.reconnect_initial = float(reconnect_initial)
        self.reconnect_max = float(reconnect_max)
        self._sink: LineSink | None = None
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._connector: threading.Thread | None = None
        self._stop = threading.Event()
        self._dropped = threading.Event()  # set when the connector should (re)connect
        self._dropped.set()
        #: How many connections were made so far (for tests and diagnostics).
        self.connections = 0

    @property
    def address(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    @property
    def connection_id(self) -> int:
        return self.connections

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def start(self, sink: LineSink) -> None:
        if self._connector is not None:
            raise RuntimeError("TcpClientChannel.start() called twice")
        self._sink = sink
        self._connector = threading.Thread(target=self._connect_loop, name="onthefly-connect", daemon=True)
        self._connector.start()

    def send(self, data: bytes) -> bool:
        sock = self._sock
        if sock is None:
            return False
        try:
            sock.sendall(data)
        except OSError as exc:
            self._drop(sock, f"send failed: {exc}")
            return False
        return True

    def close(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._dropped.set()  # wake the connector so it sees the stop flag
        with self._lock:
            sock = self._sock
            reader = self._reader
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_WR)  # FIN after everything already sent
            except OSError as exc:
                log.debug("onthefly: shutdown(SHUT_WR) failed: %s", exc)
            # Let the peer read to the end and close its side; our reader sees EOF and drops.
            if reader is not None and reader is not threading.current_thread():
                reader.join(timeout)
            self._drop(sock, "closed")
        connector = self._connector
        if connector is not None and connector is not threading.current_thread():
            connector.join(timeout)

    # ---- background ----------------------------------------------------------------------
    def _connect_loop(self) -> None:
        delay = self.reconnect_initial
        while not self._stop.is_set():
            self._dropped.wait()
            if self._stop.is_set():
                return
            try:
                sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
            except OSError:
                self._stop.wait(delay)
                delay = min(delay * 2, self.reconnect_max)
                continue
            try:
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:
                log.debug("onthefly: socket setup failed (%s); retrying", exc)
                sock.close()
                continue
            connected_at = time.monotonic()
            with self._lock:
                if self._stop.is_set():
                    sock.close()
                    return
                self._sock = sock
                self._dropped.clear()
                self.connections += 1
                # Started under the lock so `close` never sees a reader it cannot join; the
                # reader announces the connection itself, so the sink hears it before any line.
                self._reader = threading.Thread(
                    target=self._read_loop, args=(sock,), name="onthefly-reader", daemon=True
                )
                self._reader.start()
            self._dropped.wait()
            # A connection that dies at once (e.g. the dashboard refuses a second trainer) must
            # not turn into a hot reconnect loop: keep backing off until one lasts.
            if time.monotonic() - connected_at >= self.reconnect_max:
                delay = self.reconnect_initial
            elif not self._stop.is_set():
                self._stop.wait(delay)
                delay = min(delay * 2, self.reconnect_max)

    def _read_loop(self, sock: socket.socket) -> None:
        stderr_note(f"dashboard connected on {self.address}")
        notify_connection(self._sink, True)
        decoder = LineDecoder()
        sink = self._sink
        reason = "dashboard closed the connection"
        while True:
            try:
                data = sock.recv(RECV_BYTES)
            except OSError as exc:
                reason = f"receive failed: {exc}"
                break
            if not data:
                break
            if sink is not None:
                deliver(sink, decoder.feed(data))
        self._drop(sock, reason)

    def _drop(self, sock: socket.socket, reason: str) -> None:
        """Retire `sock` once: close it, tell the sink, let the connector reconnect."""
        with self._lock:
            current = self._sock is sock
            if current:
                self._sock = None
        if not current:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            log.debug("onthefly: shutdown of a dead socket failed (already closed)")
        sock.close()
        if not self._stop.is_set():
            stderr_note(f"dashboard disconnected from {self.address} ({reason}); reconnecting")
        notify_connection(self._sink, False)
        self._dropped.set()


def channel_from_env() -> Channel:
    """The channel `ONTHEFLY_TRANSPORT` asks for: `tcp` (default), `stdio` or `off`."""
    raw = os.environ.get("ONTHEFLY_TRANSPORT", "")
    kind = raw.strip().lower() or "tcp"
    if kind == "tcp":
        return TcpClientChannel()
    if kind == "stdio":
        return StdioChannel()
    if kind == "off":
        return NullChannel()
    raise ValueError(f"ONTHEFLY_TRANSPORT={raw!r} is not a transport; expected one of tcp, stdio, off")
