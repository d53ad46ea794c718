"""Readable one-line (or few-line) renderings of events and command replies, for the terminal."""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = [
    "STAMP_FIELDS",
    "fmt_float",
    "compact",
    "fields_text",
    "at_step",
    "format_train_step",
    "format_event",
    "format_status",
    "format_reply",
    "format_hparams",
    "format_runs",
]

STAMP_FIELDS = frozenset({"type", "run_id", "run_gen", "ts", "session_id", "event_seq"})


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
    """`key=value` pairs of `event`, leaving out the keys in `skip` (the wire stamps by default)."""
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


def at_step(event: dict[str, Any]) -> str:
    """` at step N` when the event or reply names a step, else an empty string."""
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
        return f"paused{at_step(event)}{ckpt}"
    if kind == "resumed":
        return f"resumed{at_step(event)}"
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
        return f"checkpoint saved{at_step(event)}: {event.get('path') or '(none written)'}"
    if kind == "checkpoint_loaded":
        return f"checkpoint loaded{at_step(event)}: {event.get('path')}"
    if kind == "auto_test_complete":
        return None  # the same test's `test_complete` is shown; this copy is for the VS Code extension
    if kind == "test_complete":
        return f"test {event.get('label', '')!r} finished{at_step(event)}: avg loss {fmt_float(event.get('avg_loss'))}"
    if kind == "trainingFinished":
        return f"training finished ({event.get('status', '?')}){at_step(event)}"
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


def format_status(data: dict[str, Any]) -> str:
    """One line for a `status` reply: state, run, step, epoch, losses, then anything else."""
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
            return format_runs(data)
        return f"{cmd}: {compact(data) if data is not None else 'ok'}"
    if cmd == "status":
        return format_status(data)
    if cmd == "pause":
        ckpt = f" (checkpoint {data['ckpt']})" if data.get("ckpt") else ""
        return f"{data.get('status', 'paused')}{at_step(data)}{ckpt}"
    if cmd == "resume":
        return f"{data.get('status', 'resumed')}{at_step(data)}"
    if cmd == "save_ckpt":
        if data.get("path"):
            return f"checkpoint saved{at_step(data)}: {data['path']}"
        return f"no checkpoint written{at_step(data)} (pause first)"
    if cmd in ("test_now", "test"):
        if data.get("status") == "busy":
            return "test: a test is already running"
        ckpt = f" (checkpoint {data['ckpt_path']})" if data.get("ckpt_path") else ""
        return f"test {data.get('label', '')!r}: avg loss {fmt_float(data.get('avg_loss'))}{at_step(data)}{ckpt}"
    if cmd == "server_info":
        caps = data.get("capabilities")
        caps_text = f"  capabilities: {', '.join(map(str, caps))}" if isinstance(caps, list) else ""
        return f"server: onthefly {data.get('version', '?')}  device {data.get('device', '?')}{caps_text}"
    if cmd == "set_hparams":
        return format_hparams(data)
    if cmd == "stop":
        return str(data.get("status", "stopping"))
    if cmd == "list_runs" and isinstance(data.get("runs"), list):
        return format_runs(data["runs"])
    return f"{cmd}: {fields_text(data, frozenset()) or 'ok'}"


def format_hparams(data: dict[str, Any]) -> str:
    """The hyperparameters a `set_hparams` reply says are in force, one param group per line."""
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


def format_runs(runs: list[Any]) -> str:
    """One line per run of a `list_runs` reply."""
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

