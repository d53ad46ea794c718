"""Transports: moving JSON lines between this process and a dashboard (TCP, stdio, memory, off).

A channel moves bytes out and lines in; it knows nothing of commands. All channels share one
inbound decoder (`LineDecoder`) so framing rules hold on every transport: strict incremental
UTF-8, `\\n` framing, `\\r` stripped, blank lines ignored, and lines over `MAX_LINE_BYTES`
discarded while streaming and reported, leaving the connection usable.

Threads: each channel reads on its own background thread and calls its `LineSink` from there;
`send` is called by one writer thread only (the bus's) and blocks until the bytes are written
or the connection is found dead. Nothing here ever sleeps on the caller's thread.
"""

from __future__ import annotations

import codecs
import ipaddress
import logging
import os
import socket
import sys
import threading
import time
from abc import ABC, abstractmethod
from typing import Callable, Protocol, Union

from .envelope import MAX_LINE_BYTES
from .errors import ErrorCode, ProtocolError

__all__ = [
    "DEFAULT_DASHBOARD_PORT",
    "Channel",
    "LineDecoder",
    "LineSink",
    "MemoryChannel",
    "NullChannel",
    "StdioChannel",
    "TcpClientChannel",
    "channel_from_env",
    "deliver",
]

log = logging.getLogger("onthefly.control")

DEFAULT_DASHBOARD_PORT = 47621
_RECV_BYTES = 256 * 1024

#: What `LineDecoder.feed` yields: a complete line, or the reason a line was rejected.
DecodedEvent = Union[str, ProtocolError]


class LineSink(Protocol):
    """Receives what a channel reads; all three are called on the channel's reader thread."""

    def line_received(self, line: str) -> None:
        """A complete, decoded, non-blank line arrived (without its newline)."""

    def line_rejected(self, error: ProtocolError) -> None:
        """A line was dropped: over the size limit (`bad_envelope`) or not UTF-8 (`bad_json`)."""

    def connection_changed(self, connected: bool) -> None:
        """A dashboard connected or disconnected."""


class LineDecoder:
    """Incremental `\\n`-framed strict UTF-8 decoding with a line-size limit.

    Bytes are decoded as they arrive (a character split across reads is completed by the next
    feed); an oversize line is dropped as it streams in, never held whole.
    """

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        if max_line_bytes <= 0:
            raise ValueError(f"max_line_bytes must be > 0, got {max_line_bytes}")
        self.max_line_bytes = max_line_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
        self._parts: list[str] = []
        self._size = 0  # bytes of the current line seen so far
        self._oversize = False
        self._bad_utf8: str | None = None  # why the current line is not UTF-8

    def feed(self, data: bytes) -> list[DecodedEvent]:
        """Consume `data`; return the lines it completed and the rejections, in order."""
        if not isinstance(data, bytes):
            data = bytes(data)
        events: list[DecodedEvent] = []
        view = memoryview(data)
        start = 0
        while True:
            newline = data.find(b"\n", start)
            end = len(data) if newline < 0 else newline
            if end > start:
                self._consume(view[start:end])
            if newline < 0:
                return events
            self._end_line(events)
            start = newline + 1

    def reset(self) -> None:
        """Forget any partial line (a new connection starts clean)."""
        self._decoder.reset()
        self._parts.clear()
        self._size = 0
        self._oversize = False
        self._bad_utf8 = None

    @property
    def partial_bytes(self) -> int:
        """How many bytes of an unfinished line are pending."""
        return self._size

    def _consume(self, chunk: memoryview) -> None:
        offset = self._size
        self._size += len(chunk)
        if self._oversize or self._bad_utf8 is not None:
            return
        if self._size > self.max_line_bytes:
            self._oversize = True
            self._parts.clear()
            self._decoder.reset()
            return
        try:
            self._parts.append(self._decoder.decode(chunk))
        except UnicodeDecodeError as exc:
            self._reject_utf8(exc, offset)

    def _end_line(self, events: list[DecodedEvent]) -> None:
        if self._oversize:
            events.append(
                ProtocolError(
                    ErrorCode.BAD_ENVELOPE,
                    f"line of {self._size} bytes exceeds the {self.max_line_bytes}-byte limit; discarded",
                )
            )
        else:
            if self._bad_utf8 is None:
                try:
                    self._parts.append(self._decoder.decode(b"", final=True))
                except UnicodeDecodeError as exc:
                    self._reject_utf8(exc, self._size - (exc.end - exc.start))
            if self._bad_utf8 is not None:
                events.append(ProtocolError(ErrorCode.BAD_JSON, self._bad_utf8))
            else:
                line = "".join(self._parts)
                if line.endswith("\r"):
                    line = line[:-1]
                if line.strip():
                    events.append(line)
        self.reset()

    def _reject_utf8(self, exc: UnicodeDecodeError, chunk_offset: int) -> None:
        # exc.start is relative to the bytes the decoder saw, which may begin with a held-back
        # partial character; report the offset within the line, clamped to what we know.
        position = max(0, chunk_offset + exc.start)
        self._bad_utf8 = f"line is not valid UTF-8 ({exc.reason} near byte {position}); discarded"
        self._parts.clear()
        self._decoder.reset()


