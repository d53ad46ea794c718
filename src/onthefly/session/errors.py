"""Domain errors mapped to the wire's error codes, in one place.

Handlers raise what their library raises (`CheckpointError`, `MergeError`, `BundleError`, ...);
`wire_handler` wraps every registered handler so each of those reaches the dashboard with the
code that says what kind of failure it was and the library's own message, instead of a generic
`failed` with a Python type name.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from ..checkpoints import CheckpointError
from ..control.errors import CommandError, ErrorCode, ProtocolError
from ..control.gate import GateClosed


class SessionClosed(RuntimeError):
    """The session was closed (its training ended and it released its threads): commands cannot run."""


def wire_error(exc: BaseException) -> ProtocolError | None:
    """The protocol error a domain exception becomes, or None for an unexpected error."""
    from ..data_explorer import LossCallError, ModelCallError, ScanCancelled
    from ..merging import MergeError
    from ..session_bundle import BundleError
    from .config import ConfigError

    if isinstance(exc, ProtocolError):
        return exc
    if isinstance(exc, CheckpointError):
        missing = exc.problem == "no such file"
        return CommandError(str(exc), ErrorCode.NOT_FOUND if missing else ErrorCode.FAILED)
    if isinstance(exc, (MergeError, ConfigError)):
        return CommandError(str(exc), ErrorCode.BAD_PAYLOAD)
    if isinstance(exc, (BundleError, LossCallError, ModelCallError, GateClosed, SessionClosed)):
        return CommandError(str(exc), ErrorCode.FAILED)
    if isinstance(exc, ScanCancelled):
        return CommandError(f"{exc} (the run was stopped or the session closed)", ErrorCode.FAILED)
    return None


def wire_handler(handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`handler` with domain errors raised as their protocol errors (others pass through unchanged)."""

    @functools.wraps(handler)
    def run(payload: Any) -> Any:
        try:
            return handler(payload)
        except ProtocolError:
            raise
        except Exception as exc:
            mapped = wire_error(exc)
            if mapped is None:
                raise
            raise mapped from exc

    return run
