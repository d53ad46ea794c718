"""The sender: streams persisted events and replies to the dashboard, in one order, on its own thread.

The bus's writer thread persists every burst of events to the `EventLog` and hands the encoded
lines here; it never waits for the socket. This thread writes them to the channel. Live lines
travel through a bounded in-memory window; when the dashboard stops reading and the window
fills, further events are not kept in memory at all: the log on disk is the backlog, and the
sender reads it back in pages once the dashboard drains. So a stalled dashboard costs disk,
not memory, and never holds persistence up.

One order: every event goes out in `event_seq` order exactly once per connection, and a reply
goes out after every event produced before it (each reply carries `after_seq`, the last seq
emitted before it). Lines are whole and never interleave (one thread writes).

On every (re)connection the sender first sends the connect announcements (`announcer()`:
session and run records a dashboard that wiped its state needs, stamped but without
`event_seq`, not persisted), then every logged event the dashboard has not been sent, then
live lines. Replies queued for an earlier connection are dropped (their requester is gone).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable

from .channels import Channel
from .eventlog import EventLog
from .jsonsafe import encode_text

__all__ = ["Sender"]

log = logging.getLogger("onthefly.control")

_EVENT = 0  # (_EVENT, seq, text)
_REPLY = 1  # (_REPLY, after_seq, connection_id, text)
_MARK = 2  # (_MARK, after_seq, threading.Event)

_SEND_BYTES = 1 << 20  # at most this much per channel.send (whole lines)
_PAGE_ROWS = 2000  # events read back from the log per page
_POLL_S = 0.5  # wake at least this often, for channels that never announce a connection
_RETRY_S = 0.05  # pause after a failed send on a channel that still reports a connection

Announcer = Callable[[], list]


class Sender:
    """The sending thread and its bounded window of encoded lines not yet written."""

    def __init__(
        self,
        channel: Channel,
        event_log: EventLog,
        *,
        first_seq: int,
        stamps: Callable[[], dict[str, Any]],
        window_bytes: int,
        reply_bytes: int,
        max_replies: int = 4096,
    ) -> None:
        self.channel = channel
        self.event_log = event_log
        self._stamps = stamps
        #: Most bytes of event lines kept in memory for sending; the rest is read from the log.
        self.window_bytes = window_bytes
        #: Most bytes (and `max_replies` count) of replies kept while the dashboard is not reading.
        self.reply_bytes = reply_bytes
        self.max_replies = max_replies
        self.announcer: Announcer | None = None
        self._cond = threading.Condition()
        self._window: collections.deque[tuple] = collections.deque()
        self._event_bytes = 0
        self._reply_total = 0
        self._reply_count = 0
        self._persisted = first_seq - 1  # highest seq the writer has handled (stored, or failed to)
        self._cursor = first_seq  # next seq no dashboard has been sent
        self._announced: int | None = None  # connection id the announcements went to
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._stall_warned = False
        #: Replies that could not be delivered (no dashboard, connection lost, or over the bound).
        self.dropped_replies = 0
        #: Events sent from the log rather than from memory (reconnections and catch-up).
        self.replayed_events = 0
        #: Connect announcements sent (one per event, over all connections).
        self.announced_events = 0

    # ---- the writer's side -------------------------------------------------------------------
    def push(self, items: list[tuple], persisted_upto: int) -> None:
        """Take one persisted burst: `(_EVENT, seq, text)`, `(_REPLY, after_seq, text)`, `(_MARK, after_seq, ev)`."""
        connected = self.channel.connected
        connection = self.channel.connection_id
        with self._cond:
            for item in items:
                kind = item[0]
                if kind == _EVENT:
                    text = item[2]
                    # Otherwise the log has it: the sender reads the gap back when it gets there.
                    if connected and self._event_bytes + len(text) <= self.window_bytes:
                        self._window.append(item)
                        self._event_bytes += len(text)
                elif kind == _REPLY:
                    text = item[2]
                    if not connected:
                        self.dropped_replies += 1
                    elif self._reply_count >= self.max_replies or self._reply_total + len(text) > self.reply_bytes:
                        self.dropped_replies += 1
                        if not self._stall_warned:
                            self._stall_warned = True
                            log.warning(
                                "onthefly: the dashboard is not reading; %d replies are waiting, so "
                                "further replies are dropped until it reads again",
                                self._reply_count,
                            )
                    else:
                        self._window.append((_REPLY, item[1], connection, text))
                        self._reply_total += len(text)
                        self._reply_count += 1
                else:
                    self._window.append(item)
            self._persisted = max(self._persisted, persisted_upto)
            self._cond.notify_all()

    def wake(self) -> None:
        """Re-check the channel now (a dashboard connected or disconnected)."""
        with self._cond:
            self._cond.notify_all()

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="onthefly-sender", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to exit after the send in progress (if any); pending marks are set."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def join(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the thread to end; True when it has."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(max(0.0, timeout))
        return not thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def reply_backlog(self) -> int:
        """Replies held in memory, waiting to be written."""
        return self._reply_count

    def wait_progress(self, timeout: float) -> None:
        """Block up to `timeout` s, or until the thread has written (or dropped) a batch."""
        with self._cond:
            self._cond.wait(timeout)

    @property
    def buffered_bytes(self) -> int:
        """Bytes of lines held in memory for sending right now (events and replies)."""
        return self._event_bytes + self._reply_total

    @property
    def sent_seq(self) -> int:
        """The last seq handed to a dashboard connection (the cursor minus one)."""
        return self._cursor - 1

    # ---- the thread --------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._step():
                continue
        except Exception:  # the sender must never take the process down; the traceback is logged
            log.exception("onthefly: the sender thread failed; the dashboard gets no more lines")
        finally:
            with self._cond:
                self._release_marks_locked()

    def _step(self) -> bool:
        """One unit of work (announce, a page from the log, or a batch from memory); False to exit."""
        with self._cond:
            while True:
                if self._stopping:
                    return False
                if not self.channel.connected:
                    if self._window:
                        self._discard_window_locked()
                    self._cond.wait(_POLL_S)
                    continue
                connection = self.channel.connection_id
                if connection != self._announced:
                    self._drop_stale_replies_locked(connection)
                    break
                if self._window or self._cursor <= self._persisted:
                    break
                self._cond.wait(_POLL_S)
            if connection != self._announced:
                plan: tuple = ("announce", connection)
            else:
                plan = self._plan_locked(connection)
        kind = plan[0]
        if kind == "announce":
            if self._announce():
                self._announced = plan[1]
        elif kind == "disk":
            self._send_from_log(plan[1], plan[2])
        elif kind == "memory":
            self._send_from_memory(plan[1], plan[2], plan[3], plan[4])
        return True

    def _plan_locked(self, connection: int) -> tuple:
        """What to send next, taking it off the window; called with the lock held."""
        window = self._window
        while window and window[0][0] == _EVENT and window[0][1] < self._cursor:
            self._event_bytes -= len(window.popleft()[2])  # sent already, from the log
        head = window[0] if window else None
        if head is not None and (
            (head[0] == _EVENT and head[1] == self._cursor) or (head[0] != _EVENT and head[1] < self._cursor)
        ):
            lines: list[str] = []
            marks: list[threading.Event] = []
            replies = 0
            size = 0
            cursor = self._cursor
            while window and size < _SEND_BYTES:
                item = window[0]
                if item[0] == _EVENT:
                    if item[1] < cursor:
                        self._event_bytes -= len(window.popleft()[2])
                        continue
                    if item[1] != cursor:
                        break  # a gap: the log holds what comes next
                    window.popleft()
                    self._event_bytes -= len(item[2])
                    lines.append(item[2])
                    size += len(item[2])
                    cursor += 1
                elif item[1] >= cursor:
                    break  # a reply or mark waits for the events produced before it
                elif item[0] == _REPLY:
                    window.popleft()
                    self._reply_total -= len(item[3])
                    self._reply_count -= 1
                    if item[2] == connection:
                        lines.append(item[3])
                        size += len(item[3])
                        replies += 1
                    else:
                        self.dropped_replies += 1
                else:
                    window.popleft()
                    marks.append(item[2])
            return ("memory", lines, cursor, replies, marks)
        if head is None:
            limit = self._persisted
        elif head[0] == _EVENT:
            limit = head[1] - 1
        else:
            limit = head[1]
        return ("disk", self._cursor, min(limit, self._persisted))

    def _send_from_memory(self, lines: list[str], cursor: int, replies: int, marks: list[threading.Event]) -> None:
        ok = not lines or self.channel.send(("\n".join(lines) + "\n").encode("utf-8"))
        with self._cond:
            if ok:
                self._cursor = max(self._cursor, cursor)
                self._stall_warned = False
            else:
                self.dropped_replies += replies  # the events stay at the cursor: the log has them
            if replies:
                self._cond.notify_all()  # a reader pacing itself on the reply backlog may go on
        for mark in marks:
            mark.set()
        if not ok:
            self._after_failed_send()

    def _send_from_log(self, first: int, last: int) -> None:
        if last < first:
            return
        rows = self.event_log.read_after(first - 1, min(_PAGE_ROWS, last - first + 1))
        rows = [row for row in rows if row[0] <= last]
        if not rows:
            # Nothing stored in first..last: those events could not be persisted (logged then).
            log.error("onthefly: events %d..%d are not in the event log; the dashboard never gets them",
                      first, last)
            with self._cond:
                self._cursor = max(self._cursor, last + 1)
            return
        if rows[0][0] != first:
            log.error("onthefly: events %d..%d are not in the event log; the dashboard never gets them",
                      first, rows[0][0] - 1)
        if self.channel.send(("\n".join(body for _, body in rows) + "\n").encode("utf-8")):
            with self._cond:
                self._cursor = max(self._cursor, rows[-1][0] + 1)
                self.replayed_events += len(rows)
                self._stall_warned = False
        else:
            self._after_failed_send()

    def _announce(self) -> bool:
        """Send the connect announcements; True when they went out (or there were none)."""
        announcer = self.announcer
        if announcer is None:
            return True
        try:
            events = announcer()
            lines = [self._announcement(event) for event in events]
        except Exception:  # a broken announcer must not stop the stream; the traceback is logged
            log.exception("onthefly: the connect announcer failed; the dashboard gets no announcements")
            return True
        if not lines:
            return True
        if not self.channel.send(("\n".join(lines) + "\n").encode("utf-8")):
            self._after_failed_send()
            return False
        self.announced_events += len(lines)
        return True

    def _after_failed_send(self) -> None:
        """A channel that refuses a send but still says it is connected must not make us spin."""
        if self.channel.connected:
            with self._cond:
                if not self._stopping:
                    self._cond.wait(_RETRY_S)

    def _announcement(self, event: Any) -> str:
        if not isinstance(event, dict) or not isinstance(event.get("type"), str) or not event["type"]:
            raise TypeError(f"a connect announcement must be a dict with a non-empty 'type', got {event!r}")
        line = {"type": event["type"], **self._stamps(), **event}
        line.pop("event_seq", None)  # announcements are not log entries
        line.setdefault("ts", time.time())
        return encode_text(line)

    def _discard_window_locked(self) -> None:
        """No dashboard: replies have nobody to go to; events stay in the log for the next one."""
        for item in self._window:
            if item[0] == _REPLY:
                self.dropped_replies += 1
            elif item[0] == _MARK:
                item[2].set()
        self._window.clear()
        self._event_bytes = self._reply_total = self._reply_count = 0

    def _drop_stale_replies_locked(self, connection: int) -> None:
        kept: collections.deque[tuple] = collections.deque()
        for item in self._window:
            if item[0] == _REPLY and item[2] != connection:
                self.dropped_replies += 1
                self._reply_total -= len(item[3])
                self._reply_count -= 1
            else:
                kept.append(item)
        self._window = kept

    def _release_marks_locked(self) -> None:
        for item in self._window:
            if item[0] == _MARK:
                item[2].set()
