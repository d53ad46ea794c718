"""The control plane: the wire to a dashboard, command routing and the pause window (no torch here).

Layers, bottom up: `jsonsafe` (strict JSON lines), `envelope` (requests and replies), `channels`
(TCP, stdio, memory, off), `eventlog` (durable events), `bus` (reader → command queue, one FIFO
writer with replay), `names` (the safe path-component rule), `constraints` and `schema` (payload
rules and their JSON Schema), `router` (commands and payload validation), `gate` (the pause
window) and `dispatch` (the thread that routes requests inline or through the gate).
"""

from .bus import ControlBus, events_since_page
from .channels import (
    DEFAULT_DASHBOARD_PORT,
    Channel,
    LineDecoder,
    LineSink,
    MemoryChannel,
    NullChannel,
    StdioChannel,
)
from .constraints import Length, Range, SafeName
from .tcp import TcpClientChannel, channel_from_env
from .dispatch import CommandDispatcher
from .envelope import (
    MAX_LINE_BYTES,
    Request,
    debug_enabled,
    error_event,
    parse_request,
    reply_error,
    reply_ok,
)
from .errors import CommandError, ConstraintViolation, ErrorCode, ProtocolError
from .eventlog import EventLog
from .gate import ConsoleAction, ControlDelegate, GateClosed, PauseGate
from .jsonsafe import encode_line, encode_text, to_jsonable
from .names import UnsafeName, check_safe_name
from .router import CommandRouter, CommandSpec, validate_payload

__all__ = [
    "DEFAULT_DASHBOARD_PORT",
    "MAX_LINE_BYTES",
    "Channel",
    "CommandDispatcher",
    "CommandError",
    "CommandRouter",
    "CommandSpec",
    "ConsoleAction",
    "ConstraintViolation",
    "ControlBus",
    "ControlDelegate",
    "ErrorCode",
    "EventLog",
    "GateClosed",
    "Length",
    "LineDecoder",
    "LineSink",
    "MemoryChannel",
    "NullChannel",
    "PauseGate",
    "ProtocolError",
    "Range",
    "Request",
    "SafeName",
    "StdioChannel",
    "TcpClientChannel",
    "UnsafeName",
    "channel_from_env",
    "check_safe_name",
    "debug_enabled",
    "encode_line",
    "encode_text",
    "error_event",
    "events_since_page",
    "parse_request",
    "reply_error",
    "reply_ok",
    "to_jsonable",
    "validate_payload",
]
