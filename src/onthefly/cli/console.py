"""The command console: reads typed commands from a stream on its own thread and sends them to the trainer."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TextIO

from ..client import DashboardBase, RequestError, TrainerDisconnected
from ..client.wire import reply_timeout
from .commands import HELP_TEXT, CommandSyntaxError, parse_command
from .views import View

__all__ = ["CommandConsole"]

logger = logging.getLogger(__name__)


class CommandConsole:
    """Reads commands typed on `stream` (one per line) on its own thread and sends them.

    Commands run one at a time: the next line is read once the reply (or error) is shown.
    End of input stops reading but leaves the dashboard running; `quit` sets `quit_event`.
    """

    def __init__(
        self,
        dash: DashboardBase,
        view: View,
        stream: TextIO,
        quit_event: threading.Event,
        on_end_of_input: Callable[[], None] | None = None,
    ) -> None:
        self.dash = dash
        self.view = view
        self.stream = stream
        self.quit_event = quit_event
        self.on_end_of_input = on_end_of_input
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="onthefly-cli-commands", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.quit_event.is_set():
            try:
                line = self.stream.readline()
            except (OSError, ValueError) as exc:  # no usable stdin (closed, or captured by a test runner)
                logger.debug("not reading commands: %s", exc)
                line = ""
            if not line:
                if self.on_end_of_input is not None:
                    self.on_end_of_input()
                return
            self.execute(line)

    def execute(self, line: str) -> None:
        """Parse and run one typed line, showing the outcome in the view."""
        try:
            command = parse_command(line)
        except CommandSyntaxError as exc:
            self.view.message(f"? {exc}")
            return
        if command is None:
            return
        if command.local:
            if command.name == "help":
                self.view.message(HELP_TEXT)
            else:
                self.quit_event.set()
            return
        timeout = reply_timeout(command.name)
        try:
            data = self.dash.request(command.name, command.payload, timeout=timeout)
        except TrainerDisconnected as exc:
            self.view.message(f"{command.name} failed [disconnected]: {exc.message}")
        except RequestError as exc:
            self.view.message(f"{command.name} failed [{exc.code or 'error'}]: {exc.message}")
        except TimeoutError as exc:
            self.view.message(f"{command.name} failed [timeout]: {exc}")
        else:
            self.view.reply(command.name, data)

