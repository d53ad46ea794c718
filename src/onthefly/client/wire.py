"""The client's view of the wire: request encoding, port resolution, socket send bounds, errors.

Everything here is small and stateless; the engine (`base.py`) and the transports (`server.py`,
`process.py`) build on it. Pure Python; it must not import torch.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import sys
from typing import Any

try:  # orjson is a core dependency and parses a wire line 3-5x faster; the stdlib is the fallback
    import orjson as _orjson
except ImportError:  # pragma: no cover - exercised only without orjson
    _orjson = None

__all__ = [
    "DEFAULT_PORT",
    "PORT_ENV",
    "MAX_LINE_BYTES",
    "DISCONNECTED",
    "RequestError",
    "TrainerDisconnected",
    "resolve_port",
    "encode_request",
    "set_send_timeout",
    "seq_of",
    "DEFAULT_TIMEOUT_S",
    "COMMAND_TIMEOUTS_S",
    "reply_timeout",
    "NOT_JSON",
    "parse_line",
    "line_text",
]

logger = logging.getLogger(__name__)

DEFAULT_PORT = 47621
PORT_ENV = "ONTHEFLY_DASHBOARD_PORT"
MAX_LINE_BYTES = 16 * 1024 * 1024
DISCONNECTED = "disconnected"

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


def reply_timeout(cmd: str) -> float:
    """How long a front end should wait for the reply to `cmd` before giving up on it."""
    return COMMAND_TIMEOUTS_S.get(cmd, DEFAULT_TIMEOUT_S)


class RequestError(Exception):
    """A request was answered with `ok: false` (or could not be answered).

    `code` is the wire's error code (`bad_payload`, `not_paused`, ...), `message` the trainer's
    text and `data` the raw reply object.
    """

    def __init__(
        self, cmd: str, message: str, code: str | None = None, data: dict[str, Any] | None = None
    ) -> None:
        suffix = f" [{code}]" if code else ""
        super().__init__(f"{cmd}: {message}{suffix}")
        self.cmd = cmd
        self.code = code
        self.message = message
        self.data: dict[str, Any] = dict(data) if data else {}


class TrainerDisconnected(RequestError):
    """The trainer went away (or was never there) while a request needed it; code `disconnected`."""

    def __init__(self, cmd: str, message: str = "trainer disconnected") -> None:
        super().__init__(cmd, message, DISCONNECTED, {})


def resolve_port(port: int | None) -> int:
    """The port to listen on: `port` itself, else `$ONTHEFLY_DASHBOARD_PORT`, else 47621."""
    if port is None:
        raw = os.environ.get(PORT_ENV, "").strip()
        if not raw:
            return DEFAULT_PORT
        try:
            port = int(raw)
        except ValueError:
            raise ValueError(f"{PORT_ENV} must be an integer port, got {raw!r}") from None
        where = PORT_ENV
    else:
        where = "port"
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"{where} must be an int, got {type(port).__name__}")
    if not 0 <= port <= 65535:
        raise ValueError(f"{where} must be in 0..65535, got {port}")
    return port


def encode_request(cmd: str, payload: dict[str, Any] | None, request_id: str | None) -> bytes:
    """One wire line for a command; fire-and-forget when `request_id` is None."""
    if not isinstance(cmd, str) or not cmd.strip():
        raise ValueError(f"cmd must be a non-empty string, got {cmd!r}")
    if payload is not None and not isinstance(payload, dict):
        raise TypeError(f"payload for {cmd!r} must be a dict, got {type(payload).__name__}")
    msg: dict[str, Any] = {}
    if request_id is not None:
        msg["id"] = request_id
    msg["cmd"] = cmd
    if payload is not None or request_id is not None:
        msg["payload"] = payload if payload is not None else {}
    try:
        text = json.dumps(msg, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"payload for {cmd!r} cannot be sent as JSON: {exc}") from exc
    return (text + "\n").encode("utf-8")


def set_send_timeout(conn: socket.socket, seconds: float) -> None:
    """Bound blocking sends only (SO_SNDTIMEO), so a trainer that stops reading is cut off.

    `socket.settimeout` would also bound the reader thread's blocking reads, so it is not used.
    """
    if sys.platform == "win32":
        value = struct.pack("I", int(seconds * 1000))
    else:
        value = struct.pack("ll", int(seconds), int((seconds % 1) * 1_000_000))
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
    except OSError as exc:  # platform without SO_SNDTIMEO: sends stay unbounded, which is only slower to fail
        logger.debug("SO_SNDTIMEO not supported: %s", exc)


def seq_of(event: dict[str, Any]) -> int | None:
    """The event's `event_seq` when it is a real int (bools and missing stamps give None)."""
    seq = event.get("event_seq")
    if isinstance(seq, int) and not isinstance(seq, bool):
        return seq
    return None


# What `parse_line` returns for a line that is not JSON (JSON `null` is a value: None).
NOT_JSON: Any = object()


def line_text(line: bytes) -> str:
    """A wire line as text for display: invalid UTF-8 replaced, surrounding whitespace removed."""
    return line.decode("utf-8", errors="replace").strip()


def parse_line(line: bytes) -> Any:
    """The JSON value on one wire line, or NOT_JSON.

    orjson first (fast); when it refuses a line the stdlib has the last word, so what is
    accepted never depends on whether orjson is installed (it is stricter: NaN literals,
    invalid UTF-8).
    """
    if _orjson is not None:
        try:
            return _orjson.loads(line)
        except _orjson.JSONDecodeError as exc:
            logger.debug("orjson refused a line (%s); trying the stdlib parser", exc)
    try:
        return json.loads(line_text(line))
    except json.JSONDecodeError:
        return NOT_JSON
