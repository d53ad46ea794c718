"""The `onthefly` command: a terminal dashboard (`listen`, `run`) built on onthefly.client.

`onthefly listen` waits for a training process to connect over TCP; `onthefly run SCRIPT` starts
the script itself and speaks to it over stdio. Both show a live view (rich, when stdout is a
terminal) or one plain line per interesting event, and read commands typed on stdin, one per line.
rich is imported only when the live view is used, so `import onthefly` stays cheap.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

from ._version import __version__
from .client import DashboardBase, DashboardServer, ProcessDashboard, RequestError, TrainerDisconnected

__all__ = [
    "main",
    "build_parser",
    "parse_command",
    "TypedCommand",
    "CommandSyntaxError",
    "format_event",
    "format_reply",
    "format_train_step",
    "RunState",
    "PlainView",
    "RichView",
    "CommandConsole",
]

logger = logging.getLogger(__name__)

# Words you can type, and the wire command each one sends.
COMMAND_ALIASES: dict[str, str] = {
    "pause": "pause",
    "resume": "resume",
    "test": "test_now",
    "save": "save_ckpt",
    "stop": "stop",
    "status": "status",
    "info": "server_info",
    "runs": "list_runs",
}
QUIT_WORDS = frozenset({"quit", "exit"})
HELP_WORDS = frozenset({"help", "?"})

DEFAULT_TIMEOUT_S = 30.0
# Commands that legitimately take long (a full test pass, a checkpoint of a big model).
COMMAND_TIMEOUTS_S: dict[str, float] = {
    "test_now": 600.0,
    "test": 600.0,
    "generate_report": 600.0,
    "export_subset": 600.0,
    "save_ckpt": 120.0,
    "fork": 120.0,
    "merge": 120.0,
}
# Events kept in memory by the CLI's dashboard (older ones are only in the trainer's event log).
KEEP_EVENTS = 10_000
# Plain mode prints at most this many trainStep lines per second.
STEP_LINES_PER_S = 4.0
STAMP_FIELDS = frozenset({"type", "run_id", "run_gen", "ts", "session_id", "event_seq"})

HELP_TEXT = """\
commands (type one per line, then Enter):
  pause                 pause at the next batch boundary
  resume                resume training
  test [LABEL]          run the test set now (test_now)
  save                  save a checkpoint (save_ckpt)
  stop                  stop training
  status                show step, epoch, losses, paused/running
  info                  server_info: version, device, capabilities
  runs                  list runs (list_runs)
  lr 0.01               set the learning rate (set_hparams {"lr": 0.01})
  NAME {json}           any command with a JSON payload, e.g. set_hparams {"weight_decay": 0.1}
  {"cmd": NAME, "payload": {...}}   the same as raw JSON
  help                  this text
  quit                  leave (in `run`, this also stops the script)"""


# ---------------------------------------------------------------------------- typed commands


class CommandSyntaxError(ValueError):
    """A typed command line could not be understood; the message says what was expected."""


@dataclass(frozen=True)
class TypedCommand:
    """One parsed command line: a wire command and payload, or a local one (`help`, `quit`)."""

    name: str
    payload: dict[str, Any] = field(default_factory=dict)
    local: bool = False


def _parse_json_payload(text: str, name: str) -> dict[str, Any]:
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CommandSyntaxError(
            f"the payload of {name!r} is not valid JSON ({exc.msg} at column {exc.colno}): {text}"
        ) from None
    if not isinstance(payload, dict):
        raise CommandSyntaxError(f"the payload of {name!r} must be a JSON object, got {type(payload).__name__}")
    return payload


def parse_command(line: str) -> TypedCommand | None:
    """Parse one typed line; None for a blank line or a `#` comment."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    if text.startswith("{"):
        obj = _parse_json_payload(text, "raw command")
        cmd = obj.get("cmd")
        if not isinstance(cmd, str) or not cmd.strip():
            raise CommandSyntaxError('a raw JSON command needs a "cmd" string, e.g. {"cmd": "status"}')
        payload = obj.get("payload", {})
        if payload is None:
            payload = {}
        if not isinstance(payload, dict):
            raise CommandSyntaxError(f'"payload" must be a JSON object, got {type(payload).__name__}')
        return TypedCommand(cmd.strip(), payload)
    parts = text.split(None, 1)
    word = parts[0]
    rest = parts[1].strip() if len(parts) > 1 else ""
    lowered = word.lower()
    if lowered in HELP_WORDS:
        return TypedCommand("help", local=True)
    if lowered in QUIT_WORDS:
        return TypedCommand("quit", local=True)
    if lowered == "lr":
        if not rest:
            raise CommandSyntaxError("lr needs a value, e.g. `lr 0.01`")
        try:
            value = float(rest)
        except ValueError:
            raise CommandSyntaxError(f"lr needs a number, got {rest!r}") from None
        if not math.isfinite(value) or value < 0:
            raise CommandSyntaxError(f"lr must be a finite number >= 0, got {rest}")
        return TypedCommand("set_hparams", {"lr": value})
    if lowered == "test" and rest and not rest.startswith("{"):
        return TypedCommand("test_now", {"label": rest})
    name = COMMAND_ALIASES.get(lowered, word)
    payload = _parse_json_payload(rest, name) if rest else {}
    return TypedCommand(name, payload)


# ---------------------------------------------------------------------------- formatting


def fmt_float(value: Any) -> str:
    """A metric value, short: 4 decimals in the usual range, scientific outside it."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    number = float(value)
    if not math.isfinite(number):
        return str(number)
    if number == 0 or 1e-3 <= abs(number) < 1e5:
        return f"{number:.4f}"
    return f"{number:.3e}"


def compact(value: Any, limit: int = 160) -> str:
    """A one-line rendering of a JSON value, cut at `limit` characters."""
    text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fields_text(event: dict[str, Any], skip: frozenset[str] = STAMP_FIELDS) -> str:
    return "  ".join(f"{k}={compact(v, 60)}" for k, v in event.items() if k not in skip)


def format_train_step(event: dict[str, Any]) -> str:
    """`step 120  epoch 1  loss 0.4312  val 0.5011  2,345 samples/s` (missing values left out)."""
    parts = []
    if event.get("step") is not None:
        parts.append(f"step {event['step']}")
    if event.get("epoch") is not None:
        parts.append(f"epoch {event['epoch']}")
    if event.get("loss") is not None:
        parts.append(f"loss {fmt_float(event['loss'])}")
    if event.get("val_loss") is not None:
        parts.append(f"val {fmt_float(event['val_loss'])}")
    throughput = event.get("throughput")
    if isinstance(throughput, (int, float)) and not isinstance(throughput, bool) and math.isfinite(throughput):
        parts.append(f"{throughput:,.0f} samples/s")
    return "  ".join(parts) if parts else "trainStep"


def _at_step(event: dict[str, Any]) -> str:
    return f" at step {event['step']}" if event.get("step") is not None else ""


def format_event(event: dict[str, Any]) -> str | None:
    """One readable line for an event, or None for events not worth a line (testStep)."""
    kind = event.get("type")
    if kind == "trainStep":
        return format_train_step(event)
    if kind == "testStep":
        return None
    if kind == "log":
        level = event.get("level") or "log"
        return f"[{level}] {event.get('text', '')}"
    if kind == "error":
        return f"[error] {event.get('text', '')}"
    if kind == "paused":
        ckpt = f" (checkpoint {event['ckpt']})" if event.get("ckpt") else ""
        return f"paused{_at_step(event)}{ckpt}"
    if kind == "resumed":
        return f"resumed{_at_step(event)}"
    if kind == "session_started":
        run = event.get("run_name") or event.get("run_id")
        return f"session started: project {event.get('project', '?')}, run {run}"
    if kind == "newRun":
        parents = event.get("parents") or []
        meta = event.get("meta") if isinstance(event.get("meta"), dict) else {}
        origin = f" from {', '.join(map(str, parents))}" if parents else ""
        how = f" ({meta['kind']})" if meta.get("kind") else ""
        return f"new run {event.get('run_id')}{origin}{how}"
    if kind == "epoch_end":
        val = f"  val {fmt_float(event['val_loss'])}" if event.get("val_loss") is not None else ""
        return f"epoch {event.get('epoch')} done{val}"
    if kind == "checkpoint_saved":
        return f"checkpoint saved{_at_step(event)}: {event.get('path') or '(none written)'}"
    if kind == "checkpoint_loaded":
        return f"checkpoint loaded{_at_step(event)}: {event.get('path')}"
    if kind in ("test_complete", "auto_test_complete"):
        return f"test {event.get('label', '')!r} finished{_at_step(event)}: avg loss {fmt_float(event.get('avg_loss'))}"
    if kind == "trainingFinished":
        return f"training finished ({event.get('status', '?')}){_at_step(event)}"
    if kind == "stopping":
        return "stopping"
    if kind == "runTransition":
        return f"run {event.get('from')} -> {event.get('to')}"
    if kind == "hparams_changed":
        changes = event.get("changes")
        if isinstance(changes, dict) and changes:
            return f"hyperparameters changed: {fields_text(changes, frozenset())}"
        return f"hyperparameters changed: {fields_text(event)}"
    rest = fields_text(event)
    return f"{kind}: {rest}" if rest else str(kind)


def _format_status(data: dict[str, Any]) -> str:
    if data.get("paused") is True:
        state = "paused"
    elif data.get("running") is False:
        state = "not running"
    else:
        state = "running"
    parts = [f"status: {state}"]
    for key, label in (("run_id", "run"), ("step", "step"), ("epoch", "epoch")):
        if data.get(key) is not None:
            parts.append(f"{label} {data[key]}")
    metrics = data.get("last_metrics") if isinstance(data.get("last_metrics"), dict) else data
    for key, label in (("loss", "loss"), ("val_loss", "val")):
        if metrics.get(key) is not None:
            parts.append(f"{label} {fmt_float(metrics[key])}")
    shown = {"paused", "running", "run_id", "step", "epoch", "loss", "val_loss", "last_metrics"}
    extra = {k: v for k, v in data.items() if k not in shown}
    line = "  ".join(parts)
    return f"{line}  {fields_text(extra, frozenset())}" if extra else line


def format_reply(cmd: str, data: Any) -> str:
    """A readable rendering of a command's reply data."""
    if not isinstance(data, dict):
        if isinstance(data, list) and cmd == "list_runs":
            return _format_runs(data)
        return f"{cmd}: {compact(data) if data is not None else 'ok'}"
    if cmd == "status":
        return _format_status(data)
    if cmd == "pause":
        ckpt = f" (checkpoint {data['ckpt']})" if data.get("ckpt") else ""
        return f"{data.get('status', 'paused')}{_at_step(data)}{ckpt}"
    if cmd == "resume":
        return f"{data.get('status', 'resumed')}{_at_step(data)}"
    if cmd == "save_ckpt":
        if data.get("path"):
            return f"checkpoint saved{_at_step(data)}: {data['path']}"
        return f"no checkpoint written{_at_step(data)} (pause first)"
    if cmd in ("test_now", "test"):
        if data.get("status") == "busy":
            return "test: a test is already running"
        ckpt = f" (checkpoint {data['ckpt_path']})" if data.get("ckpt_path") else ""
        return f"test {data.get('label', '')!r}: avg loss {fmt_float(data.get('avg_loss'))}{_at_step(data)}{ckpt}"
    if cmd == "server_info":
        caps = data.get("capabilities")
        caps_text = f"  capabilities: {', '.join(map(str, caps))}" if isinstance(caps, list) else ""
        return f"server: onthefly {data.get('version', '?')}  device {data.get('device', '?')}{caps_text}"
    if cmd == "set_hparams":
        return _format_hparams(data)
    if cmd == "stop":
        return str(data.get("status", "stopping"))
    if cmd == "list_runs" and isinstance(data.get("runs"), list):
        return _format_runs(data["runs"])
    return f"{cmd}: {fields_text(data, frozenset()) or 'ok'}"


def _format_hparams(data: dict[str, Any]) -> str:
    groups = data.get("param_groups")
    if not isinstance(groups, list):
        return f"hyperparameters now: {fields_text(data, frozenset())}"
    lines = ["hyperparameters now:"]
    for index, group in enumerate(groups):
        text = fields_text(group, frozenset()) if isinstance(group, dict) else compact(group)
        lines.append(f"  group {index}: {text}")
    rest = {k: v for k, v in data.items() if k != "param_groups"}
    if rest:
        lines.append(f"  {fields_text(rest, frozenset())}")
    return "\n".join(lines)


def _format_runs(runs: list[Any]) -> str:
    if not runs:
        return "runs: none"
    lines = [f"runs ({len(runs)}):"]
    for run in runs:
        if not isinstance(run, dict):
            lines.append(f"  {compact(run)}")
            continue
        name = run.get("run_id") or run.get("name") or "?"
        rest = {k: v for k, v in run.items() if k not in ("run_id", "name")}
        lines.append(f"  {name}  {fields_text(rest, frozenset())}".rstrip())
    return "\n".join(lines)


# ---------------------------------------------------------------------------- views


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


# ---------------------------------------------------------------------------- the command console


class CommandConsole:
    """Reads commands typed on `stream` (one per line) on its own thread and sends them.

    Commands run one at a time: the next line is read once the reply (or error) is shown.
    End of input stops reading but leaves the dashboard running; `quit` sets `quit_event`.
    """

    def __init__(
        self,
        dash: DashboardBase,
        view: View,
        stream: TextIO,
        quit_event: threading.Event,
        on_end_of_input: Callable[[], None] | None = None,
    ) -> None:
        self.dash = dash
        self.view = view
        self.stream = stream
        self.quit_event = quit_event
        self.on_end_of_input = on_end_of_input
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="onthefly-cli-commands", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.quit_event.is_set():
            try:
                line = self.stream.readline()
            except (OSError, ValueError) as exc:  # no usable stdin (closed, or captured by a test runner)
                logger.debug("not reading commands: %s", exc)
                line = ""
            if not line:
                if self.on_end_of_input is not None:
                    self.on_end_of_input()
                return
            self.execute(line)

    def execute(self, line: str) -> None:
        """Parse and run one typed line, showing the outcome in the view."""
        try:
            command = parse_command(line)
        except CommandSyntaxError as exc:
            self.view.message(f"? {exc}")
            return
        if command is None:
            return
        if command.local:
            if command.name == "help":
                self.view.message(HELP_TEXT)
            else:
                self.quit_event.set()
            return
        timeout = COMMAND_TIMEOUTS_S.get(command.name, DEFAULT_TIMEOUT_S)
        try:
            data = self.dash.request(command.name, command.payload, timeout=timeout)
        except TrainerDisconnected as exc:
            self.view.message(f"{command.name} failed [disconnected]: {exc.message}")
        except RequestError as exc:
            self.view.message(f"{command.name} failed [{exc.code or 'error'}]: {exc.message}")
        except TimeoutError as exc:
            self.view.message(f"{command.name} failed [timeout]: {exc}")
        else:
            self.view.reply(command.name, data)


# ---------------------------------------------------------------------------- subcommands


def write_text_atomic(path: str, text: str) -> None:
    """Write `text` to `path` via a temp file in the same folder, fsync and rename."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".onthefly-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def make_view(plain: bool, out: TextIO) -> View:
    """The rich live view on a terminal, else plain lines."""
    isatty = getattr(out, "isatty", None)
    if not plain and callable(isatty) and isatty():
        return RichView()
    return PlainView(out)


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


def cmd_listen(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    """`onthefly listen`: wait for a trainer on TCP and steer it."""
    try:
        server = DashboardServer(args.port, args.host, allow_remote=args.allow_remote, keep_events=KEEP_EVENTS)
        server.start()
    except (ValueError, TypeError) as exc:
        print(f"onthefly listen: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"onthefly listen: {exc}", file=sys.stderr)
        return 1
    view = make_view(args.plain, stdout)
    quit_event = threading.Event()
    try:
        if args.port_file:
            write_text_atomic(args.port_file, f"{server.port}\n")
        server.on_connection_change(view.connection)
        view.message(
            f"listening on {server.host}:{server.port}; start a training script "
            f"(ONTHEFLY_DASHBOARD_PORT={server.port}). Type 'help' for commands."
        )
        CommandConsole(server, view, stdin, quit_event).start()
        view.start()
        pump_events(server, view, quit_event)
    except KeyboardInterrupt:
        view.message("interrupted")
    finally:
        view.flush()
        view.stop()
        server.close()
    return 0


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


def cmd_run(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    """`onthefly run`: start SCRIPT with the stdio transport, show it, exit with its exit code."""
    try:
        argv = script_argv(args.script, list(args.args))
    except FileNotFoundError as exc:
        print(f"onthefly run: {exc}", file=sys.stderr)
        return 2
    dash = ProcessDashboard(argv, keep_events=KEEP_EVENTS)
    try:
        dash.start()
    except OSError as exc:
        print(f"onthefly run: cannot start {args.script}: {exc}", file=sys.stderr)
        return 1
    view = make_view(args.plain, stdout)
    view.state.connected = True
    quit_event = threading.Event()
    input_ended = threading.Event()
    training_finished = threading.Event()
    release_lock = threading.Lock()

    def release_script_if_done() -> None:
        # A finished training keeps serving its dashboard until told to stop; once nothing more
        # can be typed, close its stdin so it can exit (instead of waiting forever).
        with release_lock:
            if input_ended.is_set() and training_finished.is_set() and not dash.ended:
                view.message("training finished and no more input: closing the script's stdin")
                dash.close_input()
                input_ended.clear()

    def on_end_of_input() -> None:
        input_ended.set()
        release_script_if_done()

    def observe(event: dict[str, Any]) -> None:
        if event.get("type") == "trainingFinished":
            training_finished.set()
            release_script_if_done()

    interrupted = False
    try:
        view.message(f"running {' '.join(argv)} (pid {dash.pid}). Type 'help' for commands.")
        CommandConsole(dash, view, stdin, quit_event, on_end_of_input).start()
        view.start()
        pump_events(dash, view, quit_event, observe=observe)
    except KeyboardInterrupt:
        interrupted = True
        view.message("interrupted; stopping the script")
    finally:
        if not dash.ended and not interrupted:
            view.message("stopping the script")
        dash.close()
        view.flush()
        code = dash.returncode
        view.message(f"{args.script} exited with code {code}")
        view.stop()
    return exit_status(code, interrupted)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onthefly",
        description="Watch and steer a running PyTorch training from the terminal.",
    )
    parser.add_argument("--version", action="version", version=f"onthefly {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{listen,run}")

    listen = sub.add_parser("listen", help="wait for a training process to connect over TCP")
    listen.add_argument("--port", type=int, default=None, help="port (default $ONTHEFLY_DASHBOARD_PORT or 47621; 0: any free port)")
    listen.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    listen.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host (no authentication!)")
    listen.add_argument("--plain", action="store_true", help="plain lines instead of the live view")
    listen.add_argument("--port-file", metavar="PATH", help="write the bound port to PATH (for scripts and tests)")
    listen.set_defaults(handler=cmd_listen)

    run = sub.add_parser("run", help="start SCRIPT with the stdio transport and steer it")
    run.add_argument("--plain", action="store_true", help="plain lines instead of the live view")
    run.add_argument("script", help="a .py file (run with this Python) or a program")
    run.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    run.set_defaults(handler=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `onthefly` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version or a usage error: argparse already printed it
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.handler(args, sys.stdin, sys.stdout))


if __name__ == "__main__":
    sys.exit(main())
