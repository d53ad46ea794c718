"""`onthefly dashboard`: serve the web dashboard for trainers that connect over TCP, or for a script it starts.

The web server lives in onthefly.dashboard and needs the optional `dashboard` extra; it is
imported here, inside the subcommand, so `import onthefly.cli` never loads it.
"""

from __future__ import annotations

import argparse
import sys
import threading
from typing import TextIO

from ..client import DashboardBase, DashboardServer, ProcessDashboard
from .common import KEEP_EVENTS, exit_status, pump_events, script_argv, write_text_atomic
from .views import PlainView

__all__ = ["cmd_dashboard", "add_dashboard_parser", "DASHBOARD_STEP_LINES_PER_S"]

# The page shows every step; the terminal only says now and then where training is.
DASHBOARD_STEP_LINES_PER_S = 0.2
MISSING_EXTRA = (
    "onthefly dashboard: the web dashboard needs its optional dependencies; "
    "install them with: pip install 'onthefly[dashboard]'"
)


def add_dashboard_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `onthefly dashboard` and its options on the subcommand parser `sub`."""
    dash = sub.add_parser(
        "dashboard",
        help="serve the web dashboard: trainers connect as with `listen`, or --run starts SCRIPT",
        description="Serve a web page that shows and steers the run. Prints the page's URL (with its access "
        "token) and opens nothing by itself.",
    )
    dash.add_argument("--port", type=int, default=None, help="trainer port (default $ONTHEFLY_DASHBOARD_PORT or 47621; 0: any free port)")
    dash.add_argument("--host", default="127.0.0.1", help="address trainers connect to (default 127.0.0.1)")
    dash.add_argument("--http-port", type=int, default=8765, help="port of the web page (default 8765; 0: any free port)")
    dash.add_argument("--http-host", default="127.0.0.1", help="address of the web page (default 127.0.0.1)")
    dash.add_argument("--allow-remote", action="store_true", help="allow non-loopback --host / --http-host (anyone with the token can steer!)")
    dash.add_argument("--url-file", metavar="PATH", help="write the page URL (with its token) to PATH, for scripts and tests")
    dash.add_argument("--port-file", metavar="PATH", help="write the bound trainer port to PATH")
    dash.add_argument("--exit-with-script", action="store_true", help="with --run: exit when the script exits (default: keep the page up until Ctrl+C)")
    dash.add_argument("--run", nargs=argparse.REMAINDER, metavar="SCRIPT", help="start SCRIPT [args...] over stdio, like `onthefly run` (must come last)")
    dash.set_defaults(handler=cmd_dashboard)


def cmd_dashboard(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    """`onthefly dashboard`: serve the page until Ctrl+C (or the script's exit with --exit-with-script)."""
    try:
        from ..dashboard import PROCESS_EXIT_TYPE, WebDashboard
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "aiohttp":
            print(MISSING_EXTRA, file=sys.stderr)
            return 2
        raise
    dash: DashboardBase
    try:
        if args.run is not None:
            if not args.run:
                raise ValueError("--run needs a script, e.g. --run train.py --epochs 3")
            argv = script_argv(args.run[0], list(args.run[1:]))
            dash = ProcessDashboard(argv, keep_events=KEEP_EVENTS)
            describe: dict[str, object] = {"mode": "process", "argv": argv}
        else:
            dash = DashboardServer(args.port, args.host, allow_remote=args.allow_remote, keep_events=KEEP_EVENTS)
            describe = {"mode": "tcp"}
        web = WebDashboard(dash, args.http_host, args.http_port, allow_remote=args.allow_remote, describe=describe)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"onthefly dashboard: {exc}", file=sys.stderr)
        return 2
    try:
        web.start()  # first: a busy page port fails before any script is started
    except OSError as exc:
        print(f"onthefly dashboard: {exc}", file=sys.stderr)
        return 1
    try:
        dash.start()
    except OSError as exc:
        web.close()
        print(f"onthefly dashboard: {exc}", file=sys.stderr)
        return 1
    view = PlainView(stdout, steps_per_s=DASHBOARD_STEP_LINES_PER_S)
    quit_event = threading.Event()
    interrupted = False
    try:
        if isinstance(dash, DashboardServer):
            web.describe["trainer"] = f"{dash.host}:{dash.port}"
            if args.port_file:
                write_text_atomic(args.port_file, f"{dash.port}\n")
        if args.url_file:
            write_text_atomic(args.url_file, web.url + "\n")
        view.message(f"dashboard: {web.url}")
        if isinstance(dash, DashboardServer):
            view.message(
                f"trainers connect to {dash.host}:{dash.port} (ONTHEFLY_DASHBOARD_PORT={dash.port}); Ctrl+C quits"
            )
        else:
            view.message(f"running {' '.join(dash.argv)} (pid {dash.pid}); Ctrl+C stops it")
        dash.on_connection_change(view.connection)
        pump_events(dash, view, quit_event)
        if isinstance(dash, ProcessDashboard):
            code = dash.wait()
            dash.wait_callbacks()  # the script's last events are in the page history before its exit
            web.hub.publish({"type": PROCESS_EXIT_TYPE, "returncode": code})
            view.message(f"{args.run[0]} exited with code {code}")
            if args.exit_with_script:
                return exit_status(code, False)
            view.message("the page stays up; Ctrl+C quits")
            quit_event.wait()
    except KeyboardInterrupt:
        interrupted = True
        view.message("interrupted")
    finally:
        view.flush()
        dash.close()
        web.close()
    if isinstance(dash, ProcessDashboard):
        return exit_status(dash.returncode, interrupted and dash.returncode is None)
    return 0
