"""The control bus: inbound lines → a bounded command queue; every outbound line → one FIFO writer.

Any thread may `emit` an event or `reply` to a request; that only enqueues a small dict (no
JSON, no I/O), so it is cheap enough for the training thread. One writer thread encodes each
batch, persists its events to the `EventLog`, and then writes the batch to the channel as one
send, so lines never interleave and replies leave in the order they were produced with events.

Replay: the writer keeps a cursor, the first `event_seq` the dashboard has not been sent. While
no dashboard is connected events are only persisted; on every (re)connection the writer first
sends the logged events from the cursor on, in order, then continues live. A failed send leaves
the cursor at the start of the failed batch. Lines handed to a socket that then died may still
be lost in flight; the dashboard detects the gap in `event_seq` and asks `events_since`
(`events_since_page` below) for it, dropping anything at or below the last seq it has seen.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import queue
import threading
import time
from typing import Any

from .channels import Channel
from .envelope import Request, error_event, parse_request, reply_error, reply_ok
from .errors import ErrorCode, ProtocolError
from .eventlog import EventLog
from .jsonsafe import encode_text

__all__ = ["ControlBus", "events_since_page"]

log = logging.getLogger("onthefly.control")

# Kinds of items on the outbound queue (first element of each tuple).
_EVENT = 0  # (_EVENT, seq, event_dict)
_REPLY = 1  # (_REPLY, reply_dict)
_MARK = 2  # (_MARK, threading.Event): set once everything before it is handled
_CONNECTED = 3  # (_CONNECTED,): a dashboard connected; replay what it has not seen
_STOP = 4  # (_STOP,): the writer exits after this batch

_RESERVED_STAMPS = frozenset({"type", "ts", "event_seq"})
_MAX_BATCH = 4096
_REPLAY_PAGE = 2000
_MAX_EVENTS_PAGE = 10_000


def events_since_page(event_log: EventLog, after_seq: int, limit: int = 1000) -> dict:
    """One page of stored events after `after_seq`, for the `events_since` command.

    Returns `{"events": [event dicts], "next_seq": <last returned seq, or after_seq>,
    "more": <whether events remain after this page>}`.
    """
    if isinstance(after_seq, bool) or not isinstance(after_seq, int) or after_seq < 0:
        raise ValueError(f"after_seq must be an integer >= 0, got {after_seq!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= _MAX_EVENTS_PAGE:
        raise ValueError(f"limit must be an integer in 1..{_MAX_EVENTS_PAGE}, got {limit!r}")
    rows = event_log.read_after(after_seq, limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    return {
        "events": [json.loads(body) for _, body in rows],
        "next_seq": rows[-1][0] if rows else after_seq,
        "more": more,
    }


class Outbox:
    """The writer's FIFO: appending an event never wakes the writer while it is busy.

    While events flow, the writer drains the outbox every `linger` seconds (one SQLite commit
    and one send per burst) and the training thread pays only a deque append. Replies, flush
    marks, connection changes and stops wake it at once; so does the first event after a lull.
    """

    def __init__(self) -> None:
        self._items: collections.deque[tuple] = collections.deque()
        self._wake = threading.Event()
        self._idle = True  # the writer sleeps with nothing in hand: the next event wakes it
        self._urgent = False

    def put(self, item: tuple, *, urgent: bool) -> None:
        self._items.append(item)
        if urgent:
            self._urgent = True
            self._wake.set()
        elif self._idle:
            self._idle = False
            self._wake.set()

    def empty(self) -> bool:
        return not self._items

    def take(self, linger: float, limit: int) -> list[tuple]:
        """Block until something is queued, then return up to `limit` items (oldest first)."""
        items = self._items
        while True:
            if not items:
                self._idle = True
                if not items:  # re-checked after publishing `idle`, so no append is missed
                    self._wake.wait()
                self._wake.clear()
            if linger > 0 and not self._urgent:
                # Only events so far: let the burst gather; an urgent item cuts the wait short.
                self._wake.wait(linger)
                self._wake.clear()
            self._idle = False
            self._urgent = False
            batch = []
            while items and len(batch) < limit:
                batch.append(items.popleft())
            if batch:
                return batch


class ControlBus:
    """Reader side: the channel's `LineSink`. Writer side: one thread draining an outbound FIFO."""

    def __init__(
        self,
        channel: Channel,
        *,
        event_log: EventLog | None = None,
        queue_size: int = 1024,
        session_id: str | None = None,
        linger: float = 0.1,
    ) -> None:
        if not isinstance(channel, Channel):
            raise TypeError(f"channel must be an onthefly Channel, got {type(channel).__name__}")
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f"queue_size must be an integer >= 1, got {queue_size!r}")
        self.channel = channel
        #: How long (s) the writer lets a lone event wait for others before writing them together.
        self.linger = float(linger)
        self._owns_log = event_log is None
        self.event_log: EventLog = event_log if event_log is not None else EventLog(None)
        self.queue_size = queue_size
        self._requests: queue.Queue[Request] = queue.Queue(maxsize=queue_size)
        self._out = Outbox()
        self._seq_lock = threading.Lock()
        # Continue after anything already in a reused log, so seqs stay unique in it.
        self._next_seq = self.event_log.last_seq() + 1
        # Writer-thread state: next seq the dashboard has not been sent; last seq handled.
        self._cursor = self._next_seq
        self._persisted = self._next_seq - 1
        self._stamps: dict[str, Any] = {} if session_id is None else {"session_id": session_id}
        self._writer: threading.Thread | None = None
        self._started = False
        self._closed = False
        self._close_lock = threading.Lock()
        #: Replies produced while no dashboard was connected (their requester is gone).
        self.dropped_replies = 0
        #: Requests answered `busy` because the command queue was full.
        self.busy_replies = 0
        #: Events refused because the bus was already closed (each one is logged).
        self.dropped_after_close = 0
        #: Events sent from the log on reconnection.
        self.replayed_events = 0

    # ---- outbound (any thread) -------------------------------------------------------------
    def set_context(self, **stamps: Any) -> None:
        """Set default stamps (`run_id`, `run_gen`, `session_id`, ...) added to every event."""
        reserved = sorted(set(stamps) & _RESERVED_STAMPS)
        if reserved:
            raise ValueError(f"{', '.join(reserved)} cannot be a default stamp: the bus sets it per event")
        merged = dict(self._stamps)
        merged.update(stamps)
        self._stamps = merged  # one reference swap: emitters see the old or the new dict whole

    @property
    def context(self) -> dict[str, Any]:
        """A copy of the current default stamps."""
        return dict(self._stamps)

    def emit(self, type: str, fields: dict | None = None) -> int:
        """Queue the event `{"type": type, **fields}` with stamps, `ts` and `event_seq`; returns the seq.

        Stamps and `ts` are only added where `fields` lacks them; `event_seq` is always set,
        strictly increasing, allocated together with the enqueue so queue order is seq order.
        Do not mutate `fields`' values afterwards: they are encoded later, on the writer.
        """
        if type.__class__ is not str or not type:
            raise ValueError(f"event type must be a non-empty str, got {type!r}")
        if fields:
            event: dict[str, Any] = {"type": type, **self._stamps, **fields}
            event["type"] = type
            if "ts" not in fields:
                event["ts"] = time.time()
        else:
            event = {"type": type, **self._stamps, "ts": time.time()}
        with self._seq_lock:
            seq = self._next_seq
            self._next_seq = seq + 1
            event["event_seq"] = seq
            if not self._closed:
                self._out.put((_EVENT, seq, event), urgent=False)
                return seq
            self.dropped_after_close += 1
        log.warning("onthefly: event %r (seq %d) emitted after the control bus closed; dropped", type, seq)
        return seq

    def reply(self, request_id: str | None, data: Any) -> None:
        """Queue a success reply; a no-op for fire-and-forget requests (id None)."""
        if request_id is None:
            return
        self._put_reply(reply_ok(request_id, data))

    def reply_error(
        self, request_id: str | None, code: str, message: str, detail: str | None = None
    ) -> None:
        """Queue an error reply, or for a request without id an `error` event naming the problem."""
        if request_id is None:
            self.emit("error", error_event(code, message, detail))
            return
        self._put_reply(reply_error(request_id, code, message, detail))

    def _put_reply(self, reply: dict) -> None:
        if self._closed:
            self.dropped_replies += 1
            log.warning("onthefly: reply to %r produced after the control bus closed; dropped", reply["id"])
            return
        self._out.put((_REPLY, reply), urgent=True)

    # ---- inbound (the channel's reader thread) ---------------------------------------------
    def line_received(self, line: str) -> None:
        """Parse a line; bad ones are answered at once, good ones queued (or answered `busy`)."""
        try:
            request = parse_request(line)
        except ProtocolError as exc:
            self.reply_error(exc.request_id, exc.code, exc.message)
            return
        try:
            self._requests.put_nowait(request)
        except queue.Full:
            self.busy_replies += 1
            self.reply_error(
                request.id,
                ErrorCode.BUSY,
                f"command queue is full ({self.queue_size} waiting); {request.cmd!r} was not accepted, retry later",
            )

    def line_rejected(self, error: ProtocolError) -> None:
        """An undecodable or oversize line: report it as an `error` event."""
        self.reply_error(None, error.code, error.message)

    def connection_changed(self, connected: bool) -> None:
        """On connect, wake the writer so it replays what the dashboard has not seen."""
        if connected and not self._closed:
            self._out.put((_CONNECTED,), urgent=True)

    def next_request(self, timeout: float | None = None) -> Request | None:
        """The next queued request, or None if none arrives within `timeout` seconds."""
        try:
            if timeout is not None and timeout <= 0:
                return self._requests.get_nowait()
            return self._requests.get(timeout=timeout)
        except queue.Empty:
            return None

    def wake_readers(self) -> None:
        """Make a thread blocked in `next_request` return None now (used when stopping it)."""
        try:
            self._requests.put_nowait(None)  # type: ignore[arg-type]
        except queue.Full:
            pass  # a full queue means the reader is not blocked: it has work to take

    @property
    def pending_requests(self) -> int:
        """Requests queued and not yet taken by `next_request`."""
        return self._requests.qsize()

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Start the writer thread and the channel; events emitted before this are kept."""
        with self._close_lock:
            if self._closed:
                raise RuntimeError("ControlBus.start() after close()")
            if self._started:
                return
            self._started = True
            self._writer = threading.Thread(target=self._write_loop, name="onthefly-writer", daemon=True)
            self._writer.start()
            # atexit runs while daemon threads still live: flush, then close the channel (defect 7).
            atexit.register(self._close_at_exit)
        self.channel.start(self)

    @property
    def connected(self) -> bool:
        return self.channel.connected

    def last_seq(self) -> int:
        """The last `event_seq` handed out (0 before the first event)."""
        return self._next_seq - 1

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far is persisted and, if connected, written out."""
        writer = self._writer
        if writer is None or not writer.is_alive():
            return self._out.empty()
        done = threading.Event()
        self._out.put((_MARK, done), urgent=True)
        return done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Flush (bounded by `timeout`), stop the writer, then close the channel. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            deadline = time.monotonic() + timeout
            writer = self._writer
            if writer is not None and writer.is_alive():
                if not self.flush(timeout):
                    log.warning("onthefly: control bus flush did not finish within %.1f s", timeout)
            with self._seq_lock:
                self._closed = True
            if writer is not None and writer.is_alive():
                self._out.put((_STOP,), urgent=True)
                writer.join(max(0.0, deadline - time.monotonic()))
            self.channel.close(timeout=max(0.5, min(2.0, deadline - time.monotonic())))
            writer_done = writer is None or not writer.is_alive()
            if writer is not None and not writer_done:
                # The channel is closed now, which unblocks a stuck send; give it a moment.
                writer.join(0.5)
                writer_done = not writer.is_alive()
            if not writer_done:
                log.warning("onthefly: the writer thread did not stop; some lines may be unsent")
            if self._owns_log and writer_done:
                self.event_log.close()
        atexit.unregister(self._close_at_exit)

    @property
    def closed(self) -> bool:
        return self._closed

    def _close_at_exit(self) -> None:
        self.close()

    # ---- the writer thread -----------------------------------------------------------------
    def _write_loop(self) -> None:
        out = self._out
        while True:
            batch = out.take(self.linger, _MAX_BATCH)
            try:
                self._write_batch(batch)
            except Exception:  # the writer must outlive any one batch; the traceback is logged
                log.exception("onthefly: the control bus writer failed on a batch of %d items", len(batch))
            finally:
                for item in batch:
                    if item[0] == _MARK:
                        item[1].set()
            if any(item[0] == _STOP for item in batch):
                return

    def _write_batch(self, batch: list[tuple]) -> None:
        rows: list[tuple[int, str, str]] = []
        lines: list[str] = []
        replies = 0
        for item in batch:
            kind = item[0]
            if kind == _EVENT:
                text = encode_text(item[2])
                rows.append((item[1], item[2]["type"], text))
                lines.append(text)
            elif kind == _REPLY:
                lines.append(encode_text(item[1]))
                replies += 1
        already_persisted = self._persisted
        if rows:
            self._persist(rows)
            self._persisted = rows[-1][0]
        if not self.channel.connected:
            self.dropped_replies += replies
            return
        if not self._replay(already_persisted):
            self.dropped_replies += replies
            return
        if not lines:
            return
        lines.append("")  # every line ends with "\n"
        if self.channel.send("\n".join(lines).encode("utf-8")):
            if rows:
                self._cursor = rows[-1][0] + 1
        else:
            self.dropped_replies += replies  # the cursor stays at this batch's first event

    def _persist(self, rows: list[tuple[int, str, str]]) -> None:
        try:
            self.event_log.append_many(rows)
        except Exception as exc:  # a full disk must not stop the wire; the loss is reported
            log.error(
                "onthefly: could not persist events %d..%d (%s: %s); they go out live only and "
                "cannot be replayed",
                rows[0][0],
                rows[-1][0],
                type(exc).__name__,
                exc,
            )

    def _replay(self, upto: int) -> bool:
        """Send logged events from the cursor through `upto`; False if a send failed."""
        while self._cursor <= upto:
            page = self.event_log.read_after(self._cursor - 1, _REPLAY_PAGE)
            page = [row for row in page if row[0] <= upto]
            if not page:  # only unpersisted holes remain below `upto`
                self._cursor = upto + 1
                return True
            data = ("\n".join(body for _, body in page) + "\n").encode("utf-8")
            if not self.channel.send(data):
                return False
            self._cursor = page[-1][0] + 1
            self.replayed_events += len(page)
        return True
