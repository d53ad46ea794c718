"""Typed commands: what a user can type at the `onthefly` prompt and the wire command each sends."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from ..client.wire import COMMAND_TIMEOUTS_S, DEFAULT_TIMEOUT_S

__all__ = [
    "COMMAND_ALIASES",
    "QUIT_WORDS",
    "HELP_WORDS",
    "HELP_TEXT",
    "DEFAULT_TIMEOUT_S",
    "COMMAND_TIMEOUTS_S",
    "CommandSyntaxError",
    "TypedCommand",
    "parse_json_payload",
    "parse_command",
]


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


class CommandSyntaxError(ValueError):
    """A typed command line could not be understood; the message says what was expected."""


@dataclass(frozen=True)
class TypedCommand:
    """One parsed command line: a wire command and payload, or a local one (`help`, `quit`)."""

    name: str
    payload: dict[str, Any] = field(default_factory=dict)
    local: bool = False


def parse_json_payload(text: str, name: str) -> dict[str, Any]:
    """`text` as a JSON object, the payload of command `name`; CommandSyntaxError otherwise."""
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
        obj = parse_json_payload(text, "raw command")
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
    payload = parse_json_payload(rest, name) if rest else {}
    return TypedCommand(name, payload)

