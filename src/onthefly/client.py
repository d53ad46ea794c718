"""The dashboard end of the wire: listen for (or spawn) a training process, send it commands, receive its events.

Two front ends share one engine (`DashboardBase`), which talks JSON lines over a pair of byte
streams:

- `DashboardServer` listens on TCP (127.0.0.1, `ONTHEFLY_DASHBOARD_PORT` or 47621) and accepts one
  training process at a time; the same process may reconnect after a drop.
- `ProcessDashboard` starts a training script with `ONTHEFLY_TRANSPORT=stdio` and speaks the
  protocol on its stdin/stdout; the script's stderr becomes `log` events with `level: "stderr"`.

Events are delivered exactly once and in `event_seq` order across reconnects: duplicates are
dropped, and a gap is filled with the `events_since` command, run as a small state machine on the
reader thread so the reply (which arrives on the same stream) is never waited for there.
This module is pure Python; it must not import torch.
"""

from __future__ import annotations

import abc
import json
import logging
import os
import queue
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from .control.channels import is_loopback_host  # no torch: the client stays light

__all__ = [
    "DEFAULT_PORT",
    "PORT_ENV",
    "MAX_LINE_BYTES",
    "RequestError",
    "TrainerDisconnected",
    "DashboardBase",
    "DashboardServer",
    "ProcessDashboard",
    "resolve_port",
]

logger = logging.getLogger(__name__)

DEFAULT_PORT = 47621
PORT_ENV = "ONTHEFLY_DASHBOARD_PORT"
MAX_LINE_BYTES = 16 * 1024 * 1024
DISCONNECTED = "disconnected"

# A trainer that has just dropped its socket may still have its reader winding down when it
# reconnects; give the old link this long to finish before refusing the new one as a second trainer.
ADMIT_GRACE_S = 0.5
# Bounded wait for a socket write; a trainer that stops reading for this long is treated as gone.
SEND_TIMEOUT_S = 10.0
# After a completed gap fill the live buffer may still start past last_seq when the trainer's
# event store lagged its wire; ask once more before accepting the gap as unrecoverable.
MAX_FILL_ROUNDS = 2


class RequestError(Exception):
    """A request was answered with `ok: false` (or could not be answered).

    `code` is the wire's error code (`bad_payload`, `not_paused`, ...), `message` the trainer's
    text and `data` the raw reply object.
    """

    def __init__(
        self, cmd: str, message: str, code: str | None = None, data: dict[str, Any] | None = None
    ) -> None:
        suffix = f" [{code}]" if code else ""
        super().__init__(f"{cmd}: {message}{suffix}")
        self.cmd = cmd
        self.code = code
        self.message = message
        self.data: dict[str, Any] = dict(data) if data else {}


class TrainerDisconnected(RequestError):
    """The trainer went away (or was never there) while a request needed it; code `disconnected`."""

    def __init__(self, cmd: str, message: str = "trainer disconnected") -> None:
        super().__init__(cmd, message, DISCONNECTED, {})


def resolve_port(port: int | None) -> int:
    """The port to listen on: `port` itself, else `$ONTHEFLY_DASHBOARD_PORT`, else 47621."""
    if port is None:
        raw = os.environ.get(PORT_ENV, "").strip()
        if not raw:
            return DEFAULT_PORT
        try:
            port = int(raw)
        except ValueError:
            raise ValueError(f"{PORT_ENV} must be an integer port, got {raw!r}") from None
        where = PORT_ENV
    else:
        where = "port"
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"{where} must be an int, got {type(port).__name__}")
    if not 0 <= port <= 65535:
        raise ValueError(f"{where} must be in 0..65535, got {port}")
    return port


def encode_request(cmd: str, payload: dict[str, Any] | None, request_id: str | None) -> bytes:
    """One wire line for a command; fire-and-forget when `request_id` is None."""
    if not isinstance(cmd, str) or not cmd.strip():
        raise ValueError(f"cmd must be a non-empty string, got {cmd!r}")
    if payload is not None and not isinstance(payload, dict):
        raise TypeError(f"payload for {cmd!r} must be a dict, got {type(payload).__name__}")
    msg: dict[str, Any] = {}
    if request_id is not None:
        msg["id"] = request_id
    msg["cmd"] = cmd
    if payload is not None or request_id is not None:
        msg["payload"] = payload if payload is not None else {}
    try:
        text = json.dumps(msg, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"payload for {cmd!r} cannot be sent as JSON: {exc}") from exc
    return (text + "\n").encode("utf-8")


