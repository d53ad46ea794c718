"""The `onthefly` program: the `listen` and `run` subcommands, the argument parser (with `dashboard` and `replay`) and `main`.

`listen` waits for a training process over TCP, `run` starts a script over stdio; both show the
terminal view and read typed commands. `dashboard` serves the web page; it imports the web
server (an optional extra) only when it is the subcommand being run.
"""

from __future__ import annotations

import argparse
import sys
import threading
from typing import Any, TextIO

from .._version import __version__
from ..client import DashboardServer, ProcessDashboard
from .common import KEEP_EVENTS, exit_status, pump_events, script_argv, write_text_atomic
from .console import CommandConsole
from .replay import add_replay_parser
from .views import make_view
from .web import add_dashboard_parser

__all__ = ["cmd_listen", "cmd_run", "build_parser", "main"]


def cmd_listen(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    """`onthefly listen`: wait for a trainer on TCP and steer it."""
    try:
        server = DashboardServer(args.port, args.host, allow_remote=args.allow_remote, keep_events=KEEP_EVENTS)
        server.start()
    except (ValueError, TypeError) as exc:
        print(f"onthefly listen: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"onthefly listen: {exc}", file=sys.stderr)
        return 1
    view = make_view(args.plain, stdout)
    quit_event = threading.Event()
    try:
        if args.port_file:
            write_text_atomic(args.port_file, f"{server.port}\n")
        server.on_connection_change(view.connection)
        view.message(
            f"listening on {server.host}:{server.port}; start a training script "
            f"(ONTHEFLY_DASHBOARD_PORT={server.port}). Type 'help' for commands."
        )
        CommandConsole(server, view, stdin, quit_event).start()
        view.start()
        pump_events(server, view, quit_event)
    except KeyboardInterrupt:
        view.message("interrupted")
    finally:
        view.flush()
        view.stop()
        server.close()
    return 0


def cmd_run(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    """`onthefly run`: start SCRIPT with the stdio transport, show it, exit with its exit code."""
    try:
        argv = script_argv(args.script, list(args.args))
    except FileNotFoundError as exc:
        print(f"onthefly run: {exc}", file=sys.stderr)
        return 2
    dash = ProcessDashboard(argv, keep_events=KEEP_EVENTS)
    try:
        dash.start()
    except OSError as exc:
        print(f"onthefly run: cannot start {args.script}: {exc}", file=sys.stderr)
        return 1
    view = make_view(args.plain, stdout)
    view.state.connected = True
    quit_event = threading.Event()
    input_ended = threading.Event()
    training_finished = threading.Event()
    release_lock = threading.Lock()

    def release_script_if_done() -> None:
        # A finished training keeps serving its dashboard until told to stop; once nothing more
        # can be typed, close its stdin so it can exit (instead of waiting forever).
        with release_lock:
            if input_ended.is_set() and training_finished.is_set() and not dash.ended:
                view.message("training finished and no more input: closing the script's stdin")
                dash.close_input()
                input_ended.clear()

    def on_end_of_input() -> None:
        input_ended.set()
        release_script_if_done()

    def observe(event: dict[str, Any]) -> None:
        if event.get("type") == "trainingFinished":
            training_finished.set()
            release_script_if_done()

    interrupted = False
    try:
        view.message(f"running {' '.join(argv)} (pid {dash.pid}). Type 'help' for commands.")
        CommandConsole(dash, view, stdin, quit_event, on_end_of_input).start()
        view.start()
        pump_events(dash, view, quit_event, observe=observe)
    except KeyboardInterrupt:
        interrupted = True
        view.message("interrupted; stopping the script")
    finally:
        if not dash.ended and not interrupted:
            view.message("stopping the script")
        dash.close()
        view.flush()
        code = dash.returncode
        view.message(f"{args.script} exited with code {code}")
        view.stop()
    return exit_status(code, interrupted)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onthefly",
        description="Watch and steer a running PyTorch training from the terminal or a web page.",
    )
    parser.add_argument("--version", action="version", version=f"onthefly {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{listen,run,dashboard,replay}")

    listen = sub.add_parser("listen", help="wait for a training process to connect over TCP")
    listen.add_argument("--port", type=int, default=None, help="port (default $ONTHEFLY_DASHBOARD_PORT or 47621; 0: any free port)")
    listen.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    listen.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host (no authentication!)")
    listen.add_argument("--plain", action="store_true", help="plain lines instead of the live view")
    listen.add_argument("--port-file", metavar="PATH", help="write the bound port to PATH (for scripts and tests)")
    listen.set_defaults(handler=cmd_listen)

    run = sub.add_parser("run", help="start SCRIPT with the stdio transport and steer it")
    run.add_argument("--plain", action="store_true", help="plain lines instead of the live view")
    run.add_argument("script", help="a .py file (run with this Python) or a program")
    run.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    run.set_defaults(handler=cmd_run)

    add_dashboard_parser(sub)
    add_replay_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `onthefly` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version or a usage error: argparse already printed it
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.handler(args, sys.stdin, sys.stdout))
