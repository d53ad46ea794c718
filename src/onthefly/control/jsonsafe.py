"""JSON safety for the wire: turning any Python value into one strict JSON line.

The wire carries strict JSON (no NaN/Infinity), but events carry whatever the training code
hands us: numpy scalars, tensors, dataclasses, paths. `encode_line` takes the fast path
(the C JSON encoder with a `default` hook) and only walks the object when that fails, so the
common case costs one C-level dump. It never raises: an unencodable object becomes an error line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Mapping
from typing import Any

__all__ = ["encode_line", "encode_text", "to_jsonable"]

_SCALARS = (str, int, bool, type(None))
_SEQUENCES = (list, tuple, set, frozenset)
# Stamps worth keeping when an event has to be replaced by an error line, so that a dashboard
# still sees its event_seq (a missing seq would look like a gap it can never fill).
_KEPT_STAMPS = ("event_seq", "ts", "run_id", "run_gen", "session_id")


def to_jsonable(obj: Any) -> Any:
    """Return a structure of dict/list/str/int/float/bool/None that strict JSON can encode.

    Non-finite floats become None; anything with `.tolist()` (numpy, torch) becomes Python
    values; dataclasses become dicts; unknown objects become `str(obj)`.
    """
    if obj is None or type(obj) in (str, int, bool):
        return obj
    if isinstance(obj, float):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, Mapping):
        return {_key(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, _SEQUENCES):
        return [to_jsonable(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, pathlib.PurePath):
        return str(obj)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj).decode("utf-8", errors="replace")
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        try:
            converted = tolist()
        except (TypeError, ValueError, RuntimeError) as exc:
            return _describe(obj, exc)
        if converted is not obj:
            return to_jsonable(converted)
    return _safe_str(obj)


def encode_text(obj: Any) -> str:
    """Encode `obj` as compact JSON text on one line that is always valid UTF-8; never raises."""
    if _orjson is None:
        return _encode_text_stdlib(obj)
    try:
        return _orjson.dumps(obj, default=_default, option=_ORJSON_OPTIONS).decode("utf-8")
    except Exception:  # noqa: BLE001 - what orjson refuses (lone surrogates, huge ints) takes the thorough path
        return _encode_text_stdlib(obj)


def _encode_text_stdlib(obj: Any) -> str:
    try:
        text = _FAST.encode(obj)
    except Exception:  # noqa: BLE001 - NaN/inf, a non-string key, a cycle, a failing .tolist()
        # Take the slow, thorough path; it handles everything but cycles and absurd depth.
        try:
            text = _STRICT.encode(to_jsonable(obj))
        except Exception as exc:  # noqa: BLE001 - the wire gets an error line instead
            return _ASCII.encode(_unserialisable(obj, exc))
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # Lone surrogates (e.g. undecodable file names) are not UTF-8: write them as \\u escapes.
            return _ASCII.encode(json.loads(text))
    return text


def encode_line(obj: Any) -> bytes:
    """Encode `obj` as one compact UTF-8 JSON line ending in b"\\n"; never raises."""
    if _orjson is None:
        return _encode_text_stdlib(obj).encode("utf-8") + b"\n"
    try:
        return _orjson.dumps(obj, default=_default, option=_ORJSON_LINE)
    except Exception:  # noqa: BLE001 - what orjson refuses (lone surrogates, huge ints) takes the thorough path
        return _encode_text_stdlib(obj).encode("utf-8") + b"\n"


def _default(obj: Any) -> Any:
    """`json.dumps` hook for objects it does not know; the result is encoded in their place."""
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return tolist()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return dict(obj)
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    if isinstance(obj, pathlib.PurePath):
        return str(obj)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj).decode("utf-8", errors="replace")
    return _safe_str(obj)


# orjson (a well-kept C/Rust encoder) is about 10x faster than the standard library for our
# events, writes NaN/inf as null as the wire requires, and encodes numpy arrays natively. When it
# is missing or refuses an object (lone surrogates, > 64-bit ints, cycles) the stdlib path runs.
try:
    import orjson as _orjson

    _ORJSON_OPTIONS = _orjson.OPT_SERIALIZE_NUMPY | _orjson.OPT_NON_STR_KEYS
    _ORJSON_LINE = _ORJSON_OPTIONS | _orjson.OPT_APPEND_NEWLINE
except ImportError:  # pragma: no cover - orjson is a declared dependency
    _orjson = None

# Built once: `json.dumps` with keyword arguments constructs a new encoder on every call.
_FAST = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_default)
_STRICT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_ASCII = json.JSONEncoder(separators=(",", ":"))


def _key(key: Any) -> str:
    """A mapping key as JSON would spell it."""
    if isinstance(key, str):
        return str(key)
    if key is None:
        return "null"
    if isinstance(key, bool):
        return "true" if key else "false"
    return _safe_str(to_jsonable(key))


def _safe_str(obj: Any) -> str:
    try:
        return str(obj)
    except Exception as exc:  # a broken __str__ must not take the writer down; describe it instead
        return _describe(obj, exc)


def _describe(obj: Any, exc: BaseException) -> str:
    return f"<unprintable {type(obj).__name__}: {type(exc).__name__}: {exc}>"


def _unserialisable(obj: Any, exc: BaseException) -> dict[str, Any]:
    """The line sent instead of an object nothing can encode (e.g. a self-referencing dict)."""
    kind = type(obj).__name__
    if isinstance(obj, Mapping) and "id" in obj and "ok" in obj:
        # A reply: answer the request with an error rather than leaving it to time out.
        request_id = obj.get("id")
        return {
            "id": request_id if isinstance(request_id, str) else None,
            "ok": False,
            "error": f"unserialisable reply: {type(exc).__name__}: {exc}",
            "code": "failed",
        }
    line: dict[str, Any] = {
        "type": "log",
        "level": "error",
        "text": f"unserialisable {kind} ({type(exc).__name__}: {exc})",
    }
    if isinstance(obj, Mapping):
        event_type = obj.get("type")
        if isinstance(event_type, str):
            line["text"] = f"unserialisable {event_type!r} event ({type(exc).__name__}: {exc})"
        for stamp in _KEPT_STAMPS:
            value = obj.get(stamp)
            if isinstance(value, _SCALARS) or (isinstance(value, float) and math.isfinite(value)):
                line[stamp] = value
    return line
