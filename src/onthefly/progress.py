"""A one-line progress display for a terminal, drawn off the training thread.

`Trainer.fit` shows it when stdout is a TTY and no dashboard is connected: epoch, step, loss and
throughput, from what the session already knows (`state`, the last reported `trainStep`). A
daemon thread reads them a few times a second and redraws with rich, so the training thread does
no work for it at all; it hides itself while a dashboard is connected.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any, TextIO

from .telemetry import as_float

REFRESH_S = 0.25


def wants_progress(setting: bool | None, stream: TextIO | None = None) -> bool:
    """`progress=True/False` as given; None means: only on an interactive terminal."""
    if setting is not None:
        return bool(setting)
    stream = stream if stream is not None else sys.stdout
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def progress_line(session: Any) -> str:
    """`epoch 2 · step 340 · loss 0.4123 · 5,120 samples/s` from the session's last report."""
    st = session.state
    parts = [f"{session.cfg.run_name}", f"epoch {st.epoch}", f"step {st.step}"]
    metrics = st.last_metrics
    loss = metrics.get("loss")
    if loss is not None:
        value = as_float(loss)
        if value is not None:
            parts.append(f"loss {value:.4f}")
    if st.last_val_loss is not None:
        parts.append(f"val {st.last_val_loss:.4f}")
    throughput = metrics.get("throughput")
    if throughput:
        parts.append(f"{throughput:,.0f} samples/s")
    if session.gate.paused:
        parts.append("paused")
    return " · ".join(parts)


class ProgressDisplay:
    """Shows `progress_line(session)` until stopped: redrawn in place on a terminal, else one line per epoch."""

    def __init__(self, session: Any, stream: TextIO | None = None) -> None:
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        self._text = Text
        self.session = session
        self._stream = stream if stream is not None else sys.stdout
        self._console = Console(file=self._stream)
        self._live = Live(console=self._console, auto_refresh=False, transient=False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="onthefly-progress", daemon=True)
        self._shown = False
        self._cursor = session.bus.last_seq()  # the event log is read from here on (not on a terminal)

    def start(self) -> "ProgressDisplay":
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(REFRESH_S):
            self._draw()
        self._draw(final=True)

    def _draw(self, final: bool = False) -> None:
        if self.session.bus.connected:
            if self._shown:
                self._live.stop()  # a dashboard shows the run now: give the terminal back
                self._shown = False
            return
        if not self._console.is_terminal:
            self._print_epochs(final)
            return
        if not self._shown:
            self._live.start()
            self._shown = True
        self._live.update(self._text(progress_line(self.session)), refresh=True)
        if final:
            self._live.stop()
            self._shown = False

    def _print_epochs(self, final: bool) -> None:
        """Off a terminal: one line per epoch that ended, read from the event log (every epoch, in order)."""
        if final:
            self.session.bus.flush(timeout=2.0, wire=False)
        while True:
            rows = self.session.bus.event_log.read_after(self._cursor, 500)
            if not rows:
                break
            self._cursor = rows[-1][0]
            for _, body in rows:
                if '"epoch_end"' in body:
                    event = json.loads(body)
                    if event.get("type") == "epoch_end":
                        val = event.get("val_loss")
                        print(f"{event.get('run_id')} · epoch {event.get('epoch')} done"
                              + ("" if val is None else f" · val_loss {val:.4f}"), file=self._stream, flush=True)
        if final:
            print(progress_line(self.session), file=self._stream, flush=True)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
