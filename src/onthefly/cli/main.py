"""The `onthefly` subcommands (`listen`, `run`, `dashboard`), the argument parser and `main`.

`listen` waits for a training process over TCP, `run` starts a script over stdio; both show the
terminal view and read typed commands. `dashboard` serves the web page; it imports the web
server (an optional extra) only when it is the subcommand being run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

from .._version import __version__
from ..client import DashboardBase, DashboardServer, ProcessDashboard
from ..fileio import atomic_write
from .console import CommandConsole
from .views import View, make_view

__all__ = [
    "KEEP_EVENTS",
    "write_text_atomic",
    "pump_events",
    "cmd_listen",
    "script_argv",
    "exit_status",
    "cmd_run",
    "build_parser",
    "main",
]

# Events kept in memory by the CLI's dashboard (older ones are only in the trainer's event log).
KEEP_EVENTS = 10_000


def write_text_atomic(path: str, text: str) -> None:
    """Write `text` to `path` atomically (temp file in the same folder, fsync, rename)."""
    data = text.encode("utf-8")
    atomic_write(path, lambda handle: handle.write(data))


def pump_events(
    dash: DashboardBase,
    view: View,
    quit_event: threading.Event,
    poll_s: float = 0.2,
    observe: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Show events until `quit` is typed or the stream ends (all delivered events shown)."""
    while not quit_event.is_set():
        for event in dash.events(timeout=poll_s):
            view.event(event)
            if observe is not None:
                observe(event)
            if quit_event.is_set():
                return
        if dash.ended:
            for event in dash.events(timeout=0):
                view.event(event)
            return


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


def script_argv(script: str, args: list[str]) -> list[str]:
    """The command line that runs SCRIPT: Python (unbuffered) for .py files, else the program itself."""
    if script.endswith(".py"):
        if not os.path.isfile(script):
            raise FileNotFoundError(f"no such script: {script}")
        return [sys.executable, "-u", script, *args]
    if os.path.isfile(script) and os.access(script, os.X_OK):
        return [os.path.abspath(script), *args]
    found = shutil.which(script)
    if found is None:
        raise FileNotFoundError(f"no such script or program: {script}")
    return [found, *args]


def exit_status(returncode: int | None, interrupted: bool) -> int:
    """The CLI's exit status for a script's return code (128+N for a signal, as shells do)."""
    if returncode is None:
        return 130 if interrupted else 1
    if returncode < 0:
        return 128 - returncode
    return returncode


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
        description="Watch and steer a running PyTorch training from the terminal.",
    )
    parser.add_argument("--version", action="version", version=f"onthefly {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{listen,run}")

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
