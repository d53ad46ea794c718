"""The dashboard end of the wire: listen for (or spawn) a training process, send it commands, receive its events.

Two front ends share one engine (`DashboardBase`, in `base.py`), which talks JSON lines over a
pair of byte streams:

- `DashboardServer` (`server.py`) listens on TCP (127.0.0.1, `ONTHEFLY_DASHBOARD_PORT` or 47621)
  and accepts one training process at a time; the same process may reconnect after a drop.
- `ProcessDashboard` (`process.py`) starts a training script with `ONTHEFLY_TRANSPORT=stdio` and
  speaks the protocol on its stdin/stdout; the script's stderr becomes `log` events with
  `level: "stderr"`.

Events are delivered exactly once and in `event_seq` order across reconnects: duplicates are
dropped, and a gap is filled with the `events_since` command (`ordering.py`), run as a small
state machine on the reader thread so the reply (which arrives on the same stream) is never
waited for there. `wire.py` holds the request encoding, port resolution and the errors; `tools.py` turns
`describe_commands` into tool specs for agents.
This package is pure Python; it must not import torch.
"""

from __future__ import annotations

from .base import DashboardBase
from .process import ProcessDashboard
from .server import DashboardServer
from .tools import ToolArgumentError, check_arguments, tool_specs
from .wire import (
    DEFAULT_PORT,
    MAX_LINE_BYTES,
    PORT_ENV,
    RequestError,
    TrainerDisconnected,
    encode_request,
    resolve_port,
)

__all__ = [
    "DEFAULT_PORT",
    "PORT_ENV",
    "MAX_LINE_BYTES",
    "RequestError",
    "TrainerDisconnected",
    "DashboardBase",
    "DashboardServer",
    "ProcessDashboard",
    "ToolArgumentError",
    "check_arguments",
    "tool_specs",
    "encode_request",
    "resolve_port",
]
