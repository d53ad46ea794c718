"""Transports: moving JSON lines between this process and a dashboard (stdio, memory, off; TCP in `tcp`).

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
import logging
import os
import sys
import threading
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
    "deliver",
]

log = logging.getLogger("onthefly.control")

DEFAULT_DASHBOARD_PORT = 47621
RECV_BYTES = 256 * 1024

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


def notify_connection(sink: LineSink | None, connected: bool) -> None:
    if sink is None:
        return
    try:
        sink.connection_changed(connected)
    except Exception:  # a sink bug must not break connection handling; the traceback is logged
        log.exception("onthefly: line sink failed on connection_changed(%s)", connected)


def stderr_note(message: str) -> None:
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
        notify_connection(sink, True)
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
                data = os.read(self._stdin_fd, RECV_BYTES)
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
                stderr_note(f"stdio dashboard lost ({reason})")
            notify_connection(self._sink, False)


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
        notify_connection(self._sink, True)

    def disconnect(self) -> None:
        with self._cond:
            if not self._connected:
                return
            self._connected = False
            self._cond.notify_all()
        notify_connection(self._sink, False)

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


