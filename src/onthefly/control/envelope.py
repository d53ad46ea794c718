"""The message envelopes of the wire: parsing requests, and building replies and error events.

A request is `{"id": str, "cmd": str, "payload": object}`; a reply is `{"id", "ok": true,
"data"}` or `{"id", "ok": false, "error", "code"}`. Every malformed request maps to a
`ProtocolError` whose code says what was wrong, carrying the request id whenever one could
be read so the error can be answered as a reply rather than an anonymous event.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import ErrorCode, ProtocolError

__all__ = [
    "MAX_LINE_BYTES",
    "Request",
    "debug_enabled",
    "error_event",
    "parse_request",
    "reply_error",
    "reply_ok",
    "json_type_name",
]

#: The longest line (in bytes, without the newline) either side accepts.
MAX_LINE_BYTES = 16 * 1024 * 1024

_PREVIEW_CHARS = 80


@dataclass(frozen=True)
class Request:
    """One parsed request; `id` None means fire-and-forget (no reply is sent)."""

    id: str | None
    cmd: str
    payload: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.id, int) and not isinstance(self.id, bool):
            object.__setattr__(self, "id", str(self.id))
        elif self.id is not None and not isinstance(self.id, str):
            raise TypeError(f"Request.id must be str, int or None, got {type(self.id).__name__}")


def json_type_name(value: Any) -> str:
    """The JSON name of a decoded value's type, as used in error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def parse_request(line: str) -> Request:
    """Parse one inbound line into a `Request`, or raise `ProtocolError` saying what is wrong.

    Codes: `bad_json` when the line is not JSON, `bad_envelope` when it is JSON but not a
    request (not an object, `cmd` missing/empty/not a string, `payload` neither object nor null,
    an `id` that is neither string nor integer).
    """
    try:
        message = json.loads(line, parse_constant=_reject_constant)
    except RecursionError:
        raise ProtocolError(ErrorCode.BAD_JSON, "line is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError and our NaN/Infinity refusal
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        position = f" at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise ProtocolError(
            ErrorCode.BAD_JSON, f"line is not valid JSON: {detail}{position}: {_preview(line)}"
        ) from None
    if not isinstance(message, dict):
        raise ProtocolError(
            ErrorCode.BAD_ENVELOPE,
            f"a request must be a JSON object, got {json_type_name(message)}: {_preview(line)}",
        )
    request_id = _read_id(message)
    cmd = message.get("cmd")
    if "cmd" not in message:
        raise ProtocolError(
            ErrorCode.BAD_ENVELOPE,
            f"request has no 'cmd' (keys: {sorted(message)[:10]})",
            request_id=request_id,
        )
    if not isinstance(cmd, str) or not cmd.strip():
        got = repr(cmd) if isinstance(cmd, str) else json_type_name(cmd)
        raise ProtocolError(
            ErrorCode.BAD_ENVELOPE, f"'cmd' must be a non-empty string, got {got}", request_id=request_id
        )
    payload = message.get("payload")
    if payload is None:
        payload = {}
    elif not isinstance(payload, dict):
        raise ProtocolError(
            ErrorCode.BAD_ENVELOPE,
            f"'payload' of {cmd!r} must be an object or null, got {json_type_name(payload)}",
            request_id=request_id,
        )
    return Request(id=request_id, cmd=cmd, payload=payload)


def reply_ok(request_id: str, data: Any) -> dict:
    """A success reply for request `request_id`."""
    return {"id": request_id, "ok": True, "data": data}


def reply_error(request_id: str, code: str, message: str, detail: str | None = None) -> dict:
    """A failure reply; `detail` (a traceback) only when given, i.e. in debug mode."""
    if code not in ErrorCode.ALL:
        raise ValueError(f"unknown error code {code!r}; expected one of {sorted(ErrorCode.ALL)}")
    reply = {"id": request_id, "ok": False, "error": message, "code": code}
    if detail is not None:
        reply["detail"] = detail
    return reply


def error_event(code: str, message: str, detail: str | None = None) -> dict:
    """The `error` event fields used when a failure has no request id to answer."""
    if code not in ErrorCode.ALL:
        raise ValueError(f"unknown error code {code!r}; expected one of {sorted(ErrorCode.ALL)}")
    event = {"text": message, "code": code}
    if detail is not None:
        event["detail"] = detail
    return event


def debug_enabled() -> bool:
    """True when `ONTHEFLY_DEBUG=1`: error replies may then carry a traceback in `detail`."""
    return os.environ.get("ONTHEFLY_DEBUG", "").strip() == "1"


def _read_id(message: dict) -> str | None:
    """The request id as a string; None (fire-and-forget) when absent, null or empty."""
    raw = message.get("id")
    if raw is None or raw == "":
        return None
    if isinstance(raw, str):
        return raw
    if isinstance(raw, int) and not isinstance(raw, bool):
        return str(raw)
    raise ProtocolError(
        ErrorCode.BAD_ENVELOPE, f"'id' must be a string or an integer, got {json_type_name(raw)}"
    )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _preview(line: str) -> str:
    text = line if len(line) <= _PREVIEW_CHARS else line[:_PREVIEW_CHARS] + "..."
    return repr(text)
