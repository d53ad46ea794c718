"""What a dashboard asks about the session, and disk housekeeping.

Commands: `server_info`, `status`, `describe_commands`, `events_since`, `clean_disk`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from .._version import __version__
from ..control.bus import events_since_page
from ..control.constraints import Range
from .command import command


@dataclass
class NoPayload:
    """No payload fields (extra keys are ignored)."""


@dataclass
class EventsSince:
    event_seq: Annotated[int, Range(ge=0)] = 0
    limit: Annotated[int, Range(ge=1, le=10_000)] = 1000


@dataclass
class CleanDisk:
    #: all: earlier sessions' folders and old checkpoints of runs other than the current one;
    #: sessions: only earlier sessions' folders; checkpoints: only old checkpoints.
    scope: Literal["all", "sessions", "checkpoints"] = "all"


class InfoMixin:
    """Read-only views of the session, and `clean_disk` (no state of its own)."""

    @command("server_info", NoPayload, mutating=False, description="version, capabilities and device")
    def cmd_server_info(self, p: NoPayload) -> dict[str, Any]:
        return {
            "version": __version__,
            "protocol": 1,
            "capabilities": self.router.names(),
            "runtime": self.framework.runtime,
            "device": str(self.resolve_device()),
            "session_id": self.session_id,
            "project": self.cfg.project,
            "run_id": self.cfg.run_name,
            "storage": str(self.storage.folder),
        }

    @command("describe_commands", NoPayload, mutating=False,
             description="every command with its description, whether it mutates, and its payload's JSON Schema")
    def cmd_describe_commands(self, p: NoPayload) -> dict[str, Any]:
        """What an agent needs to call any command without reading the docs (`CommandRouter.json_schema`)."""
        return {**self.router.json_schema(), "runtime": self.framework.runtime, "protocol": 1}

    @command("status", NoPayload, mutating=False, description="where the run is")
    def cmd_status(self, p: NoPayload) -> dict[str, Any]:
        st = self.state
        return {
            "run_id": self.cfg.run_name,
            "session_id": self.session_id,
            "project": self.cfg.project,
            "runtime": self.framework.runtime,
            "step": st.step,
            "epoch": st.epoch,
            "batch_in_epoch": st.batch_in_epoch,
            "paused": self.gate.paused,
            "running": st.running,
            "training": st.training,
            "status": st.status,
            "last_metrics": dict(st.last_metrics),
            "last_val_loss": st.last_val_loss,
            "active_subset_size": len(self.active_subset) if self.active_subset is not None else None,
            "pending_commands": self.gate.queued,
            "world_size": self.ranks.world if self.ranks is not None else 1,  # ranks steered as one
        }

    @command("events_since", EventsSince, mutating=False, description="stored events after an event_seq (paged)")
    def cmd_events_since(self, p: EventsSince) -> dict[str, Any]:
        return events_since_page(self.bus.event_log, p.event_seq, p.limit)

    @command("clean_disk", CleanDisk, mutating=True,
             description="delete earlier sessions' folders and old checkpoints that this library created")
    def cmd_clean_disk(self, p: CleanDisk) -> dict[str, Any]:
        root = self.storage.project_dir
        if self.is_follower:  # rank 0 deletes; the others would race it for the same files
            return {"ok": True, "scope": p.scope, "root": str(root), "removed": [], "failed": []}
        removed: list[str] = []
        failed: list[dict[str, str]] = []
        if p.scope in ("all", "sessions"):
            for folder in self.storage.other_sessions():
                try:
                    shutil.rmtree(folder)
                    removed.append(folder.name + "/")
                except OSError as exc:
                    failed.append({"path": str(folder), "error": str(exc)})
        if p.scope in ("all", "checkpoints"):
            for run_id in self.storage.run_ids():
                if run_id == self.cfg.run_name:
                    continue
                for info in self.ring(run_id).list()[:-1]:  # every run keeps its latest checkpoint
                    try:
                        info.path.unlink()
                        removed.append(str(info.path.relative_to(self.storage.folder)))
                    except OSError as exc:
                        failed.append({"path": str(info.path), "error": str(exc)})
        self.log(f"[clean_disk] scope {p.scope}: removed {len(removed)} item(s) under {root}"
                 + (f"; {len(failed)} failed" if failed else ""), level="error" if failed else "info")
        return {"ok": not failed, "scope": p.scope, "root": str(root), "removed": removed, "failed": failed}
