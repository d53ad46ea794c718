"""One open page: its WebSocket, the history pump that feeds it, and the commands it sends.

Messages are JSON text frames. Server to page:

- `{"op": "hello", "instance", "version", "mode", "trainer", "from", "size", "reset"}` once, first;
- `{"op": "events", "from": i, "items": [...]}`: history items i, i+1, ... in order, batched;
- `{"op": "reply", "id", "cmd", "ok": true, "data"}` or `{"op": "reply", "id", "cmd", "ok": false,
  "code", "error"}` for each command;
- `{"op": "error", "code": "bad_request", "error"}` for a frame the server could not understand.

Page to server: `{"op": "cmd", "id": str|int, "cmd": str, "payload": object}`. A command is run
with the client engine's `request()` on a worker thread, so a long one (a report) never holds up
the event stream or another command.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from typing import Any

from aiohttp import WSMsgType, web

from .._version import __version__
from ..client import DashboardBase, RequestError, TrainerDisconnected
from ..client.wire import reply_timeout
from .hub import PageHub, encode_json

__all__ = ["PageSession", "MAX_ITEMS_PER_FRAME", "COALESCE_S"]

logger = logging.getLogger(__name__)

# One frame carries at most this many history items (a late page catches up in big frames).
MAX_ITEMS_PER_FRAME = 2000
# While events stream in, wait this long after a frame so the next one carries many events.
COALESCE_S = 0.05
# Command ids are echoed back; anything longer than this is a page bug, not an id.
MAX_ID_CHARS = 128


class BadPageMessage(ValueError):
    """A frame from the page is not a command the server understands; the message says why."""


def parse_page_message(text: str) -> tuple[str | int, str, dict[str, Any]]:
    """`(id, cmd, payload)` of one page frame; BadPageMessage naming what is wrong otherwise."""
    try:
        msg = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadPageMessage(f"frame is not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(msg, dict):
        raise BadPageMessage(f"frame must be a JSON object, got {type(msg).__name__}")
    if msg.get("op") != "cmd":
        raise BadPageMessage(f"op must be 'cmd', got {msg.get('op')!r}")
    request_id = msg.get("id")
    if isinstance(request_id, bool) or not isinstance(request_id, (str, int)):
        raise BadPageMessage(f"id must be a string or an integer, got {request_id!r}")
    if isinstance(request_id, str) and len(request_id) > MAX_ID_CHARS:
        raise BadPageMessage(f"id is longer than {MAX_ID_CHARS} characters")
    cmd = msg.get("cmd")
    if not isinstance(cmd, str) or not cmd.strip():
        raise BadPageMessage(f"cmd must be a non-empty string, got {cmd!r}")
    payload = msg.get("payload")
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise BadPageMessage(f"payload of {cmd!r} must be an object, got {type(payload).__name__}")
    return request_id, cmd.strip(), payload


class PageSession:
    """Serve one WebSocket: hello, then the history from `start` on, while answering commands."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        hub: PageHub,
        dash: DashboardBase,
        *,
        start: int,
        reset: bool,
        describe: dict[str, Any],
        instance: str,
    ) -> None:
        self.ws = ws
        self.hub = hub
        self.dash = dash
        self.start = start
        self.reset = reset
        self.describe = describe
        self.instance = instance
        self.sent_items = 0
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._wake_scheduled = False
        self._send_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ wake-ups from other threads

    def _wake_from_any_thread(self) -> None:
        # Called after every hub append, on the engine's dispatcher thread: one loop wake-up per
        # burst, not one per event.
        if self._wake_scheduled:
            return
        self._wake_scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._wake_now)
        except RuntimeError:  # the loop is closing; the page is going away with it
            self._wake_scheduled = False

    def _wake_now(self) -> None:
        self._wake_scheduled = False
        self._wake.set()

    # ------------------------------------------------------------------ the session

    async def run(self) -> None:
        """Until the page closes: stream history and live items, run the commands it sends."""
        self.hub.add_listener(self._wake_from_any_thread)
        pump = asyncio.create_task(self._pump(), name="onthefly-page-pump")
        try:
            await self._send(
                encode_json(
                    {
                        "op": "hello",
                        "instance": self.instance,
                        "version": __version__,
                        "from": self.start,
                        "size": self.hub.size(),
                        "reset": self.reset,
                        **self.describe,
                    }
                )
            )
            async for msg in self.ws:
                if msg.type == WSMsgType.TEXT:
                    self._handle_text(msg.data)
                elif msg.type == WSMsgType.ERROR:
                    logger.info("page websocket failed: %s", self.ws.exception())
                    break
                else:
                    await self._send_error(f"expected text frames, got {msg.type.name}")
        finally:
            self.hub.remove_listener(self._wake_from_any_thread)
            pump.cancel()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(pump, *self._tasks, return_exceptions=True)

    async def _send(self, text: str) -> None:
        async with self._send_lock:
            await self.ws.send_str(text)

    async def _send_error(self, message: str) -> None:
        await self._send(encode_json({"op": "error", "code": "bad_request", "error": message}))

    async def _pump(self) -> None:
        cursor = self.start
        try:
            while not self.ws.closed:
                items = self.hub.read(cursor, MAX_ITEMS_PER_FRAME)
                if items:
                    frame = '{"op":"events","from":%d,"items":[%s]}' % (cursor, ",".join(items))
                    await self._send(frame)
                    cursor += len(items)
                    self.sent_items += len(items)
                    if len(items) < MAX_ITEMS_PER_FRAME:
                        await asyncio.sleep(COALESCE_S)
                    continue
                self._wake.clear()
                if self.hub.size() > cursor:
                    continue
                await self._wake.wait()
        except ConnectionResetError as exc:  # the page went away mid-frame; run() sees the close
            logger.debug("page closed while sending: %s", exc)

    # ------------------------------------------------------------------ commands

    def _handle_text(self, text: str) -> None:
        try:
            request_id, cmd, payload = parse_page_message(text)
        except BadPageMessage as exc:
            self._spawn(self._send_error(str(exc)))
            return
        self._spawn(self._run_command(request_id, cmd, payload))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_command(self, request_id: str | int, cmd: str, payload: dict[str, Any]) -> None:
        reply: dict[str, Any] = {"op": "reply", "id": request_id, "cmd": cmd}
        call = functools.partial(self.dash.request, cmd, payload, timeout=reply_timeout(cmd))
        try:
            data = await self._loop.run_in_executor(None, call)
        except TrainerDisconnected as exc:
            reply.update(ok=False, code="disconnected", error=exc.message)
        except RequestError as exc:
            reply.update(ok=False, code=exc.code or "failed", error=exc.message)
        except TimeoutError as exc:
            reply.update(ok=False, code="timeout", error=str(exc))
        except (TypeError, ValueError) as exc:  # the payload cannot be sent as JSON
            reply.update(ok=False, code="bad_request", error=str(exc))
        else:
            reply.update(ok=True, data=data)
        try:
            await self._send(encode_json(reply))
        except ConnectionResetError as exc:
            logger.info("page closed before the reply to %s could be sent: %s", cmd, exc)
