"""The durable event log: every event a session emits, in SQLite (WAL), keyed by `event_seq`.

The bus persists each batch here before sending it, so a dashboard that was away (or connects
late) can be replayed exactly what it missed, in order. One connection guarded by a lock serves
the writer thread (appends) and readers (replay, `events_since`).
"""

from __future__ import annotations

import functools
import os
import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["EventLog"]

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS events ("
    "seq INTEGER PRIMARY KEY, type TEXT NOT NULL, ts REAL, body TEXT NOT NULL)"
)


# Four bound values a row; 249 rows stay under SQLite's smallest variable limit (999).
_ROWS_PER_INSERT = 249


@functools.lru_cache(maxsize=_ROWS_PER_INSERT)
def _insert_sql(n: int) -> str:
    return "INSERT INTO events (seq, type, ts, body) VALUES " + ", ".join(["(?, ?, ?, ?)"] * n)


def _flatten(rows: list[tuple[int, str, str]], ts: float) -> list[Any]:
    values: list[Any] = []
    for seq, kind, body in rows:
        values += (seq, kind, ts, body)
    return values


class EventLog:
    """An append-only table of `(event_seq, type, json_text)`.

    `path` None gives a private temporary file, deleted on `close` (the replay logic is the
    same either way). `ts` records when a row was persisted; the event's own `ts` is in `body`.
    """

    def __init__(self, path: str | os.PathLike | None) -> None:
        self._temporary = path is None
        if path is None:
            fd, name = tempfile.mkstemp(prefix="onthefly-events-", suffix=".db")
            os.close(fd)
            self.path = Path(name)
        else:
            self.path = Path(path)
            if self.path.exists() and self.path.is_dir():
                raise IsADirectoryError(f"event log path {str(self.path)!r} is a directory, expected a file")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: we open our own transactions, so one batch is one commit.
        conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(
                    f"event log {str(self.path)!r} could not switch to WAL (journal_mode={mode})"
                )
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(_SCHEMA)
        except sqlite3.Error:
            conn.close()
            raise
        self._conn: sqlite3.Connection | None = conn

    def append_many(self, rows: list[tuple[int, str, str]]) -> None:
        """Persist `(event_seq, type, json_text)` rows atomically.

        A seq already present raises `sqlite3.IntegrityError` and nothing of the batch is kept.
        A batch is written with one multi-row INSERT per 249 rows (one statement step instead of
        one per row: each step releases and retakes the interpreter lock, which the training
        thread then has to win back), inside one transaction when it takes several.
        """
        if not rows:
            return
        ts = float(time.time())  # one timestamp per batch
        chunks = [rows[i:i + _ROWS_PER_INSERT] for i in range(0, len(rows), _ROWS_PER_INSERT)]
        with self._lock:
            conn = self._open_conn()
            if len(chunks) == 1:
                conn.execute(_insert_sql(len(rows)), _flatten(rows, ts))  # one statement: atomic
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                for chunk in chunks:
                    conn.execute(_insert_sql(len(chunk)), _flatten(chunk, ts))
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def read_after(self, seq: int, limit: int = 1000) -> list[tuple[int, str]]:
        """`(event_seq, json_text)` of the events after `seq`, ascending, at most `limit`."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise ValueError(f"limit must be a positive integer, got {limit!r}")
        if isinstance(seq, bool) or not isinstance(seq, int):
            raise ValueError(f"seq must be an integer, got {seq!r}")
        with self._lock:
            cursor = self._open_conn().execute(
                "SELECT seq, body FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)
            )
            return cursor.fetchall()

    def last_seq(self) -> int:
        """The highest stored `event_seq`; 0 when the log is empty."""
        with self._lock:
            row = self._open_conn().execute("SELECT MAX(seq) FROM events").fetchone()
        return int(row[0]) if row[0] is not None else 0

    def count(self) -> int:
        """How many events are stored."""
        with self._lock:
            return int(self._open_conn().execute("SELECT COUNT(*) FROM events").fetchone()[0])

    @property
    def closed(self) -> bool:
        return self._conn is None

    def close(self) -> None:
        """Close the database; a temporary log is deleted. Idempotent."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is None:
            return
        conn.close()
        if self._temporary:
            for suffix in ("", "-wal", "-shm"):
                try:
                    os.unlink(f"{self.path}{suffix}")
                except FileNotFoundError:
                    continue

    def _open_conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"event log {str(self.path)!r} is closed")
        return self._conn

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else "open"
        return f"EventLog({str(self.path)!r}, {state})"
