"""Helpers shared by the benchmark scripts: a loopback dashboard in another process, medians."""

from __future__ import annotations

import statistics
import subprocess
import sys
from contextlib import contextmanager
from typing import Iterator

_LISTENER = r"""
import socket, sys, threading
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(4)
print(srv.getsockname()[1], flush=True)
def drain(conn):
    while conn.recv(1 << 20):
        pass
    conn.close()  # like a real dashboard: close our side when the trainer closes its side
while True:
    conn, _ = srv.accept()
    threading.Thread(target=drain, args=(conn,), daemon=True).start()
"""


@contextmanager
def loopback_dashboard() -> Iterator[int]:
    """A process that listens on a loopback port and reads (and discards) everything sent to it."""
    proc = subprocess.Popen([sys.executable, "-c", _LISTENER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        yield port
    finally:
        proc.kill()
        proc.wait()


def median(values: list[float]) -> float:
    return statistics.median(values)
