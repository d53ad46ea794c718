"""Exactly-once, in-order delivery of a trainer's events: duplicate dropping and gap filling.

`EventSequencer` is a small state machine fed one live event at a time. An event at or below the
last delivered `event_seq` is a duplicate (replay and gap fill can overlap) and is dropped; a jump
starts an `events_since` recovery during which live events are buffered. It never waits: it
returns the request line to send, and the engine hands it each reply page when it arrives, so
the reader thread (which also reads those replies) is never blocked. Every method expects the
engine's lock to be held.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .link import Link, Pending
from .wire import seq_of

__all__ = ["GapFill", "EventSequencer", "MAX_FILL_ROUNDS"]

logger = logging.getLogger(__name__)

# After a completed gap fill the live buffer may still start past last_seq when the trainer's
# event store lagged its wire; ask once more before accepting the gap as unrecoverable.
MAX_FILL_ROUNDS = 2


class GapFill:
    """An `events_since` recovery in progress: live events are buffered until it completes."""

    def __init__(self, link: Link, cursor: int) -> None:
        self.link = link
        self.cursor = cursor
        self.buffer: list[dict[str, Any]] = []
        self.rounds = 1
        self.recovered = 0


class EventSequencer:
    """Orders one trainer session's events; see the module docstring.

    `deliver(event)` hands an event on, `note(text)` records a client-side observation, and
    `request_page(fill)` registers an `events_since` request for `fill.cursor` and returns its
    line; the engine must call `page_done(fill, pending)` when that request completes.
    """

    def __init__(
        self,
        deliver: Callable[[dict[str, Any]], None],
        note: Callable[[str], None],
        request_page: Callable[[GapFill], bytes],
    ) -> None:
        self._deliver = deliver
        self._note = note
        self._request_page = request_page
        self.last_seq = 0
        self.session: Any = None
        self.fill: GapFill | None = None
        self.refill_on_connect = False
        self.duplicates_dropped = 0

    def accept(self, link: Link, event: dict[str, Any]) -> bytes | None:
        """Deliver, drop or buffer one live event; returns an `events_since` line to send, if any."""
        seq = seq_of(event)
        if seq is None:
            self._deliver(event)
            return None
        session = event.get("session_id")
        if session is not None and session != self.session:
            if self.session is not None:
                logger.info("trainer session changed from %s to %s", self.session, session)
                self.last_seq = 0
                self.fill = None
            self.session = session
        if self.fill is not None:
            self.fill.buffer.append(event)
            return None
        if seq <= self.last_seq:
            self.duplicates_dropped += 1
            return None
        if seq == self.last_seq + 1:
            self._deliver(event)
            self.last_seq = seq
            return None
        return self._begin(link, [event])

    def on_attach(self, link: Link) -> bytes | None:
        """A new link: resume a recovery the previous link dropped; returns the line to send."""
        if not self.refill_on_connect:
            return None
        self.refill_on_connect = False
        return self._begin(link, [])

    def link_lost(self, link: Link) -> None:
        """`link` ended: a recovery on it is abandoned and started again on the next link."""
        if self.fill is not None and self.fill.link is link:
            # The buffered events will come again: replayed by the trainer or re-requested.
            self.fill = None
            self.refill_on_connect = True

    def abandon(self) -> None:
        """Forget any recovery in progress (the engine is closing)."""
        self.fill = None

    def page_done(self, fill: GapFill, pending: Pending) -> bytes | None:
        """Take one `events_since` reply page; returns the next request line, if any."""
        if self.fill is not fill:
            return None  # abandoned: the link dropped or the trainer session changed
        if pending.error is not None:
            self._note(
                f"could not recover events after event_seq {self.last_seq} "
                f"({pending.error.code or 'error'}: {pending.error.message}); continuing with what arrived"
            )
            self._finish(fill, may_retry=False)
            return None
        page = pending.reply
        events = page.get("events") if isinstance(page, dict) else None
        if not isinstance(events, list):
            self._note(
                f"events_since replied with {type(page).__name__} instead of an object with an "
                "'events' list; continuing with what arrived"
            )
            self._finish(fill, may_retry=False)
            return None
        last_in_page = fill.cursor
        for event in events:
            seq = seq_of(event) if isinstance(event, dict) else None
            if seq is None:
                logger.warning("events_since returned an entry without event_seq: %r", event)
                continue
            last_in_page = max(last_in_page, seq)
            self._deliver_in_order(event, seq)
            fill.recovered += 1
        next_seq = page.get("next_seq")
        cursor = next_seq if isinstance(next_seq, int) and not isinstance(next_seq, bool) else last_in_page
        cursor = max(cursor, last_in_page)
        more = page.get("more") is True
        if more and cursor > fill.cursor:
            fill.cursor = cursor
            return self._request_page(fill)
        if more:
            self._note("events_since said more events follow but returned none; stopping")
        fill.cursor = max(cursor, fill.cursor)
        return self._finish(fill)

    def _begin(self, link: Link, buffered: list[dict[str, Any]]) -> bytes:
        fill = GapFill(link, self.last_seq)
        fill.buffer.extend(buffered)
        self.fill = fill
        return self._request_page(fill)

    def _finish(self, fill: GapFill, *, may_retry: bool = True) -> bytes | None:
        """Deliver the buffered live events after a fill; may ask once more if a gap remains."""
        buffered = sorted(fill.buffer, key=lambda e: seq_of(e) or 0)
        first_new = next((s for s in map(seq_of, buffered) if s is not None and s > self.last_seq), None)
        gap_remains = first_new is not None and first_new > self.last_seq + 1
        if may_retry and gap_remains and fill.rounds < MAX_FILL_ROUNDS:
            fill.rounds += 1
            fill.cursor = self.last_seq
            return self._request_page(fill)
        self.fill = None
        for event in buffered:
            seq = seq_of(event)
            assert seq is not None
            self._deliver_in_order(event, seq)
        logger.debug("gap fill recovered %d events; last_seq now %d", fill.recovered, self.last_seq)
        return None

    def _deliver_in_order(self, event: dict[str, Any], seq: int) -> None:
        if seq <= self.last_seq:
            self.duplicates_dropped += 1
            return
        if seq != self.last_seq + 1:
            self._note(f"events {self.last_seq + 1}..{seq - 1} are lost (not in the trainer's event store)")
        self._deliver(event)
        self.last_seq = seq
