"""eventlog: durable, ordered, WAL-mode storage of every event."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from onthefly.control.eventlog import EventLog


def rows(first: int, last: int) -> list[tuple[int, str, str]]:
    return [(seq, "log", f'{{"type":"log","event_seq":{seq}}}') for seq in range(first, last + 1)]


def test_append_read_after_last_seq_and_count(tmp_path):
    log = EventLog(tmp_path / "events.db")
    try:
        assert (log.last_seq(), log.count(), log.read_after(0)) == (0, 0, [])
        log.append_many(rows(1, 5))
        log.append_many([])  # nothing to do, not an error
        assert (log.last_seq(), log.count()) == (5, 5)
        assert log.read_after(0) == [(seq, f'{{"type":"log","event_seq":{seq}}}') for seq in range(1, 6)]
        assert [seq for seq, _ in log.read_after(2, limit=2)] == [3, 4]
        assert log.read_after(5) == []
    finally:
        log.close()


def test_wal_mode_schema_and_parent_folders(tmp_path):
    path = tmp_path / "deep" / "er" / "events.db"
    log = EventLog(path)
    log.append_many(rows(1, 1))
    log.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        columns = [(row[1], row[2], row[3]) for row in conn.execute("PRAGMA table_info(events)")]
        assert columns == [("seq", "INTEGER", 0), ("type", "TEXT", 1), ("ts", "REAL", 0), ("body", "TEXT", 1)]
        assert conn.execute("SELECT type FROM events WHERE seq = 1").fetchone() == ("log",)
    finally:
        conn.close()


def test_events_persist_across_reopen(tmp_path):
    path = tmp_path / "events.db"
    first = EventLog(path)
    first.append_many(rows(1, 3))
    first.close()
    second = EventLog(path)
    try:
        assert second.last_seq() == 3
        second.append_many(rows(4, 4))
        assert [seq for seq, _ in second.read_after(0)] == [1, 2, 3, 4]
    finally:
        second.close()


def test_duplicate_seq_raises_and_keeps_nothing_of_the_batch(tmp_path):
    log = EventLog(tmp_path / "events.db")
    try:
        log.append_many(rows(1, 3))
        with pytest.raises(sqlite3.IntegrityError):
            log.append_many(rows(4, 5) + rows(2, 2))
        assert log.count() == 3 and log.last_seq() == 3
        log.append_many(rows(4, 5))  # the log is still usable afterwards
        assert log.last_seq() == 5
    finally:
        log.close()


def test_a_batch_of_several_statements_is_one_transaction(tmp_path):
    log = EventLog(tmp_path / "events.db")
    try:
        log.append_many(rows(1, 600))  # three INSERT statements
        assert log.count() == 600 and [seq for seq, _ in log.read_after(597)] == [598, 599, 600]
        with pytest.raises(sqlite3.IntegrityError):  # the duplicate is in the last statement
            log.append_many(rows(601, 1100) + rows(600, 600))
        assert log.count() == 600 and log.last_seq() == 600
    finally:
        log.close()


def test_temporary_log_is_deleted_on_close_and_close_is_idempotent():
    log = EventLog(None)
    path = log.path
    log.append_many(rows(1, 2))
    assert path.exists()
    log.close()
    log.close()
    assert not path.exists() and not path.with_name(path.name + "-wal").exists()
    with pytest.raises(RuntimeError, match="is closed"):
        log.last_seq()


def test_bad_arguments(tmp_path):
    log = EventLog(None)
    try:
        with pytest.raises(ValueError, match="limit must be a positive integer, got 0"):
            log.read_after(0, limit=0)
        with pytest.raises(ValueError, match="seq must be an integer"):
            log.read_after("1")  # type: ignore[arg-type]
    finally:
        log.close()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        EventLog(tmp_path)


def test_concurrent_writer_and_readers_see_a_consistent_prefix(tmp_path):
    log = EventLog(tmp_path / "events.db")
    errors: list[str] = []
    done = threading.Event()

    def write() -> None:
        for start in range(1, 2001, 50):
            log.append_many(rows(start, start + 49))
        done.set()

    def read() -> None:
        while not done.is_set():
            seqs = [seq for seq, _ in log.read_after(0, limit=5000)]
            if seqs != list(range(1, len(seqs) + 1)) or len(seqs) % 50:
                errors.append(f"torn read of {len(seqs)} rows")

    threads = [threading.Thread(target=write)] + [threading.Thread(target=read) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    try:
        assert errors == []
        assert log.count() == 2000
    finally:
        log.close()
