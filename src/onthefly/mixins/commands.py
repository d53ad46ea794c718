"""Command handlers of a session, one function per command, grouped by concern.

Each handler takes the validated payload (a dataclass from `session/schemas.py`) and returns the
reply data. `mutating=True` handlers run on the training thread at a batch boundary (through the
gate); the others are answered at once by the command-drain thread.
"""

from __future__ import annotations

import shutil
from concurrent.futures import Future
from typing import Any

from .._version import __version__
from ..control.bus import events_since_page
from ..control.errors import CommandError, ErrorCode
from ..control.router import CommandRouter
from ..session.schemas import (
    CleanDisk,
    EnforceVersion,
    EventsSince,
    Empty,
    ListCheckpoints,
    LoadCkpt,
    Pause,
    ResetSession,
    SetHparams,
    TestNow,
    TestRequest,
)

OPTIMIZER_HPARAMS = ("lr", "weight_decay", "momentum", "betas", "eps", "dampening")


class CommandsMixin:
    """Registers and implements the session's commands."""

    def _register_commands(self, router: CommandRouter) -> None:
        self._register_control_commands(router)
        self._register_info_commands(router)
        self._register_checkpoint_commands(router)
        self._register_test_commands(router)
        self._register_run_commands(router)
        self._register_feature_commands(router)
        self._register_fork_merge_commands(router)
        self._register_health_commands(router)

    # ---- control: pause, resume, stop, set_hparams, reset ------------------------------------
    def _register_control_commands(self, router: CommandRouter) -> None:
        router.register("pause", self.cmd_pause, schema=Pause, mutating=True,
                        description="pause at the next batch boundary")
        router.register("resume", self.cmd_resume, schema=Empty, mutating=True, description="continue training")
        router.register("stop", self.cmd_stop, schema=Empty, mutating=False,
                        description="end training after the current batch")
        router.register("enforce_version", self.cmd_enforce_version, schema=EnforceVersion, mutating=False,
                        description="the dashboard refuses this version: stop with its message")
        router.register("set_hparams", self.cmd_set_hparams, schema=SetHparams, mutating=True,
                        description="change optimizer hyperparameters and grad clipping")
        router.register("reset_session", self.cmd_reset_session, schema=ResetSession, mutating=True,
                        description="restore the state captured at the start of training")

    def cmd_pause(self, p: Pause) -> dict[str, Any]:
        return self.console.pause({"action": "pause", "reason": p.reason})

    def cmd_resume(self, p: Empty) -> dict[str, Any]:
        if not self.state.training and self._reposition and self.state.running:
            self._restart_requested = True  # serving after training: train the new starting point
        return self.console.resume()

    def cmd_stop(self, p: Empty) -> dict[str, Any]:
        self.request_stop()
        return {"status": "stopping", "step": self.state.step}

    def request_stop(self) -> None:
        """End training at the next boundary (also releases a paused loop)."""
        if self.state.running or not self._stop_requested:
            self.emit("stopping", step=self.state.step)
        self._stop_requested = True
        self.state.running = False
        self.gate.interrupt()

    def cmd_enforce_version(self, p: EnforceVersion) -> dict[str, Any]:
        self._fatal = p.message
        self.log(p.message, level="error")
        self.request_stop()
        return {"status": "fatal", "message": p.message}

    def cmd_set_hparams(self, p: SetHparams) -> dict[str, Any]:
        if self.optimizer is None:
            raise CommandError("no optimizer is bound to the session", ErrorCode.NOT_FOUND)
        groups = self.optimizer.param_groups
        if p.param_group is not None:
            if not 0 <= p.param_group < len(groups):
                raise CommandError(
                    f"payload.param_group: {p.param_group} is out of range (optimizer has {len(groups)} groups)",
                    ErrorCode.BAD_PAYLOAD,
                )
            targets = [groups[p.param_group]]
        else:
            targets = groups
        changes = {k: getattr(p, k) for k in OPTIMIZER_HPARAMS if getattr(p, k) is not None}
        for key, value in changes.items():
            missing = [i for i, g in enumerate(targets) if key not in g]
            if missing:
                raise CommandError(
                    f"payload.{key}: the optimizer ({type(self.optimizer).__name__}) has no '{key}' setting",
                    ErrorCode.BAD_PAYLOAD,
                )
            if key == "betas":
                if len(value) != 2:
                    raise CommandError("payload.betas: expected two numbers", ErrorCode.BAD_PAYLOAD)
                value = (float(value[0]), float(value[1]))
        for group in targets:
            for key, value in changes.items():
                group[key] = tuple(value) if key == "betas" else value
                if key == "lr" and "initial_lr" in group:
                    group["initial_lr"] = value
        if self.scheduler is not None and "lr" in changes and hasattr(self.scheduler, "base_lrs"):
            self.scheduler.base_lrs = [g.get("initial_lr", g["lr"]) for g in groups]
        if p.grad_clip_norm is not None:
            self.cfg.grad_clip_norm = p.grad_clip_norm if p.grad_clip_norm > 0 else None
        self.mark_state_changed()
        in_force = self.hparams_in_force()
        self.emit("hparams_changed", changes={**changes, **(
            {"grad_clip_norm": self.cfg.grad_clip_norm} if p.grad_clip_norm is not None else {})}, hparams=in_force)
        return in_force

    def hparams_in_force(self) -> dict[str, Any]:
        groups = []
        if self.optimizer is not None:
            for g in self.optimizer.param_groups:
                groups.append({k: (list(g[k]) if k == "betas" else g[k]) for k in OPTIMIZER_HPARAMS if k in g})
        return {"param_groups": groups, "grad_clip_norm": self.cfg.grad_clip_norm}

    def cmd_reset_session(self, p: ResetSession) -> dict[str, Any]:
        self.console.pause({"action": "reset", "reason": p.reason}, checkpoint=False)
        restored = self.restore_baseline()
        if not restored:
            self.log("[reset] no baseline state was captured; weights are unchanged", level="warn")
        self.state.step = 0
        self.state.epoch = 0
        self.state.batch_in_epoch = 0
        self.state.last_val_loss = None
        self.state.last_metrics = {}
        name = self.unique_run_name(p.run_name or self.initial_run_name, dedupe=p.dedupe)
        self.start_new_run(name, parents=[], meta={"kind": "reset", "reason": p.reason},
                           transition=False, emit_new_run=False)
        self.on_dataset_changed(None)
        self.request_reposition()
        self.log(f"[reset] session cleared; '{name}' ready for resume.")
        self.emit("session_reset", run_id=name, display_name=name)
        return {"ok": True, "run_id": name, "display_name": name, "project": self.cfg.project,
                "session_id": self.session_id}

    # ---- information ---------------------------------------------------------------------------
    def _register_info_commands(self, router: CommandRouter) -> None:
        router.register("server_info", self.cmd_server_info, schema=Empty, mutating=False,
                        description="version, capabilities and device")
        router.register("status", self.cmd_status, schema=Empty, mutating=False,
                        description="where the run is")
        router.register("events_since", self.cmd_events_since, schema=EventsSince, mutating=False,
                        description="stored events after an event_seq (paged)")
        router.register("clean_disk", self.cmd_clean_disk, schema=CleanDisk, mutating=True,
                        description="delete earlier sessions' files that this library created")

    def cmd_server_info(self, p: Empty) -> dict[str, Any]:
        return {
            "version": __version__,
            "protocol": 1,
            "capabilities": self.router.names(),
            "device": str(self.resolve_device()),
            "session_id": self.session_id,
            "project": self.cfg.project,
            "run_id": self.cfg.run_name,
            "storage": str(self.storage.folder),
        }

    def cmd_status(self, p: Empty) -> dict[str, Any]:
        st = self.state
        return {
            "run_id": self.cfg.run_name,
            "session_id": self.session_id,
            "project": self.cfg.project,
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
        }

    def cmd_events_since(self, p: EventsSince) -> dict[str, Any]:
        return events_since_page(self.bus.event_log, p.event_seq, p.limit)

    def cmd_clean_disk(self, p: CleanDisk) -> dict[str, Any]:
        root = self.storage.project_dir
        removed: list[str] = []
        failed: list[dict[str, str]] = []
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
                ring = self.ring(run_id)
                for info in ring.list()[:-1]:
                    try:
                        info.path.unlink()
                        removed.append(str(info.path.relative_to(self.storage.folder)))
                    except OSError as exc:
                        failed.append({"path": str(info.path), "error": str(exc)})
        self.log(f"[clean_disk] removed {len(removed)} item(s) under {root}"
                 + (f"; {len(failed)} failed" if failed else ""), level="error" if failed else "info")
        return {"ok": not failed, "root": str(root), "removed": removed, "failed": failed}

    # ---- checkpoints -------------------------------------------------------------------------
    def _register_checkpoint_commands(self, router: CommandRouter) -> None:
        router.register("save_ckpt", self.cmd_save_ckpt, schema=Empty, mutating=True,
                        description="write a ring checkpoint; replies when the file is on disk")
        router.register("load_ckpt", self.cmd_load_ckpt, schema=LoadCkpt, mutating=True,
                        description="load a checkpoint into the live run")
        router.register("list_checkpoints", self.cmd_list_checkpoints, schema=ListCheckpoints, mutating=False,
                        description="checkpoints of a run")

    def cmd_save_ckpt(self, p: Empty) -> Future:
        if self.model is None:
            raise CommandError("no model is bound to the session yet", ErrorCode.NOT_FOUND)
        path, written = self.save_checkpoint()
        step = self.state.step
        reply: Future = Future()

        def _done(f: Future) -> None:
            if f.exception() is not None:
                reply.set_exception(CommandError(f"save_ckpt failed: {f.exception()}"))
            else:
                reply.set_result({"path": path, "step": step, "run_id": self.cfg.run_name})

        written.add_done_callback(_done)
        return reply

    def cmd_load_ckpt(self, p: LoadCkpt) -> dict[str, Any]:
        path = self.storage.resolve_wire_path(p.path, field="path", must_exist=True)
        from ..checkpoints import CheckpointError

        try:
            info = self.load_checkpoint_into_state(path)
        except CheckpointError as exc:
            raise CommandError(str(exc), ErrorCode.FAILED) from exc
        self.emit("checkpoint_loaded", path=str(path), step=info["step"])
        return info

    def cmd_list_checkpoints(self, p: ListCheckpoints) -> dict[str, Any]:
        run_id = p.run_id or self.cfg.run_name
        if run_id not in self.known_runs() and run_id != self.cfg.run_name:
            raise CommandError(f"unknown run {run_id!r}", ErrorCode.NOT_FOUND)
        items = [
            {"path": str(i.path), "step": i.step, "size": i.size, "created": i.created}
            for i in self.ring(run_id).list()
        ]
        return {"run_id": run_id, "checkpoints": items}

    # ---- tests ---------------------------------------------------------------------------------
    def _register_test_commands(self, router: CommandRouter) -> None:
        router.register("test_now", self.cmd_test_now, schema=TestNow, mutating=True,
                        description="run the test loader now and checkpoint")
        router.register("test", self.cmd_test, schema=TestRequest, mutating=True,
                        description="run the test loader inside a pause window")

    def cmd_test_now(self, p: TestNow) -> dict[str, Any]:
        return self.run_labeled_test_and_ckpt(p.label, source="manual")

    def cmd_test(self, p: TestRequest) -> dict[str, Any]:
        request = {"action": "test", "label": p.label, "source": p.source}
        return self.console.pause_window(request, lambda: self.run_labeled_test_and_ckpt(p.label, p.source))

