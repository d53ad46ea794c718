"""The page-facing history: every trainer event and link change, in delivery order, encoded once.

`PageHub` subscribes to a client engine (`DashboardServer` or `ProcessDashboard`) before it
starts, so it sees every event from the first one. Each item is kept as its JSON text and has an
index (0, 1, 2, ...); a page reads the history from any index, which is how a page opened late
gets everything from the start exactly once, and how a page whose WebSocket dropped resumes
where it stopped. Nothing is dropped: display downsampling happens in the page.

Besides the trainer's own events the hub records a few of its own, with dotted type names so
they can never clash with the trainer's: `dashboard.connection` (a trainer attached or went away)
and `dashboard.process_exit` (the script started by `--run` exited). Pure Python, no aiohttp.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ..client import DashboardBase

try:  # orjson is a core dependency; the stdlib is the fallback for exotic installs
    import orjson as _orjson
except ImportError:  # pragma: no cover - exercised only without orjson
    _orjson = None

__all__ = ["PageHub", "encode_json", "CONNECTION_TYPE", "PROCESS_EXIT_TYPE"]

logger = logging.getLogger(__name__)

CONNECTION_TYPE = "dashboard.connection"
PROCESS_EXIT_TYPE = "dashboard.process_exit"


def encode_json(item: Any) -> str:
    """Compact JSON text for a history item or a message to the page (non-finite floats become null)."""
    if _orjson is not None:
        try:
            return _orjson.dumps(item).decode("utf-8")
        except TypeError as exc:  # an exotic value (a huge int): the stdlib renders it as text
            logger.debug("orjson could not encode an event (%s); using json", exc)
    return json.dumps(item, separators=(",", ":"), ensure_ascii=False, default=str)


class PageHub:
    """Ordered, append-only history of what the page shows, with thread-safe wake-ups.

    Items are appended on the client engine's dispatcher thread; readers call `size()` and
    `read(start, limit)` from any thread. Each listener added with `add_listener` is called
    (without the lock held) after every append, so keep it cheap: the web server's listener only
    schedules a wake-up on its event loop.
    """

    def __init__(self, dash: DashboardBase) -> None:
        self.dash = dash
        self._items: list[str] = []
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []
        self.trainer_events = 0
        dash.on_event(self._on_event)
        dash.on_connection_change(self._on_connection)

    # ------------------------------------------------------------------ writing

    def publish(self, item: dict[str, Any]) -> int:
        """Append one item (a dict with a string `type`); returns its index."""
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            raise ValueError(f"a hub item must be a dict with a string 'type', got {item!r}")
        text = encode_json(item)
        with self._lock:
            self._items.append(text)
            index = len(self._items) - 1
            listeners = list(self._listeners)
        for listener in listeners:
            listener()
        return index

    def _on_event(self, event: dict[str, Any]) -> None:
        self.trainer_events += 1
        self.publish(event)

    def _on_connection(self, connected: bool) -> None:
        self.publish({"type": CONNECTION_TYPE, "connected": connected, "ts": time.time()})

    # ------------------------------------------------------------------ reading

    def size(self) -> int:
        """How many items the history holds (the next item's index)."""
        with self._lock:
            return len(self._items)

    def read(self, start: int, limit: int) -> list[str]:
        """Up to `limit` items from index `start` on, as JSON texts."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        with self._lock:
            return self._items[start : start + limit]

    def decoded(self) -> list[dict[str, Any]]:
        """The whole history as dicts (for tests and tools; the page reads JSON texts)."""
        with self._lock:
            texts = list(self._items)
        return [json.loads(text) for text in texts]

    # ------------------------------------------------------------------ listeners

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after every append, from the appending thread."""
        if not callable(listener):
            raise TypeError(f"add_listener needs a callable, got {type(listener).__name__}")
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        """Stop calling `listener`; unknown listeners are an error (a bookkeeping bug)."""
        with self._lock:
            self._listeners.remove(listener)