def deliver(sink: LineSink, events: list[DecodedEvent]) -> None:
    """Hand decoded events to `sink`; a failing sink is logged, never kills the reader."""
    for event in events:
        try:
            if isinstance(event, str):
                sink.line_received(event)
            else:
                sink.line_rejected(event)
        except Exception:  # the reader thread must survive a sink bug; the traceback is logged
            log.exception("onthefly: line sink failed on an inbound line")


def _notify_connection(sink: LineSink | None, connected: bool) -> None:
    if sink is None:
        return
    try:
        sink.connection_changed(connected)
    except Exception:  # a sink bug must not break connection handling; the traceback is logged
        log.exception("onthefly: line sink failed on connection_changed(%s)", connected)


def _stderr(message: str) -> None:
    try:
        print(f"[onthefly] {message}", file=sys.stderr, flush=True)
    except (OSError, ValueError) as exc:  # stderr closed: nowhere left to report; use logging
        log.debug("could not write to stderr (%s): %s", exc, message)


class Channel(ABC):
    """A transport to one dashboard at a time."""

    name: str = "channel"

    @abstractmethod
    def start(self, sink: LineSink) -> None:
        """Start the background threads that read (and connect); never blocks."""

    @abstractmethod
    def send(self, data: bytes) -> bool:
        """Write all of `data`; False when not connected or the connection just failed.

        Called by one writer thread only. On failure the connection is dropped (and, where the
        transport can, reconnection starts in the background); it never sleeps on the caller.
        """

    @property
    @abstractmethod
    def connected(self) -> bool:
        """Whether a dashboard is attached right now."""

    @property
    def connection_id(self) -> int:
        """Which connection this is: a number that changes with every new dashboard connection.

        The sender compares it to know when to announce and to drop replies meant for a
        connection that is gone. Transports that reconnect must override it.
        """
        return 1 if self.connected else 0

    @abstractmethod
    def close(self, timeout: float = 2.0) -> None:
        """Stop, letting the peer read what was sent (graceful shutdown)."""


# ---------------------------------------------------------------------------------------------
# TCP
# ---------------------------------------------------------------------------------------------


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
        _stderr(f"dashboard connected on {self.address}")
        _notify_connection(self._sink, True)
        decoder = LineDecoder()
        sink = self._sink
        reason = "dashboard closed the connection"
        while True:
            try:
                data = sock.recv(_RECV_BYTES)
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
            _stderr(f"dashboard disconnected from {self.address} ({reason}); reconnecting")
        _notify_connection(self._sink, False)
        self._dropped.set()


# ---------------------------------------------------------------------------------------------
# stdio
# ---------------------------------------------------------------------------------------------


