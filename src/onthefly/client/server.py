"""`DashboardServer`: listen on loopback TCP and accept one training process at a time.

The trainer connects out to 127.0.0.1 (`ONTHEFLY_DASHBOARD_PORT`, default 47621) and may
reconnect after a drop; a second trainer arriving while one is connected is refused and noted.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
from typing import Any

from ..control.tcp import is_loopback_host  # no torch: the client stays light
from .base import DashboardBase
from .link import Link
from .wire import resolve_port, set_send_timeout

__all__ = ["DashboardServer", "ADMIT_GRACE_S", "SEND_TIMEOUT_S"]

logger = logging.getLogger(__name__)

# A trainer that has just dropped its socket may still have its reader winding down when it
# reconnects; give the old link this long to finish before refusing the new one as a second trainer.
ADMIT_GRACE_S = 0.5
# Bounded wait for a socket write; a trainer that stops reading for this long is treated as gone.
SEND_TIMEOUT_S = 10.0


class DashboardServer(DashboardBase):
    """Listen on TCP for a training process (one at a time) and steer it."""

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        *,
        allow_remote: bool = False,
        keep_events: int | None = None,
    ) -> None:
        super().__init__(keep_events=keep_events)
        if not isinstance(host, str) or not host:
            raise ValueError(f"host must be a non-empty string, got {host!r}")
        if not allow_remote and not is_loopback_host(host):
            raise ValueError(
                f"refusing to listen on non-loopback host {host!r}: the wire has no authentication; "
                "pass allow_remote=True if you really want that"
            )
        self.host = host
        self.port = resolve_port(port)
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """(host, bound port)."""
        return (self.host, self.port)

    def start(self) -> DashboardServer:
        """Bind, listen and start accepting trainers; returns self."""
        if self._started:
            raise RuntimeError("DashboardServer.start() was already called")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, self.port))
            listener.listen(8)
        except OSError as exc:
            listener.close()
            raise OSError(exc.errno, f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from exc
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._started = True
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="onthefly-dashboard-accept", daemon=True
        )
        self._accept_thread.start()
        logger.info("dashboard listening on %s:%d", self.host, self.port)
        return self

    def _accept_loop(self) -> None:
        assert self._listener is not None and self._wake_r is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._closed:
                for key, _ in selector.select():
                    if key.fileobj is self._wake_r or self._closed:
                        return
                    try:
                        conn, addr = self._listener.accept()
                    except OSError as exc:
                        if self._closed:
                            return
                        logger.warning("accept failed on %s:%d: %s", self.host, self.port, exc)
                        continue
                    self._admit(conn, addr)

    def _admit(self, conn: socket.socket, addr: Any) -> None:
        peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
        with self._lock:
            current = self._link
        if current is not None and current.thread is not None:
            current.thread.join(ADMIT_GRACE_S)
        link = self._socket_link(conn, peer)
        if not self._attach(link):
            link.shutdown()
            link.release()
            if not self._closed:
                with self._lock:
                    self._note_locked(
                        f"refused a second trainer connection from {peer} while one is connected"
                    )

    @staticmethod
    def _socket_link(conn: socket.socket, peer: str) -> Link:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        set_send_timeout(conn, SEND_TIMEOUT_S)
        reader = conn.makefile("rb")

        def write(data: bytes) -> None:
            conn.sendall(data)

        def shutdown() -> None:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError as exc:  # already reset by the peer; nothing left to stop
                logger.debug("shutdown of %s: %s", peer, exc)

        def release() -> None:
            reader.close()
            conn.close()

        return Link(reader, write, shutdown, release, peer)

    def _close_transport(self) -> None:
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"x")
            except OSError as exc:
                logger.debug("waking the accept thread failed: %s", exc)
        if self._accept_thread is not None and self._accept_thread is not threading.current_thread():
            self._accept_thread.join(timeout=5.0)
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()

    def __repr__(self) -> str:
        state = "connected" if self.connected else "waiting"
        return f"DashboardServer({self.host}:{self.port}, {state})"
