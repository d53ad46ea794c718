"""A torch-free stand-in trainer that speaks the wire: for fast tests of the page server's protocol.

As a module: `WireTrainer(port)` connects to a DashboardServer over TCP. As a script:
`python fake_trainer.py N` speaks over stdin/stdout (as `onthefly dashboard --run` expects),
sends N trainStep events, and exits with status 3 when it receives `stop`.
Replies: `status` -> {"step": ...}; `boom` -> ok: false, code `failed`; `events_since` -> its store.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from typing import Any, Callable

SESSION = "sess-fake"


class WireProtocol:
    """Stamps events, keeps them for events_since, answers requests on `write`."""

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self.write_raw = write
        self.lock = threading.Lock()
        self.seq = 0
        self.store: list[dict[str, Any]] = []
        self.stopped = threading.Event()

    def emit(self, type_: str, **fields: Any) -> dict[str, Any]:
        with self.lock:
            self.seq += 1
            event = {"type": type_, "session_id": SESSION, "run_id": "baseline", "run_gen": 0,
                     "ts": time.time(), "event_seq": self.seq, **fields}
            self.store.append(event)
            self.write_raw((json.dumps(event) + "\n").encode())
        return event

    def reply(self, rid: Any, ok: bool, data: Any = None, code: str | None = None, error: str | None = None) -> None:
        msg: dict[str, Any] = {"id": rid, "ok": ok}
        if ok:
            msg["data"] = data
        else:
            msg.update(code=code, error=error)
        with self.lock:
            self.write_raw((json.dumps(msg) + "\n").encode())

    def handle(self, line: bytes) -> None:
        msg = json.loads(line)
        cmd, rid, payload = msg.get("cmd"), msg.get("id"), msg.get("payload") or {}
        if cmd == "status":
            self.reply(rid, True, {"step": self.seq, "paused": False})
        elif cmd == "boom":
            self.reply(rid, False, code="failed", error="boom failed: RuntimeError: on purpose")
        elif cmd == "events_since":
            after = payload.get("event_seq", 0)
            with self.lock:
                events = [e for e in self.store if e["event_seq"] > after]
            self.reply(rid, True, {"events": events, "next_seq": events[-1]["event_seq"] if events else after, "more": False})
        elif cmd == "stop":
            self.reply(rid, True, {"status": "stopping"})
            self.stopped.set()
        else:
            self.reply(rid, False, code="unknown_command", error=f"unknown command {cmd!r}")


class WireTrainer:
    """Connects to a DashboardServer on 127.0.0.1:`port` and serves requests on a thread."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.settimeout(None)
        self.proto = WireProtocol(self.sock.sendall)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with self.sock.makefile("rb") as reader:
            for line in reader:
                self.proto.handle(line)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError as exc:  # already reset by the dashboard closing first
            print(f"fake trainer: shutdown: {exc}", file=sys.stderr)
        self.sock.close()


def main(steps: int) -> int:
    out = sys.stdout.buffer

    def write(data: bytes) -> None:
        out.write(data)
        out.flush()

    proto = WireProtocol(write)
    proto.emit("session_started", project="fake", run_name="baseline")
    proto.emit("newRun", parents=[], meta={"kind": "root"})
    for step in range(1, steps + 1):
        proto.emit("trainStep", step=step, loss=1.0 / step, epoch=0)
    for line in sys.stdin.buffer:
        proto.handle(line)
        if proto.stopped.is_set():
            proto.emit("trainingFinished", status="stopped", step=steps)
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