class StdioChannel(Channel):
    """JSON lines on the process's original stdout and stdin.

    On construction the real stdout is duplicated to a private descriptor for the protocol, and
    fd 1 and `sys.stdout` are pointed at stderr, so the user's `print`s from then on cannot
    corrupt the stream (the session creates its channel as early as `Trainer()`).
    Stdin is read with `os.read` on a thread (no `select`, so it works on Windows too); EOF on
    stdin means the dashboard has gone. Do not read stdin yourself while this channel runs.
    """

    name = "stdio"

    def __init__(self, *, stdin_fd: int = 0, stdout_fd: int = 1) -> None:
        self._stdin_fd = stdin_fd
        self._stdout_fd = stdout_fd
        self._out_fd: int | None = None
        self._connected = False
        self._sink: LineSink | None = None
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()
        self._started = False
        self._take_over_stdout()

    @property
    def connected(self) -> bool:
        return self._connected

    def _take_over_stdout(self) -> None:
        for stream in (sys.stdout, sys.__stdout__):
            if stream is not None:
                try:
                    stream.flush()
                except (OSError, ValueError) as exc:
                    log.debug("onthefly: could not flush stdout before taking it over: %s", exc)
        self._out_fd = os.dup(self._stdout_fd)  # not inheritable: child processes cannot write to it
        os.dup2(2, self._stdout_fd)
        sys.stdout = sys.stderr

    def start(self, sink: LineSink) -> None:
        if self._started:
            raise RuntimeError("StdioChannel.start() called twice")
        if self._out_fd is None:
            raise RuntimeError("StdioChannel.start() after close()")
        self._started = True
        self._sink = sink
        self._connected = True
        _notify_connection(sink, True)
        self._reader = threading.Thread(target=self._read_loop, name="onthefly-stdin", daemon=True)
        self._reader.start()

    def send(self, data: bytes) -> bool:
        fd = self._out_fd
        if fd is None or not self._connected:
            return False
        view = memoryview(data)
        try:
            while view:
                written = os.write(fd, view)
                view = view[written:]
        except OSError as exc:
            self._disconnect(f"stdout write failed: {exc}")
            return False
        return True

    def close(self, timeout: float = 2.0) -> None:
        with self._lock:
            fd, self._out_fd = self._out_fd, None
        self._disconnect(None)
        if fd is not None:
            try:
                os.close(fd)  # the protocol stream ends: the parent sees EOF
            except OSError as exc:
                log.debug("onthefly: closing the protocol fd failed: %s", exc)

    def _read_loop(self) -> None:
        decoder = LineDecoder()
        sink = self._sink
        while self._connected:
            try:
                data = os.read(self._stdin_fd, _RECV_BYTES)
            except OSError as exc:
                self._disconnect(f"stdin read failed: {exc}")
                return
            if not data:
                self._disconnect(None)
                return
            if sink is not None:
                deliver(sink, decoder.feed(data))

    def _disconnect(self, reason: str | None) -> None:
        with self._lock:
            was, self._connected = self._connected, False
        if was:
            if reason:
                _stderr(f"stdio dashboard lost ({reason})")
            _notify_connection(self._sink, False)


# ---------------------------------------------------------------------------------------------
# off and in-memory
# ---------------------------------------------------------------------------------------------


class NullChannel(Channel):
    """No wire at all (`ONTHEFLY_TRANSPORT=off`): events only reach the event log."""

    name = "off"

    def start(self, sink: LineSink) -> None:
        self._sink = sink

    def send(self, data: bytes) -> bool:
        return False

    @property
    def connected(self) -> bool:
        return False

    def close(self, timeout: float = 2.0) -> None:
        return None


class MemoryChannel(Channel):
    """An in-process dashboard for tests, going through the same decoding as real transports.

    `connect()`/`disconnect()` simulate a dashboard; while connected, `send` appends each line
    it carries to `sent`. `inject(line)` delivers an inbound line on the calling thread.
    """

    name = "memory"

    def __init__(self) -> None:
        self.sent: list[str] = []
        #: How many `send` calls succeeded (one per coalesced batch).
        self.send_calls = 0
        self._connected = False
        self._sink: LineSink | None = None
        self._cond = threading.Condition()
        self._inbound = LineDecoder()
        self._inject_lock = threading.Lock()
        self._outbound = LineDecoder()
        self._fail_sends = 0
        #: How many times `connect()` attached a dashboard.
        self.connections = 0

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def connection_id(self) -> int:
        return self.connections

    def start(self, sink: LineSink) -> None:
        self._sink = sink

    def connect(self) -> None:
        with self._cond:
            if self._connected:
                return
            self._connected = True
            self.connections += 1
            self._outbound.reset()
        _notify_connection(self._sink, True)

    def disconnect(self) -> None:
        with self._cond:
            if not self._connected:
                return
            self._connected = False
            self._cond.notify_all()
        _notify_connection(self._sink, False)

    def fail_next_sends(self, count: int = 1) -> None:
        """Make the next `count` sends fail as a dead socket would (and disconnect)."""
        with self._cond:
            self._fail_sends = count

    def send(self, data: bytes) -> bool:
        with self._cond:
            if not self._connected:
                return False
            failing = self._fail_sends > 0
            if failing:
                self._fail_sends -= 1
            else:
                for event in self._outbound.feed(bytes(data)):
                    if not isinstance(event, str):
                        raise AssertionError(f"MemoryChannel received a bad outbound line: {event}")
                    self.sent.append(event)
                self.send_calls += 1
                self._cond.notify_all()
        if failing:
            self.disconnect()
            return False
        return True

    def inject(self, line: str | bytes) -> None:
        """Deliver inbound bytes as if a dashboard had written them (a newline is added to str)."""
        data = line.encode("utf-8") + b"\n" if isinstance(line, str) else line
        if self._sink is None:
            raise RuntimeError("MemoryChannel.inject() before start(): no sink to deliver to")
        with self._inject_lock:
            deliver(self._sink, self._inbound.feed(data))

    def wait_for(self, predicate: Callable[[list[str]], bool], timeout: float = 5.0) -> bool:
        """Block until `predicate(sent)` is true; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.sent), timeout)

    def close(self, timeout: float = 2.0) -> None:
        self.disconnect()


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
