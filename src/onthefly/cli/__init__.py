"""The `onthefly` command: a terminal dashboard (`listen`, `run`) and the web dashboard (`dashboard`).

`onthefly listen` waits for a training process to connect over TCP; `onthefly run SCRIPT` starts
the script itself and speaks to it over stdio. Both show a live view (rich, when stdout is a
terminal) or one plain line per interesting event, and read commands typed on stdin, one per
line. `onthefly dashboard` serves a web page instead (see onthefly.dashboard).

Modules: `commands` (what you can type), `formatting` (event and reply lines), `views` (plain and
rich output), `console` (the typed-command reader), `common` (what the subcommands share), `program`
(`listen`, `run`, the parser), `web` (`dashboard`). rich and the web
server are imported only when used, so `import onthefly.cli` stays cheap.
"""

from __future__ import annotations

from .commands import (
    COMMAND_ALIASES,
    COMMAND_TIMEOUTS_S,
    DEFAULT_TIMEOUT_S,
    HELP_TEXT,
    CommandSyntaxError,
    TypedCommand,
    parse_command,
)
from .console import CommandConsole
from .formatting import fmt_float, format_event, format_reply, format_train_step
from .common import KEEP_EVENTS, exit_status, pump_events, script_argv, write_text_atomic
from .program import build_parser, cmd_listen, cmd_run, main
from .web import cmd_dashboard
from .views import PlainView, RichView, RunState, View, make_view

__all__ = [
    "main",
    "build_parser",
    "parse_command",
    "TypedCommand",
    "CommandSyntaxError",
    "COMMAND_ALIASES",
    "COMMAND_TIMEOUTS_S",
    "DEFAULT_TIMEOUT_S",
    "HELP_TEXT",
    "fmt_float",
    "format_event",
    "format_reply",
    "format_train_step",
    "RunState",
    "View",
    "PlainView",
    "RichView",
    "make_view",
    "CommandConsole",
    "pump_events",
    "cmd_listen",
    "cmd_run",
    "cmd_dashboard",
    "KEEP_EVENTS",
    "script_argv",
    "exit_status",
    "write_text_atomic",
]
