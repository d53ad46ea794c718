"""`WebDashboard`: the small aiohttp server behind `onthefly dashboard` (page, static files, one WebSocket).

It sits on top of a client engine (`DashboardServer` for trainers that connect over TCP, or
`ProcessDashboard` for a script it started) and runs its own event loop on a thread, so the
caller (the CLI, a test, a notebook) keeps its own thread.

Security: it listens on loopback only unless `allow_remote=True`; the page and the WebSocket
need the random token printed with the URL (403 otherwise, compared in constant time); the
WebSocket also refuses a browser `Origin` other than the page's own, and on loopback a `Host`
header that is not a loopback name (DNS rebinding). Static files (the page's own code and the
charting library, the same bytes as in the wheel) are served without the token; they carry no
run data.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import socket
import threading
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from ..client import DashboardBase
from ..control.tcp import is_loopback_host
from .hub import PageHub
from .page import PageSession

__all__ = ["WebDashboard", "DEFAULT_HTTP_PORT", "STATIC_DIR", "new_token"]

logger = logging.getLogger(__name__)

DEFAULT_HTTP_PORT = 8765
STATIC_DIR = Path(__file__).resolve().parent / "static"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
# Headers on the page: no caching, no Referer (the URL carries the token), a strict CSP.
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
}


def new_token() -> str:
    """A fresh random token for one dashboard start (URL-safe, 128 bits)."""
    return secrets.token_urlsafe(16)


def host_name(host_header: str) -> str:
    """The name part of a `Host` header (`[::1]:8765` -> `::1`, `localhost:1` -> `localhost`)."""
    text = host_header.strip()
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text[1:]
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


class WebDashboard:
    """Serve the dashboard page for `dash` on `host:port`; see the module docstring.

    Create it before starting `dash`, so the page history holds every event from the first.
    `describe` adds fields to the page's hello message (`mode`, `trainer`, ...).
    """

    def __init__(
        self,
        dash: DashboardBase,
        host: str = "127.0.0.1",
        port: int = DEFAULT_HTTP_PORT,
        *,
        allow_remote: bool = False,
        token: str | None = None,
        describe: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(host, str) or not host:
            raise ValueError(f"host must be a non-empty string, got {host!r}")
        if not allow_remote and not is_loopback_host(host):
            raise ValueError(
                f"refusing to serve the dashboard on non-loopback host {host!r}: anyone who can reach it "
                "and learns the token can steer the run; pass allow_remote=True if you really want that"
            )
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an int in 0..65535, got {port!r}")
        if token is not None and (not isinstance(token, str) or len(token) < 16):
            raise ValueError("token must be a string of at least 16 characters")
        self.dash = dash
        self.host = host
        self.port = port
        self.allow_remote = allow_remote
        self.token = token or new_token()
        self.describe = dict(describe or {})
        self.instance = uuid.uuid4().hex
        self.hub = PageHub(dash)
        self.pages_open = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._stopped: asyncio.Event | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        """The page's address, token included."""
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{shown}:{self.port}/?token={self.token}"

    def start(self, timeout: float = 10.0) -> WebDashboard:
        """Bind (here, so a busy port fails at once) and serve on a background thread."""
        if self._thread is not None:
            raise RuntimeError("WebDashboard.start() was already called")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot serve the dashboard on {self.host}:{self.port}: {exc.strerror or exc}") from exc
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._thread_main, args=(sock,), name="onthefly-web", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the dashboard web server did not start within {timeout} s")
        if self._startup_error is not None:
            raise self._startup_error
        return self

    def close(self) -> None:
        """Close every page and stop serving. Safe to call twice."""
        loop, stopped = self._loop, self._stopped
        if loop is not None and stopped is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stopped.set)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10.0)

    def __enter__(self) -> WebDashboard:
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _thread_main(self, sock: socket.socket) -> None:
        try:
            asyncio.run(self._serve(sock))
        except BaseException as exc:  # reported to start(); after startup, logged
            if not self._ready.is_set():
                self._startup_error = exc
                self._ready.set()
            else:
                logger.exception("the dashboard web server stopped on an error")
        finally:
            sock.close()

    async def _serve(self, sock: socket.socket) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        try:
            await web.SockSite(runner, sock).start()
            self._ready.set()
            logger.info("dashboard page on http://%s:%d/", self.host, self.port)
            await self._stopped.wait()
        finally:
            await runner.cleanup()

    # ------------------------------------------------------------------ the app

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self._page)
        app.router.add_get("/ws", self._websocket)
        app.router.add_static("/static/", STATIC_DIR, follow_symlinks=False)
        return app

    def _forbidden(self, request: web.Request) -> str | None:
        """Why `request` is refused, or None when it may proceed."""
        supplied = request.query.get("token", "")
        if not hmac.compare_digest(supplied.encode("utf-8"), self.token.encode("utf-8")):
            return "missing or wrong token"
        if not self.allow_remote and host_name(request.host) not in LOOPBACK_NAMES | {self.host}:
            return f"Host {request.host!r} is not a loopback name"
        return None

    async def _page(self, request: web.Request) -> web.StreamResponse:
        reason = self._forbidden(request)
        if reason is not None:
            return web.Response(status=403, text=f"403 forbidden: {reason}\n", headers={"Cache-Control": "no-store"})
        return web.FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        reason = self._forbidden(request)
        origin = request.headers.get("Origin")
        if reason is None and origin is not None and urlsplit(origin).netloc != request.host:
            reason = f"Origin {origin!r} is not this dashboard"
        if reason is not None:
            return web.Response(status=403, text=f"403 forbidden: {reason}\n")
        size = self.hub.size()
        start, reset = self._resume_point(request, size)
        # No permessage-deflate: on loopback, compressing megabytes of JSON a second only spends
        # CPU on both ends (CPU the training shares).
        ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=16 * 1024 * 1024, compress=False)
        await ws.prepare(request)
        self.pages_open += 1
        try:
            session = PageSession(
                ws, self.hub, self.dash, start=start, reset=reset, describe=self.describe, instance=self.instance
            )
            await session.run()
        finally:
            self.pages_open -= 1
            await ws.close()
        return ws

    def _resume_point(self, request: web.Request, size: int) -> tuple[int, bool]:
        """Where a page's stream starts: where it left off when it names this instance, else 0."""
        if request.query.get("instance") != self.instance:
            return 0, "instance" in request.query
        try:
            start = int(request.query.get("from", "0"))
        except ValueError:
            return 0, True
        if not 0 <= start <= size:
            return 0, True
        return start, False
