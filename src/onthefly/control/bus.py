"""The control bus: inbound lines → a bounded command queue; outbound lines → persist, then send.

Any thread may `emit` an event or `reply` to a request; that only enqueues a small dict (no
JSON, no I/O), so it is cheap enough for the training thread. Two threads take it from there:

- the **writer** (`onthefly-writer`) encodes each burst, appends its events to the `EventLog`
  (one commit per burst, every `linger` seconds while events flow) and hands the lines on. It
  never touches the socket, so the log stays complete and current even when a dashboard stops
  reading, and a kill loses at most the last burst;
- the **sender** (`onthefly-sender`, see `sender.py`) writes them to the channel from a bounded
  in-memory window, reading events back from the log when it falls behind (the log is the
  backlog), so memory stays bounded while a dashboard is stalled.

One order: events leave in `event_seq` order, each reply after every event produced before it,
whole lines that never interleave. Replay: the sender's cursor is the first `event_seq` no
dashboard has been sent; on every (re)connection it first sends the connect announcements
(`set_connect_announcer`), then the logged events from the cursor on, then live lines. Lines
handed to a socket that then died may still be lost in flight; the dashboard detects the gap in
`event_seq` and asks `events_since` (`events_since_page` below) for it, dropping anything at or
below the last seq it has seen.
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
from .sender import Announcer, Sender

__all__ = ["ControlBus", "events_since_page"]

log = logging.getLogger("onthefly.control")

# Kinds of items on the outbound queue (first element of each tuple). The first three are
# also what the writer hands the sender (see sender.py), encoded.
_EVENT = 0  # (_EVENT, seq, event_dict)
_REPLY = 1  # (_REPLY, reply_dict)
_MARK = 2  # (_MARK, threading.Event, wire): set once everything before it is persisted (and sent)
_STOP = 4  # (_STOP,): the writer exits after this batch

_RESERVED_STAMPS = frozenset({"type", "ts", "event_seq"})
_MAX_BATCH = 4096
_MAX_EVENTS_PAGE = 10_000
#: Default bound on event bytes held in memory for sending (beyond it the log is the backlog).
WINDOW_BYTES = 2 << 20
#: Default bound on reply bytes held while a dashboard is not reading.
REPLY_WINDOW_BYTES = 4 << 20
#: The reader stops taking lines while this many replies wait to be written (flow control).
PACE_REPLIES = 1024
#: ...but for at most this long per line, so a dashboard that never reads cannot wedge the reader.
PACE_WAIT_S = 2.0


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
    per burst) and the training thread pays only a deque append. Replies, flush marks and stops
    wake it at once; so does the first event after a lull.
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
    """Reader side: the channel's `LineSink`. Outbound: a writer thread that persists, a sender that sends."""

    def __init__(
        self,
        channel: Channel,
        *,
        event_log: EventLog | None = None,
        queue_size: int = 1024,
        session_id: str | None = None,
        linger: float = 0.1,
        window_bytes: int = WINDOW_BYTES,
        reply_window_bytes: int = REPLY_WINDOW_BYTES,
    ) -> None:
        if not isinstance(channel, Channel):
            raise TypeError(f"channel must be an onthefly Channel, got {type(channel).__name__}")
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f"queue_size must be an integer >= 1, got {queue_size!r}")
        for label, bound in (("window_bytes", window_bytes), ("reply_window_bytes", reply_window_bytes)):
            if isinstance(bound, bool) or not isinstance(bound, int) or bound < 0:
                raise ValueError(f"{label} must be an integer >= 0, got {bound!r}")
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
        # Writer-thread state: the last event seq handed to it (a reply goes out after it).
        self._last_seen = self._next_seq - 1
        self._stamps: dict[str, Any] = {} if session_id is None else {"session_id": session_id}
        self._sender = Sender(
            channel,
            self.event_log,
            first_seq=self._next_seq,
            stamps=lambda: self._stamps,
            window_bytes=window_bytes,
            reply_bytes=reply_window_bytes,
        )
        self._writer: threading.Thread | None = None
        self._started = False
        self._closed = False
        self._close_lock = threading.Lock()
        self._replies_after_close = 0
        self._outbox_replies = 0  # replies queued for the writer, not yet handed to the sender
        #: Requests answered `busy` because the command queue was full.
        self.busy_replies = 0
        #: Events refused because the bus was already closed (each one is logged).
        self.dropped_after_close = 0
        #: Events the writer could not persist (disk full, ...); each burst is logged.
        self.unpersisted_events = 0

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

    def set_connect_announcer(self, announcer: Announcer | None) -> None:
        """Register `announcer()`, called on the sender thread at every (re)connection.

        It returns a list of event dicts (`{"type": ..., **fields}`), sent before anything else
        on that connection: before the replay of missed events and before live lines. They are
        stamped with the current context (`run_id`, `run_gen`, `session_id`) and `ts`, carry no
        `event_seq` and are not persisted: they are announcements (e.g. `session_started` and a
        `newRun` per run) for a dashboard that wiped its state, not log entries. It must be
        thread-safe and quick; if it raises, the failure is logged and the stream goes on.
        """
        if announcer is not None and not callable(announcer):
            raise TypeError(f"announcer must be callable or None, got {type(announcer).__name__}")
        self._sender.announcer = announcer

    # ---- counters ------------------------------------------------------------------------------
    @property
    def dropped_replies(self) -> int:
        """Replies with nobody to go to: no dashboard, a lost connection, the bound, or after close."""
        return self._sender.dropped_replies + self._replies_after_close

    @property
    def replayed_events(self) -> int:
        """Events sent from the log rather than from memory (reconnections and catching up)."""
        return self._sender.replayed_events

    @property
    def announced_events(self) -> int:
        """Connect announcements sent, over all connections."""
        return self._sender.announced_events

    @property
    def buffered_bytes(self) -> int:
        """Bytes of outbound lines held in memory for the sender right now (bounded)."""
        return self._sender.buffered_bytes

    @property
    def sent_seq(self) -> int:
        """The last `event_seq` handed to a dashboard connection."""
        return self._sender.sent_seq

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
            self._replies_after_close += 1
            log.warning("onthefly: reply to %r produced after the control bus closed; dropped", reply["id"])
            return
        with self._seq_lock:  # several threads reply; a lost update would skew the pacing
            self._outbox_replies += 1
        self._out.put((_REPLY, reply), urgent=True)

    # ---- inbound (the channel's reader thread) ---------------------------------------------
    def line_received(self, line: str) -> None:
        """Parse a line; bad ones are answered at once, good ones queued (or answered `busy`)."""
        self._pace_inbound()
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

    def _pace_inbound(self) -> None:
        """Flow control: while many replies wait to be written, read no more commands (for a while).

        A dashboard that sends thousands of commands at once is answered at the pace it reads:
        without this, replies produced faster than the sender writes would overflow its bounded
        window and be dropped. The wait is bounded (`PACE_WAIT_S` per line), so a dashboard that
        never reads only meets the window's bound, never a wedged reader.
        """
        if self._outbox_replies + self._sender.reply_backlog < PACE_REPLIES:
            return
        deadline = time.monotonic() + PACE_WAIT_S
        while (
            self._outbox_replies + self._sender.reply_backlog >= PACE_REPLIES
            and self.channel.connected
            and not self._closed
        ):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._sender.wait_progress(min(left, 0.05))

    def line_rejected(self, error: ProtocolError) -> None:
        """An undecodable or oversize line: report it as an `error` event."""
        self.reply_error(None, error.code, error.message)

    def connection_changed(self, connected: bool) -> None:
        """Wake the sender: on connect it announces and replays what the dashboard has not seen."""
        self._sender.wake()

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
            self._sender.start()
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

    def flush(self, timeout: float = 5.0, *, wire: bool = True) -> bool:
        """Wait until everything queued so far is persisted and, if connected, written out.

        `wire=False` waits for the event log only: it returns within about one commit even when
        a dashboard has stopped reading (use it before reading `events.db`, e.g. for a bundle).
        """
        writer = self._writer
        if writer is None or not writer.is_alive():
            return self._out.empty()
        done = threading.Event()
        self._out.put((_MARK, done, wire), urgent=True)
        return done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Flush (bounded by `timeout`), stop both threads, then close the channel. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            deadline = time.monotonic() + timeout
            writer = self._writer
            if writer is not None and writer.is_alive():
                # The log first (it never waits on the socket), then whatever time is left for
                # the dashboard to read the rest.
                delivered = self.flush(timeout, wire=False) and self.flush(
                    max(0.0, deadline - time.monotonic())
                )
                if not delivered:
                    log.warning("onthefly: control bus flush did not finish within %.1f s", timeout)
            with self._seq_lock:
                self._closed = True
            if writer is not None and writer.is_alive():
                self._out.put((_STOP,), urgent=True)
                # Persisting what is queued is never given up for a deadline shorter than a second.
                writer.join(max(1.0, deadline - time.monotonic()))
            self._sender.stop()
            self._sender.join(min(0.2, max(0.0, deadline - time.monotonic())))
            # Closing the channel unblocks a send to a dashboard that stopped reading.
            self.channel.close(timeout=max(0.5, min(2.0, deadline - time.monotonic())))
            writer_done = writer is None or not writer.is_alive()
            sender_done = self._sender.join(0.5)
            if not (writer_done and sender_done):
                log.warning("onthefly: the writer or sender thread did not stop; some lines may be unsent")
            if self._owns_log and writer_done and sender_done:
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
                for item in batch:
                    if item[0] == _MARK:
                        item[1].set()  # nobody may wait forever on a batch that failed
            finally:
                handed = sum(1 for item in batch if item[0] == _REPLY)
                if handed:  # handed to the sender (or lost with a failed batch): no longer ours
                    with self._seq_lock:
                        self._outbox_replies -= handed
            if any(item[0] == _STOP for item in batch):
                return

    def _write_batch(self, batch: list[tuple]) -> None:
        """Encode, persist the events (one commit), then hand everything to the sender in order."""
        rows: list[tuple[int, str, str]] = []
        lines: list[tuple] = []
        local_marks: list[threading.Event] = []
        last = self._last_seen
        for item in batch:
            kind = item[0]
            if kind == _EVENT:
                text = encode_text(item[2])
                rows.append((item[1], item[2]["type"], text))
                lines.append((_EVENT, item[1], text))
                last = item[1]
            elif kind == _REPLY:
                lines.append((_REPLY, last, encode_text(item[1])))
            elif kind == _MARK:
                if item[2]:
                    lines.append((_MARK, last, item[1]))
                else:
                    local_marks.append(item[1])
        if rows:
            self._persist(rows)
        self._last_seen = last
        self._sender.push(lines, last)
        for mark in local_marks:
            mark.set()

    def _persist(self, rows: list[tuple[int, str, str]]) -> None:
        try:
            self.event_log.append_many(rows)
        except Exception as exc:  # a full disk must not stop the wire; the loss is reported
            self.unpersisted_events += len(rows)
            log.error(
                "onthefly: could not persist events %d..%d (%s: %s); they go out live only if the "
                "dashboard is reading, and cannot be replayed",
                rows[0][0],
                rows[-1][0],
                type(exc).__name__,
                exc,
            )
