"""Safe names: the one rule for a string that becomes a single file-system path component.

Run ids, run names and bundle names arrive on the wire and end up in paths
(`runs/<run_id>/...`, `<run_id>__step<N>.pt`). `check_safe_name` is the only place that decides
whether such a string may be used; it refuses, it never rewrites, so the name a dashboard sent
is exactly the name on disk or the request fails with a message naming the field and the rule.
"""

from __future__ import annotations

import re

from .errors import ConstraintViolation

__all__ = ["MAX_NAME_LENGTH", "NAME_CHARS", "SAFE_NAME_PATTERN", "UnsafeName", "check_safe_name"]

#: The longest name accepted (characters; every accepted character is one byte).
MAX_NAME_LENGTH = 120
#: The characters a name may contain, as a regular-expression class body.
NAME_CHARS = "A-Za-z0-9._+-"
#: The character rules as a whole-string pattern, in the dialect JSON Schema uses (ECMA-262);
#: Windows device names, which it does not exclude, are refused by `check_safe_name` besides.
SAFE_NAME_PATTERN = r"^[A-Za-z0-9_+](?:[A-Za-z0-9._+-]{0,118}[A-Za-z0-9_+-])?$"

_ALLOWED = re.compile(f"[{NAME_CHARS}]*")
# Names Windows reserves for devices, with or without an extension (`nul.txt` is a device too).
_DEVICE = re.compile(r"^(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?$", re.IGNORECASE)
_PREVIEW = 60
_RULE = (
    f"a name is 1-{MAX_NAME_LENGTH} characters from A-Z a-z 0-9 . _ + -, "
    "not starting with '.' or '-' and not ending with '.'"
)


class UnsafeName(ConstraintViolation, ValueError):
    """A name that cannot be one path component: `bad_payload` on the wire, a `ValueError` in code."""

    def __init__(self, field: str, value: object, rule: str) -> None:
        super().__init__(field, f"{_preview(value)} is not a safe name: {rule}")
        self.field = field
        self.name_rule = rule


def check_safe_name(value: object, field: str) -> str:
    """Return `value` unchanged when it is a safe single path component; raise `UnsafeName` if not.

    `field` names where the value came from (`"payload.run_id"`) and starts the message.
    Refused: non-strings, the empty string, `.` and `..`, path separators (`/`, `\\`), NUL and
    other control characters, a leading `.` or `-`, a trailing `.`, more than 120 characters,
    Windows device names (`con`, `nul.txt`, `com1`, ...) and anything outside `A-Z a-z 0-9 . _ + -`.
    """
    if not isinstance(value, str):
        raise UnsafeName(field, value, f"expected a string, got {type(value).__name__}")
    if value == "":
        raise UnsafeName(field, value, "it is empty")
    if value in (".", ".."):
        raise UnsafeName(field, value, "'.' and '..' name folders, not files")
    for char in value:
        if char in "/\\":
            raise UnsafeName(field, value, f"it contains the path separator {char!r}")
        if char == "\x00":
            raise UnsafeName(field, value, "it contains a NUL byte")
        if ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0:
            raise UnsafeName(field, value, f"it contains the control character {char!r}")
    if len(value) > MAX_NAME_LENGTH:
        raise UnsafeName(field, value, f"it is {len(value)} characters long, at most {MAX_NAME_LENGTH} are allowed")
    if value[0] in ".-":
        raise UnsafeName(field, value, f"it starts with {value[0]!r}")
    if value.endswith("."):
        raise UnsafeName(field, value, "it ends with '.'")
    if _ALLOWED.fullmatch(value) is None:
        bad = sorted({char for char in value if _ALLOWED.fullmatch(char) is None})
        shown = " ".join(repr(char) for char in bad[:8])
        raise UnsafeName(field, value, f"it contains {shown}; {_RULE}")
    if _DEVICE.match(value):
        raise UnsafeName(field, value, "it is a device name on Windows")
    return value


def _preview(value: object) -> str:
    if not isinstance(value, str):
        return type(value).__name__
    text = value if len(value) <= _PREVIEW else value[:_PREVIEW] + "..."
    return repr(text)
