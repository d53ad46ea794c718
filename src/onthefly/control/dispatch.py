"""The command-drain thread: takes validated requests off the bus and runs them in the right place.

Read-only commands are answered here at once (even while the loop is busy or before `fit`);
mutating ones become gate jobs and run on the training thread at the next batch boundary. The
reply is sent when the job finishes, through the same FIFO writer as every event it emitted.
"""

from __future__ import annotations

import logging
import threading
import traceback
from concurrent.futures import Future
from typing import Any

from .envelope import Request, debug_enabled
from .errors import ErrorCode, ProtocolError
from .gate import GateClosed, PauseGate
from .router import CommandRouter, CommandSpec

log = logging.getLogger("onthefly.control")


class CommandDispatcher:
    """Drains `bus` and routes each request to the router, inline or through the gate."""

    def __init__(self, bus: Any, router: CommandRouter, gate: PauseGate) -> None:
        self.bus = bus
        self.router = router
        self.gate = gate
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._drain, name="onthefly-commands", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self.bus.wake_readers()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._thread = None

    def _drain(self) -> None:
        while not self._stop.is_set():
            request = self.bus.next_request(timeout=None)  # stop() wakes it with wake_readers()
            if request is not None:
                self.dispatch(request)

    def dispatch(self, request: Request) -> Future | None:
        """Validate and run one request; returns the gate future for mutating commands."""
        try:
            spec, payload = self.router.validate(request)
        except ProtocolError as exc:
            self.bus.reply_error(request.id, exc.code, exc.message)
            return None
        if not spec.mutating:
            self._answer(request, spec, lambda: self.router.execute(spec, payload))
            return None
        future = self.gate.submit(lambda: self.router.execute(spec, payload), name=spec.name,
                                  replica=(spec.name, payload, "wire"))
        future.add_done_callback(lambda f: self._reply_from_future(request, spec, f))
        return future

    def _answer(self, request: Request, spec: CommandSpec, call: Any) -> None:
        try:
            data = call()
        except ProtocolError as exc:
            self._reply_failure(request, exc.code, exc.message, exc)
        except Exception as exc:  # the router wraps handler errors; this is a last line of defence
            self._reply_failure(request, ErrorCode.FAILED, f"{spec.name} failed: {type(exc).__name__}: {exc}", exc)
        else:
            self._reply_data(request, spec, data)

    def _reply_from_future(self, request: Request, spec: CommandSpec, future: Future) -> None:
        exc = future.exception()
        if exc is None:
            self._reply_data(request, spec, future.result())
        elif isinstance(exc, ProtocolError):
            self._reply_failure(request, exc.code, exc.message, exc)
        elif isinstance(exc, GateClosed):
            self._reply_failure(request, ErrorCode.FAILED, str(exc), exc)
        else:
            self._reply_failure(request, ErrorCode.FAILED, f"{spec.name} failed: {type(exc).__name__}: {exc}", exc)

    def _reply_data(self, request: Request, spec: CommandSpec, data: Any) -> None:
        """Reply with `data`; a handler may return a Future (e.g. a file still being written)."""
        if isinstance(data, Future):
            data.add_done_callback(lambda f: self._reply_from_future(request, spec, f))
        else:
            self.bus.reply(request.id, data)

    def _reply_failure(self, request: Request, code: str, message: str, exc: BaseException) -> None:
        detail = None
        if debug_enabled():
            detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        if code == ErrorCode.FAILED:
            log.warning("command %s failed: %s", request.cmd, message)
        self.bus.reply_error(request.id, code, message, detail)