def set_send_timeout(conn: socket.socket, seconds: float) -> None:
    """Bound blocking sends only (SO_SNDTIMEO), so a trainer that stops reading is cut off.

    `socket.settimeout` would also bound the reader thread's blocking reads, so it is not used.
    """
    if sys.platform == "win32":
        value = struct.pack("I", int(seconds * 1000))
    else:
        value = struct.pack("ll", int(seconds), int((seconds % 1) * 1_000_000))
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
    except OSError as exc:  # platform without SO_SNDTIMEO: sends stay unbounded, which is only slower to fail
        logger.debug("SO_SNDTIMEO not supported: %s", exc)


def _seq_of(event: dict[str, Any]) -> int | None:
    seq = event.get("event_seq")
    if isinstance(seq, int) and not isinstance(seq, bool):
        return seq
    return None


class _Link:
    """One trainer connection: a binary line source plus a writer that never interleaves lines."""

    def __init__(
        self,
        reader: BinaryIO,
        write: Callable[[bytes], None],
        shutdown: Callable[[], None],
        release: Callable[[], None],
        peer: str,
    ) -> None:
        self.reader = reader
        self.peer = peer
        self.thread: threading.Thread | None = None
        self._write = write
        self._shutdown = shutdown
        self._release = release
        self._write_lock = threading.Lock()
        self._down = False

    def write_line(self, data: bytes) -> None:
        """Write one whole line; on failure the link is shut down (a partial line poisons it)."""
        with self._write_lock:
            if self._down:
                raise BrokenPipeError(f"link to {self.peer} is closed")
            try:
                self._write(data)
            except (OSError, ValueError) as exc:  # ValueError: the pipe was closed under us
                self._down = True
                self._shutdown()
                if isinstance(exc, OSError):
                    raise
                raise BrokenPipeError(f"link to {self.peer} is closed") from exc

    def shutdown(self) -> None:
        """Stop both directions so the reader thread sees end of stream."""
        self._down = True
        self._shutdown()

    def release(self) -> None:
        """Free the OS resources (called once the reader thread has finished)."""
        self._release()


class _Pending:
    """A request waiting for its reply; `on_done` runs on the thread that completes it."""

    __slots__ = ("cmd", "link", "done", "reply", "error", "on_done")

    def __init__(
        self,
        cmd: str,
        link: _Link,
        on_done: Callable[[_Pending], None] | None = None,
    ) -> None:
        self.cmd = cmd
        self.link = link
        self.done = threading.Event()
        self.reply: Any = None
        self.error: RequestError | None = None
        self.on_done = on_done

    def finish(self, reply: Any = None, error: RequestError | None = None) -> None:
        self.reply = reply
        self.error = error
        self.done.set()
        if self.on_done is not None:
            self.on_done(self)


class _GapFill:
    """An `events_since` recovery in progress: live events are buffered until it completes."""

    def __init__(self, link: _Link, cursor: int) -> None:
        self.link = link
        self.cursor = cursor
        self.buffer: list[dict[str, Any]] = []
        self.rounds = 1
        self.recovered = 0


_STOP = object()


