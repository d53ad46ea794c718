"""Stalled-dashboard benchmark: what a dashboard that stops reading costs in memory and durability.

Each scenario runs in a fresh process: a bus connected over loopback TCP to a dashboard that
either reads everything (the baseline) or accepts and never reads (the stall), while a
training-like producer emits metrics-sized `trainStep`s and 2 KB `log` lines for N seconds.
Printed per scenario: RSS growth over the run, events emitted, events in `events.db` at the
end (read by this parent process while the child still runs: what a kill -9 would leave), the
persist lag (emitted minus persisted), and how far the sender got. The stall's RSS growth is
also printed as a ratio to the baseline's.

Run: python benchmarks/stall.py [--seconds 20] [--quick]
"""

from __future__ import annotations

import argparse
import json
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

PRODUCER = textwrap.dedent(
    """
    import json, sys, time
    from onthefly.control import ControlBus, EventLog, TcpClientChannel

    def rss_kib():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    port, db, seconds = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    bus = ControlBus(TcpClientChannel(port=port, reconnect_initial=0.01), event_log=EventLog(db))
    bus.start()
    deadline = time.monotonic() + 10
    while not bus.connected and time.monotonic() < deadline:
        time.sleep(0.005)
    pad = "x" * 2000
    # Warm up (imports, SQLite, first sends) before taking the baseline RSS.
    for i in range(200):
        bus.emit("log", {"text": pad})
    bus.flush(5.0, **({"wire": False} if "wire" in ControlBus.flush.__code__.co_varnames else {}))
    start_rss = rss_kib()
    step = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        step += 1
        bus.emit("trainStep", {"step": step, "loss": 0.5, "val_loss": 0.6, "epoch": 1, "lr": 1e-3,
                               "grad_norm": 1.0, "throughput": 1000.0})
        if step % 2 == 0:
            bus.emit("log", {"text": pad, "step": step})
        time.sleep(0.001)
    emitted = bus.last_seq()
    time.sleep(0.3)  # three linger intervals: what a kill -9 at this moment would keep
    print(json.dumps({"emitted": emitted, "steps": step, "rss_growth_kib": rss_kib() - start_rss,
                      "sent_seq": getattr(bus, "sent_seq", None)}), flush=True)
    sys.stdin.readline()  # the parent reads events.db now, then lets us go
    """
)


class Dashboard:
    """Loopback listener that reads everything (`reading=True`) or accepts and never reads."""

    def __init__(self, reading: bool) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.reading = reading
        self.conn: socket.socket | None = None
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.conn, _ = self.listener.accept()
        while self.reading:
            try:
                if not self.conn.recv(1 << 20):
                    return
            except OSError:
                return

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


def run(reading: bool, seconds: float) -> dict:
    dashboard = Dashboard(reading)
    with tempfile.TemporaryDirectory() as folder:
        db = Path(folder) / "events.db"
        child = subprocess.Popen(
            [sys.executable, "-c", PRODUCER, str(dashboard.port), str(db), str(seconds)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        try:
            result = json.loads(child.stdout.readline())
            with sqlite3.connect(str(db)) as reader:  # another process, while the producer lives
                persisted, count = reader.execute("SELECT MAX(seq), COUNT(*) FROM events").fetchone()
            result["persisted"] = persisted or 0
            result["complete"] = count == persisted
        finally:
            child.kill()
            child.wait()
            dashboard.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--quick", action="store_true", help="5 s per scenario")
    args = parser.parse_args()
    seconds = 5.0 if args.quick else args.seconds
    results = {"reading": run(True, seconds), "stalled": run(False, seconds)}
    print(f"{seconds:.0f} s per scenario; trainStep every ~1 ms plus a 2 KB log every 2 ms")
    print(f"{'scenario':<10} {'emitted':>9} {'persisted':>10} {'lag':>6} {'sent':>9} {'RSS growth':>12}")
    for name, r in results.items():
        sent = "?" if r["sent_seq"] is None else str(r["sent_seq"])
        print(f"{name:<10} {r['emitted']:>9} {r['persisted']:>10} {r['emitted'] - r['persisted']:>6} "
              f"{sent:>9} {r['rss_growth_kib'] / 1024:>9.1f} MiB")
    base = max(results["reading"]["rss_growth_kib"], 1024)  # at least 1 MiB, so the ratio means something
    print(f"stalled RSS growth vs reading: {results['stalled']['rss_growth_kib'] / base:.2f}x "
          f"(of max(reading growth, 1 MiB)); log complete: {results['stalled']['complete']}")


if __name__ == "__main__":
    main()
