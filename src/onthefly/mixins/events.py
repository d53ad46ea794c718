"""Events: how a session reports what happens, stamped and ordered by the control bus."""

from __future__ import annotations

import sys
from typing import Any


class EventsMixin:
    """Emits protocol events through `self.bus` (which stamps `event_seq`, `ts` and the run context)."""

    bus: Any

    def emit(self, type: str, **fields: Any) -> int:
        """Queue one event; cheap enough for the training thread (no JSON, no I/O here)."""
        return self.bus.emit(type, fields)

    def emit_event(self, type: str, fields: dict) -> int:
        """The `EmitFn` shape used by the control layer (ConsoleAction)."""
        return self.bus.emit(type, fields)

    def log(self, text: str, *, level: str = "info", phase: str | None = None, echo: bool = False) -> None:
        """A `log` event; `echo` also prints it to stderr for users without a dashboard."""
        fields: dict[str, Any] = {"text": text, "level": level}
        if phase is not None:
            fields["phase"] = phase
        self.bus.emit("log", fields)
        if echo:
            print(f"[onthefly] {text}", file=sys.stderr, flush=True)

    def update_event_context(self) -> None:
        """Re-stamp future events after the run or session identity changed."""
        self.bus.set_context(run_id=self.cfg.run_name, run_gen=self.run_gen, session_id=self.session_id)