class DashboardBase(abc.ABC):
    """The shared engine: requests and replies, ordered exactly-once events, callbacks.

    Subclasses provide the transport (`start`, `_close_transport`) and hand each new trainer
    stream to `_attach`. `keep_events` bounds `received` for long sessions: the oldest events
    are discarded, while indices (`since`, `delivered_count`) keep counting from the first event.
    """

    def __init__(self, *, keep_events: int | None = None) -> None:
        if keep_events is not None and (
            isinstance(keep_events, bool) or not isinstance(keep_events, int) or keep_events < 1
        ):
            raise ValueError(f"keep_events must be a positive int or None, got {keep_events!r}")
        self._keep = keep_events
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._link: _Link | None = None
        self._pending: dict[str, _Pending] = {}
        self._received: list[dict[str, Any]] = []
        self._trimmed = 0
        self._iter_cursor = 0
        self._last_seq = 0
        self._seq_session: Any = None
        self._fill: _GapFill | None = None
        self._refill_on_connect = False
        self._started = False
        self._closed = False
        self._ended = False
        self._connections = 0
        self.duplicates_dropped = 0
        self.late_replies = 0
        self._event_callbacks: list[Callable[[dict[str, Any]], None]] = []
        self._conn_callbacks: list[Callable[[bool], None]] = []
        self._dispatch_q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._dispatcher: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    @abc.abstractmethod
    def start(self) -> DashboardBase:
        """Open the transport and return self."""

    def _close_transport(self) -> None:
        """Stop accepting or producing new trainer streams (subclass hook)."""

    def _after_link_closed(self, link: _Link) -> None:
        """Runs on the reader thread after a link ended (subclass hook)."""

    def close(self) -> None:
        """Disconnect, fail pending requests, stop threads. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            link = self._link
            pending = list(self._pending.values())
            self._pending.clear()
            self._fill = None
            self._cond.notify_all()
        for p in pending:
            p.finish(error=TrainerDisconnected(p.cmd, "dashboard closed"))
        self._close_transport()
        if link is not None:
            link.shutdown()
            if link.thread is not None and link.thread is not threading.current_thread():
                link.thread.join(timeout=5.0)
        with self._lock:
            self._ended = True
            self._cond.notify_all()
        dispatcher = self._dispatcher
        if dispatcher is not None:
            self._dispatch_q.put(_STOP)
            if dispatcher is not threading.current_thread():
                dispatcher.join(timeout=5.0)

    def __enter__(self) -> DashboardBase:
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ state

    @property
    def connected(self) -> bool:
        """Whether a trainer stream is attached right now."""
        with self._lock:
            return self._link is not None

    @property
    def connection_count(self) -> int:
        """How many trainer connections have been accepted so far (reconnects included)."""
        with self._lock:
            return self._connections

    @property
    def ended(self) -> bool:
        """True once no more events can arrive (closed, or the trainer process finished)."""
        with self._lock:
            return self._ended

    @property
    def last_seq(self) -> int:
        """The highest `event_seq` delivered in the current trainer session."""
        with self._lock:
            return self._last_seq

    @property
    def received(self) -> list[dict[str, Any]]:
        """Every delivered event, in order (the live list; use `history()` for a snapshot)."""
        return self._received

    @property
    def delivered_count(self) -> int:
        """How many events have been delivered in total (the next event's index)."""
        with self._lock:
            return self._trimmed + len(self._received)

    def history(self) -> list[dict[str, Any]]:
        """A snapshot copy of `received`."""
        with self._lock:
            return list(self._received)

    def wait_connected(self, timeout: float = 10.0) -> None:
        """Block until a trainer is attached; TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._link is None:
                if self._ended:
                    raise TrainerDisconnected("connect", "no trainer can connect any more: " + self._end_reason())
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no trainer connected within {timeout} s")
                self._cond.wait(remaining)

    def wait_disconnected(self, timeout: float = 10.0) -> None:
        """Block until no trainer is attached; TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._link is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"the trainer was still connected after {timeout} s")
                self._cond.wait(remaining)

    def _end_reason(self) -> str:
        return "the dashboard is closed"

    # ------------------------------------------------------------------ sending

    def request(self, cmd: str, payload: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        """Send a command and return its reply `data`.

        Raises RequestError (with the wire `code`) on `ok: false`, TimeoutError when no reply
        comes within `timeout` seconds (a late reply is then dropped), and TrainerDisconnected
        when no trainer is attached or it goes away before answering.
        """
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        request_id = uuid.uuid4().hex
        line = encode_request(cmd, payload if payload is not None else {}, request_id)
        with self._lock:
            link = self._require_link(cmd)
            pending = _Pending(cmd, link)
            self._pending[request_id] = pending
        try:
            link.write_line(line)
        except OSError as exc:
            with self._lock:
                self._pending.pop(request_id, None)
            raise TrainerDisconnected(cmd, f"could not send {cmd!r}: {exc}") from exc
        if not pending.done.wait(timeout):
            with self._lock:
                still_pending = self._pending.pop(request_id, None) is not None
            if still_pending:
                raise TimeoutError(f"no reply to {cmd!r} within {timeout} s")
            # The reply (or a disconnect) raced the timeout; it is being finished right now.
            pending.done.wait(5.0)
        if pending.error is not None:
            raise pending.error
        return pending.reply

    def send(self, cmd: str, payload: dict[str, Any] | None = None) -> None:
        """Fire-and-forget: a command without `id`, so the trainer sends no reply."""
        line = encode_request(cmd, payload, None)
        with self._lock:
            link = self._require_link(cmd)
        try:
            link.write_line(line)
        except OSError as exc:
            raise TrainerDisconnected(cmd, f"could not send {cmd!r}: {exc}") from exc

    def send_raw(self, line: str | bytes) -> None:
        """Write `line` to the trainer as-is (a newline is appended if missing); for tests of bad input."""
        if isinstance(line, str):
            data = line.encode("utf-8")
        elif isinstance(line, (bytes, bytearray)):
            data = bytes(line)
        else:
            raise TypeError(f"send_raw takes str or bytes, got {type(line).__name__}")
        if not data.endswith(b"\n"):
            data += b"\n"
        with self._lock:
            link = self._require_link("send_raw")
        try:
            link.write_line(data)
        except OSError as exc:
            raise TrainerDisconnected("send_raw", f"could not send: {exc}") from exc

    def _require_link(self, cmd: str) -> _Link:
        if self._closed:
            raise TrainerDisconnected(cmd, "dashboard is closed")
        if self._link is None:
            raise TrainerDisconnected(cmd, "no trainer connected")
        return self._link

    # ------------------------------------------------------------------ receiving

    def events(self, timeout: float | None = None, since: int | None = None) -> Iterator[dict[str, Any]]:
        """Yield events in delivery order as they come.

        Without `since`, iterators share one cursor, so each event is yielded once across all
        `events()` calls (starting with the first event ever received). With `since`, iteration
        starts at that index and leaves the shared cursor alone. Stops after `timeout` seconds
        without a new event (None: wait forever), or when the stream has ended.
        """
        shared = since is None
        cursor = self._iter_cursor if shared else max(0, since)  # type: ignore[arg-type]
        while True:
            with self._cond:
                deadline = None if timeout is None else time.monotonic() + timeout
                while True:
                    cursor = max(cursor, self._iter_cursor) if shared else cursor
                    cursor = max(cursor, self._trimmed)
                    if cursor < self._trimmed + len(self._received):
                        event = self._received[cursor - self._trimmed]
                        cursor += 1
                        if shared:
                            self._iter_cursor = cursor
                        break
                    if self._ended:
                        return
                    if deadline is None:
                        self._cond.wait()
                    else:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            return
                        self._cond.wait(remaining)
            yield event

    def wait_for_event(
        self,
        predicate_or_type: str | Callable[[dict[str, Any]], bool],
        timeout: float = 10.0,
        since: int = 0,
    ) -> dict[str, Any]:
        """The first event at index >= `since` matching a type name or predicate, waiting for new ones."""
        if isinstance(predicate_or_type, str):
            wanted = predicate_or_type
            description = f"{wanted!r} event"

            def match(event: dict[str, Any]) -> bool:
                return event.get("type") == wanted

        elif callable(predicate_or_type):
            match = predicate_or_type
            description = "matching event"
        else:
            raise TypeError(
                f"wait_for_event needs an event type or a predicate, got {type(predicate_or_type).__name__}"
            )
        deadline = time.monotonic() + timeout
        index = since
        with self._cond:
            while True:
                index = max(index, self._trimmed)
                while index < self._trimmed + len(self._received):
                    event = self._received[index - self._trimmed]
                    index += 1
                    if match(event):
                        return event
                if self._ended:
                    raise TimeoutError(f"no {description}: the event stream has ended")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no {description} within {timeout} s")
                self._cond.wait(remaining)

    def on_event(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """Call `callback(event)` for every event delivered from now on, in order.

        Callbacks run on one dispatcher thread (never the reader), so they may call `request()`.
        """
        if not callable(callback):
            raise TypeError(f"on_event needs a callable, got {type(callback).__name__}")
        with self._lock:
            self._event_callbacks.append(callback)
            self._ensure_dispatcher()

    def on_connection_change(self, callback: Callable[[bool], None]) -> None:
        """Call `callback(connected)` whenever a trainer attaches or goes away (dispatcher thread)."""
        if not callable(callback):
            raise TypeError(f"on_connection_change needs a callable, got {type(callback).__name__}")
        with self._lock:
            self._conn_callbacks.append(callback)
            self._ensure_dispatcher()

    def _ensure_dispatcher(self) -> None:
        if self._dispatcher is None:
            self._dispatcher = threading.Thread(
                target=self._dispatch_loop, name="onthefly-dashboard-callbacks", daemon=True
            )
            self._dispatcher.start()

    def _dispatch_loop(self) -> None:
        while True:
            item = self._dispatch_q.get()
            if item is _STOP:
                return
            kind, value = item
            callbacks = self._event_callbacks if kind == "event" else self._conn_callbacks
            for callback in list(callbacks):
                try:
                    callback(value)
                except Exception:  # a user callback must not stop delivery to the others
                    logger.exception("onthefly dashboard %s callback %r failed", kind, callback)

    # ------------------------------------------------------------------ links (transport side)

    def _attach(self, link: _Link) -> bool:
        """Make `link` the trainer connection and start its reader; False if one is already live."""
        with self._lock:
            if self._closed or self._link is not None:
                return False
            self._link = link
            self._connections += 1
            fill_line = None
            if self._refill_on_connect:
                self._refill_on_connect = False
                fill_line = self._begin_fill_locked(link, [])
            if self._conn_callbacks:
                self._dispatch_q.put(("connection", True))
            self._cond.notify_all()
        link.thread = threading.Thread(
            target=self._read_loop, args=(link,), name="onthefly-dashboard-reader", daemon=True
        )
        link.thread.start()
        if fill_line is not None:
            self._send_internal(link, fill_line)
        logger.info("trainer connected: %s", link.peer)
        return True

    def _read_loop(self, link: _Link) -> None:
        try:
            while True:
                line = link.reader.readline(MAX_LINE_BYTES + 1)
                if not line:
                    break
                if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                    self._skip_overlong(link)
                    continue
                self._handle_line(link, line)
        except (OSError, ValueError) as exc:  # ValueError: read on a file closed by close()
            if not self._closed:
                logger.info("trainer stream %s failed: %s", link.peer, exc)
        finally:
            self._link_lost(link)
            self._after_link_closed(link)
            link.release()

    def _skip_overlong(self, link: _Link) -> None:
        while True:
            rest = link.reader.readline(MAX_LINE_BYTES)
            if not rest or rest.endswith(b"\n"):
                break
        with self._lock:
            self._note_locked(f"dropped a line longer than {MAX_LINE_BYTES} bytes from the trainer")

    def _link_lost(self, link: _Link) -> None:
        with self._lock:
            was_current = self._link is link
            if was_current:
                self._link = None
                if self._conn_callbacks:
                    self._dispatch_q.put(("connection", False))
            lost = [rid for rid, p in self._pending.items() if p.link is link]
            failed = [self._pending.pop(rid) for rid in lost]
            if self._fill is not None and self._fill.link is link:
                # The buffered events will come again: replayed by the trainer or re-requested.
                self._fill = None
                self._refill_on_connect = True
            self._cond.notify_all()
        for p in failed:
            message = "dashboard closed" if self._closed else "trainer disconnected before replying"
            p.finish(error=TrainerDisconnected(p.cmd, message))
        if was_current:
            logger.info("trainer disconnected: %s", link.peer)

    def _send_internal(self, link: _Link, line: bytes) -> None:
        try:
            link.write_line(line)
        except OSError as exc:
            # The reader will see the stream end and schedule a refill on the next connection.
            logger.info("could not request missing events from %s: %s", link.peer, exc)

    # ------------------------------------------------------------------ inbound lines

    def _handle_line(self, link: _Link, line: bytes) -> None:
        text = line.decode("utf-8", errors="replace").strip()
        if not text:
            return
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            self._deliver_unparsed(text)
            return
        if obj.get("id") and isinstance(obj.get("ok"), bool):
            self._handle_reply(obj)
            return
        if "type" not in obj and isinstance(obj.get("event"), str):
            obj["type"] = obj.pop("event")
        if not isinstance(obj.get("type"), str):
            self._deliver_unparsed(text)
            return
        send = None
        with self._lock:
            send = self._accept_event_locked(link, obj)
        if send is not None:
            self._send_internal(link, send)

    def _deliver_unparsed(self, text: str) -> None:
        with self._lock:
            self._deliver_locked({"type": "log", "text": text, "unparsed": True, "ts": time.time()})

    def _handle_reply(self, obj: dict[str, Any]) -> None:
        request_id = str(obj["id"])
        with self._lock:
            pending = self._pending.pop(request_id, None)
        if pending is None:
            self.late_replies += 1
            logger.debug("dropping reply to unknown or timed-out request %s", request_id)
            return
        if obj["ok"]:
            pending.finish(reply=obj.get("data"))
            return
        code = obj.get("code") if isinstance(obj.get("code"), str) else None
        message = obj.get("error")
        message = str(message) if message else "request failed"
        pending.finish(error=RequestError(pending.cmd, message, code, obj))

    # ------------------------------------------------------------------ ordered delivery

    def _accept_event_locked(self, link: _Link, event: dict[str, Any]) -> bytes | None:
        """Deliver, drop or buffer one live event; returns an `events_since` line to send, if any."""
        seq = _seq_of(event)
        if seq is None:
            self._deliver_locked(event)
            return None
        session = event.get("session_id")
        if session is not None and session != self._seq_session:
            if self._seq_session is not None:
                logger.info("trainer session changed from %s to %s", self._seq_session, session)
                self._last_seq = 0
                self._fill = None
            self._seq_session = session
        if self._fill is not None:
            self._fill.buffer.append(event)
            return None
        if seq <= self._last_seq:
            self.duplicates_dropped += 1
            return None
        if seq == self._last_seq + 1:
            self._deliver_locked(event)
            self._last_seq = seq
            return None
        return self._begin_fill_locked(link, [event])

    def _begin_fill_locked(self, link: _Link, buffered: list[dict[str, Any]]) -> bytes:
        fill = _GapFill(link, self._last_seq)
        fill.buffer.extend(buffered)
        self._fill = fill
        return self._fill_request_locked(fill)

    def _fill_request_locked(self, fill: _GapFill) -> bytes:
        request_id = uuid.uuid4().hex
        self._pending[request_id] = _Pending(
            "events_since", fill.link, on_done=lambda p, fill=fill: self._fill_page_done(fill, p)
        )
        return encode_request("events_since", {"event_seq": fill.cursor}, request_id)

    def _fill_page_done(self, fill: _GapFill, pending: _Pending) -> None:
        send = None
        with self._lock:
            if self._fill is not fill:
                return  # abandoned: the link dropped or the trainer session changed
            if pending.error is not None:
                self._note_locked(
                    f"could not recover events after event_seq {self._last_seq} "
                    f"({pending.error.code or 'error'}: {pending.error.message}); continuing with what arrived"
                )
                self._finish_fill_locked(fill, may_retry=False)
                return
            page = pending.reply
            events = page.get("events") if isinstance(page, dict) else None
            if not isinstance(events, list):
                self._note_locked(
                    f"events_since replied with {type(page).__name__} instead of an object with an "
                    "'events' list; continuing with what arrived"
                )
                self._finish_fill_locked(fill, may_retry=False)
                return
            last_in_page = fill.cursor
            for event in events:
                if not isinstance(event, dict) or _seq_of(event) is None:
                    logger.warning("events_since returned an entry without event_seq: %r", event)
                    continue
                seq = _seq_of(event)
                assert seq is not None
                last_in_page = max(last_in_page, seq)
                self._deliver_in_order_locked(event, seq)
                fill.recovered += 1
            next_seq = page.get("next_seq")
            cursor = next_seq if isinstance(next_seq, int) and not isinstance(next_seq, bool) else last_in_page
            cursor = max(cursor, last_in_page)
            more = page.get("more") is True
            if more and cursor > fill.cursor:
                fill.cursor = cursor
                send = self._fill_request_locked(fill)
            else:
                if more:
                    self._note_locked("events_since said more events follow but returned none; stopping")
                fill.cursor = max(cursor, fill.cursor)
                send = self._finish_fill_locked(fill)
        if send is not None:
            self._send_internal(fill.link, send)

    def _finish_fill_locked(self, fill: _GapFill, *, may_retry: bool = True) -> bytes | None:
        """Deliver the buffered live events after a fill; may ask once more if a gap remains."""
        buffered = sorted(fill.buffer, key=lambda e: _seq_of(e) or 0)
        first_new = next((s for s in map(_seq_of, buffered) if s is not None and s > self._last_seq), None)
        gap_remains = first_new is not None and first_new > self._last_seq + 1
        if may_retry and gap_remains and fill.rounds < MAX_FILL_ROUNDS:
            fill.rounds += 1
            fill.cursor = self._last_seq
            return self._fill_request_locked(fill)
        self._fill = None
        for event in buffered:
            seq = _seq_of(event)
            assert seq is not None
            self._deliver_in_order_locked(event, seq)
        logger.debug("gap fill recovered %d events; last_seq now %d", fill.recovered, self._last_seq)
        return None

    def _deliver_in_order_locked(self, event: dict[str, Any], seq: int) -> None:
        if seq <= self._last_seq:
            self.duplicates_dropped += 1
            return
        if seq != self._last_seq + 1:
            self._note_locked(
                f"events {self._last_seq + 1}..{seq - 1} are lost (not in the trainer's event store)"
            )
        self._deliver_locked(event)
        self._last_seq = seq

    def _note_locked(self, text: str, level: str = "warn") -> None:
        """Record a client-side observation as a `log` event prefixed `[onthefly]`."""
        logger.warning("%s", text)
        self._deliver_locked(
            {"type": "log", "level": level, "text": f"[onthefly] {text}", "source": "client", "ts": time.time()}
        )

    def _deliver_locked(self, event: dict[str, Any]) -> None:
        self._received.append(event)
        if self._keep is not None and len(self._received) > self._keep + max(1, self._keep // 4):
            drop = len(self._received) - self._keep
            del self._received[:drop]
            self._trimmed += drop
        if self._event_callbacks:
            self._dispatch_q.put(("event", event))
        self._cond.notify_all()


class DashboardServer(DashboardBase):
    """Listen on TCP for a training process (one at a time) and steer it."""

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        *,
        allow_remote: bool = False,
        keep_events: int | None = None,
    ) -> None:
        super().__init__(keep_events=keep_events)
        if not isinstance(host, str) or not host:
            raise ValueError(f"host must be a non-empty string, got {host!r}")
        if not allow_remote and not is_loopback_host(host):
            raise ValueError(
                f"refusing to listen on non-loopback host {host!r}: the wire has no authentication; "
                "pass allow_remote=True if you really want that"
            )
        self.host = host
        self.port = resolve_port(port)
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """(host, bound port)."""
        return (self.host, self.port)

    def start(self) -> DashboardServer:
        """Bind, listen and start accepting trainers; returns self."""
        if self._started:
            raise RuntimeError("DashboardServer.start() was already called")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, self.port))
            listener.listen(8)
        except OSError as exc:
            listener.close()
            raise OSError(exc.errno, f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from exc
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._started = True
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="onthefly-dashboard-accept", daemon=True
        )
        self._accept_thread.start()
        logger.info("dashboard listening on %s:%d", self.host, self.port)
        return self

    def _accept_loop(self) -> None:
        assert self._listener is not None and self._wake_r is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._closed:
                for key, _ in selector.select():
                    if key.fileobj is self._wake_r or self._closed:
                        return
                    try:
                        conn, addr = self._listener.accept()
                    except OSError as exc:
                        if self._closed:
                            return
                        logger.warning("accept failed on %s:%d: %s", self.host, self.port, exc)
                        continue
                    self._admit(conn, addr)

    def _admit(self, conn: socket.socket, addr: Any) -> None:
        peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
        with self._lock:
            current = self._link
        if current is not None and current.thread is not None:
            current.thread.join(ADMIT_GRACE_S)
        link = self._socket_link(conn, peer)
        if not self._attach(link):
            link.shutdown()
            link.release()
            if not self._closed:
                with self._lock:
                    self._note_locked(
                        f"refused a second trainer connection from {peer} while one is connected"
                    )

    @staticmethod
    def _socket_link(conn: socket.socket, peer: str) -> _Link:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        set_send_timeout(conn, SEND_TIMEOUT_S)
        reader = conn.makefile("rb")

        def write(data: bytes) -> None:
            conn.sendall(data)

        def shutdown() -> None:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError as exc:  # already reset by the peer; nothing left to stop
                logger.debug("shutdown of %s: %s", peer, exc)

        def release() -> None:
            reader.close()
            conn.close()

        return _Link(reader, write, shutdown, release, peer)

    def _close_transport(self) -> None:
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"x")
            except OSError as exc:
                logger.debug("waking the accept thread failed: %s", exc)
        if self._accept_thread is not None and self._accept_thread is not threading.current_thread():
            self._accept_thread.join(timeout=5.0)
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()

    def __repr__(self) -> str:
        state = "connected" if self.connected else "waiting"
        return f"DashboardServer({self.host}:{self.port}, {state})"


