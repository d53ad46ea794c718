"""What the subcommands share: showing events, running a script, exit statuses, small atomic files."""

from __future__ import annotations

import os
import shutil
import sys
import threading
from collections.abc import Callable
from typing import Any

from ..client import DashboardBase
from ..fileio import atomic_write
from .views import View

__all__ = ["KEEP_EVENTS", "write_text_atomic", "pump_events", "script_argv", "exit_status"]

# Events kept in memory by the CLI's dashboard (older ones are only in the trainer's event log).
KEEP_EVENTS = 10_000


def write_text_atomic(path: str, text: str) -> None:
    """Write `text` to `path` atomically (temp file in the same folder, fsync, rename)."""
    data = text.encode("utf-8")
    atomic_write(path, lambda handle: handle.write(data))


def pump_events(
    dash: DashboardBase,
    view: View,
    quit_event: threading.Event,
    poll_s: float = 0.2,
    observe: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Show events until `quit` is typed or the stream ends (all delivered events shown)."""
    while not quit_event.is_set():
        for event in dash.events(timeout=poll_s):
            view.event(event)
            if observe is not None:
                observe(event)
            if quit_event.is_set():
                return
        if dash.ended:
            for event in dash.events(timeout=0):
                view.event(event)
            return


def script_argv(script: str, args: list[str]) -> list[str]:
    """The command line that runs SCRIPT: Python (unbuffered) for .py files, else the program itself."""
    if script.endswith(".py"):
        if not os.path.isfile(script):
            raise FileNotFoundError(f"no such script: {script}")
        return [sys.executable, "-u", script, *args]
    if os.path.isfile(script) and os.access(script, os.X_OK):
        return [os.path.abspath(script), *args]
    found = shutil.which(script)
    if found is None:
        raise FileNotFoundError(f"no such script or program: {script}")
    return [found, *args]


def exit_status(returncode: int | None, interrupted: bool) -> int:
    """The CLI's exit status for a script's return code (128+N for a signal, as shells do)."""
    if returncode is None:
        return 130 if interrupted else 1
    if returncode < 0:
        return 128 - returncode
    return returncode
