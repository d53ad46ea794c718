"""The error vocabulary of the wire: every failure a dashboard can see has one of these codes."""

from __future__ import annotations


class ErrorCode:
    """The `code` values of an error reply (see docs/protocol.md)."""

    BAD_JSON = "bad_json"
    BAD_ENVELOPE = "bad_envelope"
    UNKNOWN_COMMAND = "unknown_command"
    BAD_PAYLOAD = "bad_payload"
    BUSY = "busy"
    NOT_PAUSED = "not_paused"
    NOT_FOUND = "not_found"
    FAILED = "failed"

    ALL = frozenset(
        {BAD_JSON, BAD_ENVELOPE, UNKNOWN_COMMAND, BAD_PAYLOAD, BUSY, NOT_PAUSED, NOT_FOUND, FAILED}
    )


class ProtocolError(Exception):
    """A request could not be served; `code` says why in the wire's vocabulary.

    `request_id` is the id of the request it answers, when one could be read.
    """

    def __init__(self, code: str, message: str, *, request_id: str | None = None) -> None:
        if code not in ErrorCode.ALL:
            raise ValueError(f"unknown protocol error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id

    def __repr__(self) -> str:
        return f"ProtocolError({self.code!r}, {self.message!r})"


class ConstraintViolation(ProtocolError):
    """A value of the right type that breaks a rule on its field (`bad_payload`, naming the path)."""

    def __init__(self, path: str, rule: str) -> None:
        super().__init__(ErrorCode.BAD_PAYLOAD, f"{path}: {rule}")
        self.path = path
        self.rule = rule


class CommandError(ProtocolError):
    """Raised by a command handler to fail with a specific code (default `failed`)."""

    def __init__(self, message: str, code: str = ErrorCode.FAILED) -> None:
        super().__init__(code, message)
