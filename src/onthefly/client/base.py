"""The shared client engine: requests and replies, ordered exactly-once events, callbacks.

`DashboardBase` talks JSON lines over one trainer `Link` at a time. Subclasses provide the
transport (`server.py`: a TCP listener; `process.py`: a child process over stdio) and hand each
new trainer stream to `_attach`. Ordering and gap filling live in `ordering.py`; this module
reads lines, matches replies to requests, keeps the delivered events and runs the callbacks.
Pure Python; it must not import torch.
"""

from __future__ import annotations

import abc
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from .link import Link, Pending
from .ordering import EventSequencer, GapFill
from .tools import check_arguments, tool_specs
from .wire import MAX_LINE_BYTES, RequestError, TrainerDisconnected, encode_request, line_text, parse_line

__all__ = ["DashboardBase"]

logger = logging.getLogger(__name__)

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
        self._link: Link | None = None
        self._pending: dict[str, Pending] = {}
        self._received: list[dict[str, Any]] = []
        self._trimmed = 0
        self._iter_cursor = 0
        self._sequencer = EventSequencer(self._deliver_locked, self._note_locked, self._fill_request_locked)
        self._started = False
        self._closed = False
        self._ended = False
        self._connections = 0
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

    def _after_link_closed(self, link: Link) -> None:
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
            self._sequencer.abandon()
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
            return self._sequencer.last_seq

    @property
    def duplicates_dropped(self) -> int:
        """How many events were dropped because they had already been delivered."""
        with self._lock:
            return self._sequencer.duplicates_dropped

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

    def drop_connection(self) -> bool:
        """Cut the current trainer link; False when none is attached.

        A TCP trainer reconnects by itself and its missed events are replayed; for a script
        started over stdio this closes its stdin, like `ProcessDashboard.close_input`.
        """
        with self._lock:
            link = self._link
        if link is None:
            return False
        link.shutdown()
        return True

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
            pending = Pending(cmd, link)
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

    def describe_commands(self, timeout: float = 30.0) -> dict[str, Any]:
        """Every command the trainer offers: description, `mutating`, and its payload's JSON Schema."""
        return self.request("describe_commands", {}, timeout=timeout)

    def tools(self, timeout: float = 30.0, *, include_mutating: bool = True) -> list[dict[str, Any]]:
        """The trainer's commands as tool specs (`{"name", "description", "input_schema", "mutating"}`)."""
        return tool_specs(self.describe_commands(timeout), include_mutating=include_mutating)

    def call_tool(self, tool: dict[str, Any], arguments: dict[str, Any] | None = None, timeout: float = 60.0) -> Any:
        """Check `arguments` against `tool`'s schema (`ToolArgumentError`), then send the command."""
        check_arguments(tool, arguments or {})
        return self.request(tool["name"], arguments or {}, timeout=timeout)

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

    def _require_link(self, cmd: str) -> Link:
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

    def wait_callbacks(self, timeout: float = 5.0) -> bool:
        """Block until the callbacks for everything delivered so far have run; False on timeout.

        Events reach `on_event` callbacks on their own thread, a little after delivery; call this
        before acting on "all events are in" (e.g. after `ProcessDashboard.wait()`).
        """
        with self._lock:
            if self._dispatcher is None or not self._dispatcher.is_alive():
                return True
            done = threading.Event()
            self._dispatch_q.put(("barrier", done))
        return done.wait(timeout)

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
            if kind == "barrier":
                value.set()
                continue
            callbacks = self._event_callbacks if kind == "event" else self._conn_callbacks
            for callback in list(callbacks):
                try:
                    callback(value)
                except Exception:  # a user callback must not stop delivery to the others
                    logger.exception("onthefly dashboard %s callback %r failed", kind, callback)

    # ------------------------------------------------------------------ links (transport side)

    def _attach(self, link: Link) -> bool:
        """Make `link` the trainer connection and start its reader; False if one is already live."""
        with self._lock:
            if self._closed or self._link is not None:
                return False
            self._link = link
            self._connections += 1
            fill_line = self._sequencer.on_attach(link)
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

    def _read_loop(self, link: Link) -> None:
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

    def _skip_overlong(self, link: Link) -> None:
        while True:
            rest = link.reader.readline(MAX_LINE_BYTES)
            if not rest or rest.endswith(b"\n"):
                break
        with self._lock:
            self._note_locked(f"dropped a line longer than {MAX_LINE_BYTES} bytes from the trainer")

    def _link_lost(self, link: Link) -> None:
        with self._lock:
            was_current = self._link is link
            if was_current:
                self._link = None
                if self._conn_callbacks:
                    self._dispatch_q.put(("connection", False))
            lost = [rid for rid, p in self._pending.items() if p.link is link]
            failed = [self._pending.pop(rid) for rid in lost]
            self._sequencer.link_lost(link)
            self._cond.notify_all()
        for p in failed:
            message = "dashboard closed" if self._closed else "trainer disconnected before replying"
            p.finish(error=TrainerDisconnected(p.cmd, message))
        if was_current:
            logger.info("trainer disconnected: %s", link.peer)

    def _send_internal(self, link: Link, line: bytes) -> None:
        try:
            link.write_line(line)
        except OSError as exc:
            # The reader will see the stream end and schedule a refill on the next connection.
            logger.info("could not request missing events from %s: %s", link.peer, exc)

    # ------------------------------------------------------------------ inbound lines

    def _handle_line(self, link: Link, line: bytes) -> None:
        if not line.strip():
            return
        obj = parse_line(line)
        if not isinstance(obj, dict):
            self._deliver_unparsed(line_text(line))
            return
        if obj.get("id") and isinstance(obj.get("ok"), bool):
            self._handle_reply(obj)
            return
        if "type" not in obj and isinstance(obj.get("event"), str):
            obj["type"] = obj.pop("event")
        if not isinstance(obj.get("type"), str):
            self._deliver_unparsed(line_text(line))
            return
        with self._lock:
            send = self._sequencer.accept(link, obj)
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

    # ------------------------------------------------------------------ ordered delivery

    def _fill_request_locked(self, fill: GapFill) -> bytes:
        """Register an `events_since` request for `fill.cursor`; the line to send."""
        request_id = uuid.uuid4().hex
        self._pending[request_id] = Pending(
            "events_since", fill.link, on_done=lambda p, fill=fill: self._fill_page_done(fill, p)
        )
        return encode_request("events_since", {"event_seq": fill.cursor}, request_id)

    def _fill_page_done(self, fill: GapFill, pending: Pending) -> None:
        with self._lock:
            send = self._sequencer.page_done(fill, pending)
        if send is not None:
            self._send_internal(fill.link, send)

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

