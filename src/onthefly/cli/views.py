"""What the CLI shows: the run's state panel (`RunState`), plain lines (`PlainView`) or a rich live view (`RichView`).

rich is imported only when the live view is built, so importing the CLI stays cheap.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

from .formatting import fmt_float, format_event, format_reply, format_train_step

__all__ = ["STEP_LINES_PER_S", "RunState", "View", "PlainView", "RichView", "make_view"]

logger = logging.getLogger(__name__)

# Plain mode prints at most this many trainStep lines per second.
STEP_LINES_PER_S = 4.0


@dataclass
class RunState:
    """What the status panel shows, updated from events and status replies."""

    connected: bool = False
    run_id: str | None = None
    step: Any = None
    epoch: Any = None
    loss: Any = None
    val_loss: Any = None
    throughput: Any = None
    activity: str = "waiting"
    last_event_at: float | None = None
    last_event_type: str | None = None

    def apply(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        self.last_event_at = time.time()
        self.last_event_type = kind
        if event.get("run_id") is not None:
            self.run_id = event["run_id"]
        if kind == "trainStep":
            for key in ("step", "epoch", "loss", "val_loss", "throughput"):
                if event.get(key) is not None:
                    setattr(self, key, event[key])
            if self.activity in ("waiting", "resumed"):
                self.activity = "running"
        elif kind == "paused":
            self.activity = "paused"
        elif kind == "resumed":
            self.activity = "running"
        elif kind == "trainingFinished":
            self.activity = f"finished ({event.get('status', '?')})"
        elif kind == "epoch_end":
            self.epoch = event.get("epoch", self.epoch)
            if event.get("val_loss") is not None:
                self.val_loss = event["val_loss"]
        if kind in ("paused", "resumed", "trainingFinished") and event.get("step") is not None:
            self.step = event["step"]

    def apply_reply(self, cmd: str, data: Any) -> None:
        if not isinstance(data, dict):
            return
        if cmd == "status":
            if isinstance(data.get("paused"), bool):
                self.activity = "paused" if data["paused"] else "running"
            for key in ("run_id", "step", "epoch"):
                if data.get(key) is not None:
                    setattr(self, key, data[key])
        elif cmd == "pause" and data.get("status") == "paused":
            self.activity = "paused"
        elif cmd == "resume" and data.get("status") == "resumed":
            self.activity = "running"


class View(Protocol):
    """What the CLI shows: the plain printer or the rich live view."""

    state: RunState

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def event(self, event: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...
    def reply(self, cmd: str, data: Any) -> None: ...
    def connection(self, connected: bool) -> None: ...
    def flush(self) -> None: ...


class PlainView:
    """One plain line per interesting event; trainStep lines at most `steps_per_s` per second.

    A trainStep held back by the rate limit is printed before the next other line, so the
    latest step is always visible when something happens.
    """

    def __init__(
        self,
        out: TextIO,
        steps_per_s: float = STEP_LINES_PER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.out = out
        self.state = RunState()
        self._interval = 1.0 / steps_per_s if steps_per_s > 0 else 0.0
        self._clock = clock
        self._last_step_at: float | None = None
        self._held: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Nothing to set up for plain output."""

    def stop(self) -> None:
        self.flush()

    def _write(self, line: str) -> None:
        try:
            self.out.write(line + "\n")
            self.out.flush()
        except (OSError, ValueError) as exc:  # stdout closed (e.g. piped into `head`); keep running
            logger.debug("could not write to stdout: %s", exc)

    def _flush_held_locked(self) -> None:
        if self._held is not None:
            self._write(format_train_step(self._held))
            self._held = None

    def event(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.state.apply(event)
            if event.get("type") == "trainStep":
                now = self._clock()
                if self._last_step_at is None or now - self._last_step_at >= self._interval:
                    self._held = None
                    self._last_step_at = now
                    self._write(format_train_step(event))
                else:
                    self._held = event
                return
            line = format_event(event)
            if line is None:
                return
            self._flush_held_locked()
            self._write(line)

    def message(self, text: str) -> None:
        with self._lock:
            self._flush_held_locked()
            self._write(text)

    def reply(self, cmd: str, data: Any) -> None:
        with self._lock:
            self.state.apply_reply(cmd, data)
        self.message(format_reply(cmd, data))

    def connection(self, connected: bool) -> None:
        with self._lock:
            self.state.connected = connected
        self.message("trainer connected" if connected else "trainer disconnected")

    def flush(self) -> None:
        with self._lock:
            self._flush_held_locked()


class RichView:
    """A live terminal view: a status panel above a scrolling log of recent events and replies."""

    def __init__(self, console: Any = None, log_lines: int = 18, title: str = "onthefly") -> None:
        from rich.console import Console

        self.console = console if console is not None else Console()
        self.state = RunState()
        self.title = title
        self.lines: deque[str] = deque(maxlen=log_lines)
        self._lock = threading.Lock()
        self._live: Any = None

    def start(self) -> None:
        from rich.live import Live

        self._live = Live(
            console=self.console, get_renderable=self.render, refresh_per_second=4, redirect_stderr=False
        )
        self._live.start()

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def render(self) -> Any:
        """The whole screen: status panel and log panel."""
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        with self._lock:
            state = RunState(**vars(self.state))
            lines = list(self.lines)
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold cyan", justify="right")
        table.add_column()
        table.add_column(style="bold cyan", justify="right")
        table.add_column()
        link = Text("connected", style="green") if state.connected else Text("not connected", style="red")
        activity_style = {"paused": "yellow", "running": "green"}.get(state.activity, "white")
        table.add_row("trainer", link, "state", Text(state.activity, style=activity_style))
        table.add_row("run", str(state.run_id or "-"), "step", str(state.step if state.step is not None else "-"))
        table.add_row("epoch", str(state.epoch if state.epoch is not None else "-"), "loss", fmt_float(state.loss))
        throughput = (
            f"{state.throughput:,.0f} samples/s"
            if isinstance(state.throughput, (int, float)) and math.isfinite(state.throughput)
            else "-"
        )
        table.add_row("val_loss", fmt_float(state.val_loss), "throughput", throughput)
        if state.last_event_at is not None:
            ago = max(0.0, time.time() - state.last_event_at)
            clock = time.strftime("%H:%M:%S", time.localtime(state.last_event_at))
            last = Text(f"last event {clock} ({ago:.0f}s ago): {state.last_event_type}", style="dim")
        else:
            last = Text("no events yet", style="dim")
        status = Panel(Group(table, last), title=self.title, subtitle="type a command + Enter; 'help' lists them")
        log = Panel(Text("\n".join(lines) if lines else "(no events yet)"), title="log")
        return Group(status, log)

    def _add(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        for line in text.splitlines() or [""]:
            self.lines.append(f"{stamp} {line}")

    def event(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.state.apply(event)
            if event.get("type") == "trainStep":
                return  # shown in the panel, not the log
            line = format_event(event)
            if line is not None:
                self._add(line)

    def message(self, text: str) -> None:
        with self._lock:
            self._add(text)

    def reply(self, cmd: str, data: Any) -> None:
        with self._lock:
            self.state.apply_reply(cmd, data)
            self._add(format_reply(cmd, data))

    def connection(self, connected: bool) -> None:
        with self._lock:
            self.state.connected = connected
            self._add("trainer connected" if connected else "trainer disconnected")

    def flush(self) -> None:
        """Everything is rendered on the next refresh; nothing is held back."""


def make_view(plain: bool, out: TextIO) -> View:
    """The rich live view on a terminal, else plain lines."""
    isatty = getattr(out, "isatty", None)
    if not plain and callable(isatty) and isatty():
        return RichView()
    return PlainView(out)