class ProcessDashboard(DashboardBase):
    """Start a training script with `ONTHEFLY_TRANSPORT=stdio` and steer it over its stdin/stdout.

    `env` holds extra environment variables, laid over the current environment. The script's
    stderr lines are delivered as `log` events with `level: "stderr"` and kept in `stderr_lines`.
    `close()` closes the script's stdin, then terminates it if it has not exited after
    `terminate_timeout` seconds.
    """

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str] | None = None,
        *,
        cwd: str | os.PathLike[str] | None = None,
        keep_events: int | None = None,
        terminate_timeout: float = 5.0,
    ) -> None:
        super().__init__(keep_events=keep_events)
        if isinstance(argv, (str, bytes)) or not isinstance(argv, (list, tuple)) or not argv:
            raise ValueError(f"argv must be a non-empty list of strings, got {argv!r}")
        bad = [a for a in argv if not isinstance(a, (str, os.PathLike))]
        if bad:
            raise TypeError(f"argv entries must be strings, got {bad[0]!r}")
        if env is not None:
            if not isinstance(env, dict):
                raise TypeError(f"env must be a dict of strings, got {type(env).__name__}")
            for key, value in env.items():
                if not isinstance(key, str) or not isinstance(value, str):
                    raise TypeError(f"env entries must be str -> str, got {key!r}: {value!r}")
        self.argv = [os.fspath(a) for a in argv]
        self.env = dict(env) if env else {}
        self.cwd = cwd
        self.terminate_timeout = terminate_timeout
        self.stderr_lines: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr_thread: threading.Thread | None = None

    def start(self) -> ProcessDashboard:
        """Start the script and begin reading its protocol stream; returns self."""
        if self._started:
            raise RuntimeError("ProcessDashboard.start() was already called")
        env = dict(os.environ)
        env.update(self.env)
        env["ONTHEFLY_TRANSPORT"] = "stdio"
        env.setdefault("PYTHONUNBUFFERED", "1")
        proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=self.cwd,
        )
        self._proc = proc
        self._started = True
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        stdin, stdout = proc.stdin, proc.stdout

        def write(data: bytes) -> None:
            stdin.write(data)
            stdin.flush()

        def shutdown() -> None:
            try:
                stdin.close()
            except OSError as exc:  # the child already closed its end
                logger.debug("closing the trainer's stdin: %s", exc)

        self._stderr_thread = threading.Thread(
            target=self._stderr_loop, args=(proc.stderr,), name="onthefly-dashboard-stderr", daemon=True
        )
        self._stderr_thread.start()
        self._attach(_Link(stdout, write, shutdown, stdout.close, f"pid {proc.pid}"))
        return self

    def close_input(self) -> None:
        """Close the script's stdin: no more commands will come, so it may stop serving and exit.

        Events keep arriving until the script exits; requests fail with TrainerDisconnected.
        """
        with self._lock:
            link = self._link
        if link is not None:
            link.shutdown()

    @property
    def pid(self) -> int | None:
        """The script's process id, once started."""
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        """The script's exit status, or None while it runs (negative: killed by that signal)."""
        return self._proc.poll() if self._proc is not None else None

    def wait(self, timeout: float | None = None) -> int:
        """Wait until the script has exited and all its output has been delivered; its exit code."""
        if self._proc is None:
            raise RuntimeError("ProcessDashboard.wait() before start()")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._ended:
                if deadline is None:
                    self._cond.wait()
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(f"the script {self.argv[0]!r} was still running after {timeout} s")
                    self._cond.wait(remaining)
        code = self._proc.poll()
        assert code is not None
        return code

    def _end_reason(self) -> str:
        code = self.returncode
        return f"the script exited with code {code}" if code is not None else "the dashboard is closed"

    def _stderr_loop(self, stream: BinaryIO) -> None:
        try:
            while True:
                line = stream.readline(MAX_LINE_BYTES)
                if not line:
                    return
                text = line.decode("utf-8", errors="replace").rstrip("\r\n")
                with self._lock:
                    self.stderr_lines.append(text)
                    self._deliver_locked({"type": "log", "level": "stderr", "text": text, "ts": time.time()})
        except (OSError, ValueError) as exc:  # stream closed under us by close()
            logger.debug("stderr of %s ended: %s", self.argv[0], exc)
        finally:
            stream.close()

    def _after_link_closed(self, link: _Link) -> None:
        proc = self._proc
        assert proc is not None
        if self._stderr_thread is not None:
            self._stderr_thread.join(timeout=self.terminate_timeout)
        if not self._closed:
            # The protocol stream ended; the script is finishing. Wait for it (close() kills it if need be).
            proc.wait()
        with self._lock:
            if proc.poll() is not None or self._closed:
                self._ended = True
            self._cond.notify_all()

    def _close_transport(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.stdin is not None and not proc.stdin.closed:
            try:
                proc.stdin.close()
            except OSError as exc:
                logger.debug("closing the trainer's stdin: %s", exc)
        try:
            proc.wait(timeout=self.terminate_timeout)
        except subprocess.TimeoutExpired:
            logger.warning("script %s did not exit after stdin closed; terminating it", self.argv[0])
            proc.terminate()
            try:
                proc.wait(timeout=self.terminate_timeout)
            except subprocess.TimeoutExpired:
                logger.warning("script %s ignored SIGTERM; killing it", self.argv[0])
                proc.kill()
                proc.wait()
        if self._stderr_thread is not None and self._stderr_thread is not threading.current_thread():
            self._stderr_thread.join(timeout=5.0)

    def __repr__(self) -> str:
        return f"ProcessDashboard({self.argv!r}, pid={self.pid}, returncode={self.returncode})"
