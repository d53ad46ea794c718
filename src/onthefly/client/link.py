"""One trainer connection (`Link`) and one request waiting for its reply on it (`Pending`).

A transport (TCP socket, child process pipes) wraps its streams in a `Link`; the engine reads
lines from `Link.reader` on one thread and writes whole lines through `Link.write_line` from any.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, BinaryIO

from .wire import RequestError

__all__ = ["Link", "Pending"]


class Link:
    """One trainer connection: a binary line source plus a writer that never interleaves lines."""

    def __init__(
        self,
        reader: BinaryIO,
        write: Callable[[bytes], None],
        shutdown: Callable[[], None],
        release: Callable[[], None],
        peer: str,
    ) -> None:
        self.reader = reader
        self.peer = peer
        self.thread: threading.Thread | None = None
        self._write = write
        self._shutdown = shutdown
        self._release = release
        self._write_lock = threading.Lock()
        self._down = False

    def write_line(self, data: bytes) -> None:
        """Write one whole line; on failure the link is shut down (a partial line poisons it)."""
        with self._write_lock:
            if self._down:
                raise BrokenPipeError(f"link to {self.peer} is closed")
            try:
                self._write(data)
            except (OSError, ValueError) as exc:  # ValueError: the pipe was closed under us
                self._down = True
                self._shutdown()
                if isinstance(exc, OSError):
                    raise
                raise BrokenPipeError(f"link to {self.peer} is closed") from exc

    def shutdown(self) -> None:
        """Stop both directions so the reader thread sees end of stream."""
        self._down = True
        self._shutdown()

    def release(self) -> None:
        """Free the OS resources (called once the reader thread has finished)."""
        self._release()


class Pending:
    """A request waiting for its reply; `on_done` runs on the thread that completes it."""

    __slots__ = ("cmd", "link", "done", "reply", "error", "on_done")

    def __init__(
        self,
        cmd: str,
        link: Link,
        on_done: Callable[[Pending], None] | None = None,
    ) -> None:
        self.cmd = cmd
        self.link = link
        self.done = threading.Event()
        self.reply: Any = None
        self.error: RequestError | None = None
        self.on_done = on_done

    def finish(self, reply: Any = None, error: RequestError | None = None) -> None:
        """Record the outcome, wake the waiter and run `on_done`."""
        self.reply = reply
        self.error = error
        self.done.set()
        if self.on_done is not None:
            self.on_done(self)
