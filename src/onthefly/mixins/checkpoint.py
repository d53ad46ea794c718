"""Checkpoints of the live run: capture, background write, the ring per run, loading, the reset baseline.

The training thread only gathers references (and, when training goes on right away, a host copy);
files are written by the background `CheckpointWriter`. A pause does not even wait for the copy:
it is made in the background while the run is paused, and every job or the resumed loop waits
for the copy (never for the disk) before touching the weights again.

Commands: `save_ckpt`, `load_ckpt`, `list_checkpoints`.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Optional

import torch

from ..checkpoints import (
    CheckpointError,
    CheckpointRing,
    CheckpointWriter,
    capture_rng_state,
    load_checkpoint,
    read_meta,
    restore_rng_state,
    snapshot_to_host,
)
from ..control.constraints import SafeName
from ..control.errors import CommandError, ErrorCode
from ..ranks import rank_position
from .command import command


@dataclass(frozen=True)
class SavedCheckpoint:
    """The last checkpoint handed to the writer, so an unchanged state is not written twice."""

    run_id: str
    step: int
    version: int
    path: str
    future: Future


@dataclass
class CheckpointState:
    """What CheckpointMixin owns."""

    writer: CheckpointWriter = field(default_factory=CheckpointWriter)
    rings: dict[str, CheckpointRing] = field(default_factory=dict)
    snapshotter: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="onthefly-snapshot"))
    copy_pending: Future | None = None  # a host copy taken at pause, still in flight
    last_saved: SavedCheckpoint | None = None
    version: int = 0  # bumped whenever weights/optimizer change
    baseline: dict[str, Any] | None = None  # host copy of the state at the start of training


@dataclass
class NoPayload:
    """No payload fields (extra keys are ignored)."""


@dataclass
class LoadCkpt:
    path: str = field(default="", metadata={"aliases": ("ckpt", "ckpt_path")})


@dataclass
class ListCheckpoints:
    run_id: Optional[Annotated[str, SafeName]] = field(default=None, metadata={"aliases": ("runId",)})


class CheckpointMixin:
    """Owns `self.checkpoints` (a `CheckpointState`)."""

    def _init_checkpointing(self) -> None:
        self.checkpoints = CheckpointState()

    # ---- state capture ----------------------------------------------------------------------
    def ring(self, run_id: str | None = None) -> CheckpointRing:
        run_id = run_id or self.cfg.run_name
        rings = self.checkpoints.rings
        ring = rings.get(run_id)
        if ring is None:
            ring = rings[run_id] = CheckpointRing(self.storage.checkpoint_dir(run_id), keep=self.cfg.ckpt_keep)
        return ring

    def capture_state(self) -> dict[str, Any]:
        """References to everything a bit-exact resume needs (cheap: no tensor copies)."""
        st = self.state
        state: dict[str, Any] = {
            "model": self.model.state_dict() if self.model is not None else None,
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": int(st.step),
            "epoch": int(st.epoch),
            "batch_in_epoch": int(st.batch_in_epoch),
            "last_val_loss": st.last_val_loss,
            "rng": capture_rng_state(),
            "data": self.data_state(),
            "run": {
                "run_id": self.cfg.run_name,
                "run_gen": self.run_gen,
                "session_id": self.session_id,
                "project": self.cfg.project,
                "subset_indices": list(self.active_subset) if self.active_subset is not None else None,
            },
        }
        layers = self.layer_state()
        if layers is not None:
            state["layers"] = layers  # freezing and dropout set by layer_op (not in state_dict)
        loop = self.loop_settings_state()
        if loop:
            state["loop_settings"] = loop  # grad clipping / accumulation set by set_hparams
        if self.extra_optimizers:
            state["extra_optimizers"] = [o.state_dict() for o in self.extra_optimizers]
        if self.extra_schedulers:
            state["extra_schedulers"] = [s.state_dict() for s in self.extra_schedulers]
        framework = self.framework.capture_state()
        if framework is not None:
            state["framework"] = framework
        return state

    def mark_state_changed(self) -> None:
        """Called after anything that changes weights/optimizer, so an old checkpoint is not reused."""
        self.checkpoints.version += 1

    # ---- saving ----------------------------------------------------------------------------
    def save_checkpoint(self, *, background_copy: bool = False) -> tuple[str, Future]:
        """Start writing a ring checkpoint of the current state; returns (path, future of the path).

        With `background_copy` (only while paused) the host copy is made off the training thread
        too; `await_snapshot_copy()` must run before anything mutates the state.
        """
        ck = self.checkpoints
        run_id, step, version = self.cfg.run_name, int(self.state.step), ck.version
        last = ck.last_saved
        group = self.ranks
        # (In a distributed run every rank must decide alike, so a failed write is not retried here.)
        if last is not None and (last.run_id, last.step, last.version) == (run_id, step, version) and not (
            group is None and last.future.done() and last.future.exception() is not None
        ):
            return last.path, last.future
        ring = self.ring(run_id)
        path = ring.path_for(step)
        refs = self.capture_state()
        if group is not None:
            # One file for the job (rank 0 writes it), with every rank's RNG and data position in it.
            states = group.all_gather({"rng": refs["rng"], "data": refs["data"]},
                                      what="collecting every rank's RNG for a checkpoint")
            refs["ranks"] = {"world": group.world, "states": states}
            if not group.leader:
                future: Future = Future()
                future.set_result(str(path))
                ck.last_saved = SavedCheckpoint(run_id, step, version, str(path), future)
                return str(path), future
        meta = {"run_id": run_id, "step": step, "session_id": self.session_id, "project": self.cfg.project}
        if background_copy:
            copy_future = ck.snapshotter.submit(snapshot_to_host, refs)
            ck.copy_pending = copy_future
            done: Future = Future()

            def after_copy(f: Future) -> None:
                if f.exception() is not None:
                    done.set_exception(CheckpointError(path, f"could not copy the state: {f.exception()}"))
                    return
                chain(ck.writer.submit(path, f.result(), meta=meta), done)

            copy_future.add_done_callback(after_copy)
            future = done
        else:
            future = ck.writer.submit(path, snapshot_to_host(refs), meta=meta)
        future.add_done_callback(lambda f: self._checkpoint_written(ring, path, step, f))
        ck.last_saved = SavedCheckpoint(run_id, step, version, str(path), future)
        return str(path), future

    def _checkpoint_written(self, ring: CheckpointRing, path: Path, step: int, future: Future) -> None:
        exc = future.exception()
        if exc is not None:
            self.log(f"checkpoint {path} failed: {exc}", level="error")
            return
        ring.register(path)
        self.emit("checkpoint_saved", path=str(path), step=step)

    def save_checkpoint_now(self, timeout: float = 600.0) -> str | None:
        """Write a checkpoint of the current state and wait until it is on disk (None: no model)."""
        if self.model is None:
            return None
        path, written = self.save_checkpoint()
        written.result(timeout=timeout)
        if self.ranks is not None:
            self.ranks.barrier("waiting for rank 0 to write a checkpoint")  # every rank may read it next
        return path

    def await_snapshot_copy(self) -> None:
        """Block until a background host copy (taken at pause) is complete."""
        pending = self.checkpoints.copy_pending
        if pending is not None:
            pending.result()
            self.checkpoints.copy_pending = None

    def checkpoint_for_pause(self) -> str | None:
        """The pause window's checkpoint: written in the background while the run is held."""
        if self.model is None:
            return None
        path, _ = self.save_checkpoint(background_copy=True)
        return path

    def pending_write(self, path: str | None) -> Future | None:
        """The write in flight (or done) for `path`, if it is the last checkpoint handed to the writer."""
        last = self.checkpoints.last_saved
        if path is None or last is None or last.path != path:
            return None
        return last.future

    # ---- loading ---------------------------------------------------------------------------
    def wire_checkpoint(self, value: str, field: str) -> Path:
        """A checkpoint path from the wire: any readable file that holds a checkpoint we can load.

        Reads are allowed anywhere (loading is weights-only); a file that is not a checkpoint —
        or holds objects onthefly will not unpickle — is `bad_payload` naming the field. A folder is
        a framework's native checkpoint (e.g. a Hugging Face checkpoint folder), for the runtimes
        that have one.
        """
        if isinstance(value, str) and Path(value).expanduser().is_dir() and self.framework.native_folders:
            return Path(value).expanduser().resolve()
        path = self.storage.resolve_read_path(value, field)
        try:
            read_meta(path)
        except CheckpointError as exc:
            raise CommandError(f"{field}: {exc}", ErrorCode.BAD_PAYLOAD) from exc
        return path

    def load_checkpoint_into_state(self, path: str | Path, *, restore_rng: bool = True,
                                   position: bool = True) -> dict[str, Any]:
        """Load a checkpoint into the live objects; the loop repositions after (same step, same batch).

        With `position=False` (a rollback) only the weights, optimizers and scaler are restored:
        the run keeps its step, data position, scheduler and RNG, and training goes on from there.
        """
        self.await_snapshot_copy()
        if Path(path).is_dir():  # a framework's native checkpoint folder
            info = self.framework.load_native_checkpoint(Path(path), {"format": "folder"})
            if info is None:
                raise CheckpointError(path, f"is a folder; the {self.framework.runtime} runtime has no "
                                            "checkpoint folders")
            self.mark_state_changed()
            self.request_reposition()
            return info
        document = load_checkpoint(path)
        if not position and document.get("format") == "lightning":
            raise CheckpointError(path, "is a Lightning checkpoint; a rollback restores onthefly checkpoints only")
        if document.get("format") == "lightning":
            info = self.framework.load_native_checkpoint(Path(path), document)
            if info is None:
                raise CheckpointError(path, "is a Lightning checkpoint; only a Lightning session "
                                            "(attach_lightning) can load it")
            self.mark_state_changed()
            self.request_reposition()
            return info
        if self.model is None:
            raise CheckpointError(path, "no model is bound to the session yet")
        try:
            self.model.load_state_dict(document["model"], strict=True)
        except (RuntimeError, KeyError, TypeError) as exc:
            raise CheckpointError(path, f"model weights do not fit this model: {exc}") from exc
        pairs = [
            ([self.optimizer] if self.optimizer is not None else [], [document.get("optimizer")]),
            ([self.scheduler] if self.scheduler is not None and position else [], [document.get("scheduler")]),
            ([self.scaler] if self.scaler is not None else [], [document.get("scaler")]),
            (self.extra_optimizers, document.get("extra_optimizers") or []),
            (self.extra_schedulers if position else [], document.get("extra_schedulers") or []),
        ]
        try:
            for objects, states in pairs:
                for obj, state in zip(objects, states):
                    if state is not None:
                        obj.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(path, f"optimizer/scheduler state does not fit: {exc}") from exc
        if not position:
            self.mark_state_changed()
            return {"path": str(path), "step": int(document.get("step", 0)), "epoch": int(document.get("epoch", 0))}
        self.restore_layer_state(document.get("layers"))
        self.restore_loop_settings(document.get("loop_settings"))
        st = self.state
        st.step = int(document.get("step", 0))
        st.epoch = int(document.get("epoch", 0))
        st.batch_in_epoch = int(document.get("batch_in_epoch", 0))
        st.last_val_loss = document.get("last_val_loss")
        self.mark_state_changed()
        data, rng = rank_position(document)
        self.schedule_resume(data, rng if restore_rng else None)
        self.framework.restore_state(document.get("framework"), document)
        return {"path": str(path), "step": st.step, "epoch": st.epoch, "last_val_loss": st.last_val_loss}

    # ---- reset baseline --------------------------------------------------------------------
    def capture_baseline(self) -> None:
        """Keep a host copy of the state at the start of training, for `reset_session`."""
        if self.model is None:
            return
        self.checkpoints.baseline = snapshot_to_host({
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": capture_rng_state(),
        })

    @property
    def has_baseline(self) -> bool:
        return self.checkpoints.baseline is not None

    def restore_baseline(self) -> bool:
        base = self.checkpoints.baseline
        if base is None:
            return False
        self.await_snapshot_copy()
        with torch.no_grad():
            self.model.load_state_dict(base["model"], strict=True)
        for obj, state in ((self.optimizer, base["optimizer"]), (self.scheduler, base["scheduler"]),
                           (self.scaler, base["scaler"])):
            if obj is not None and state is not None:
                obj.load_state_dict(state)
        restore_rng_state(base["rng"])
        self.mark_state_changed()
        return True

    def close_checkpointing(self, timeout: float | None = 30.0) -> None:
        self.checkpoints.snapshotter.shutdown(wait=True)
        self.checkpoints.writer.close(timeout=timeout)

    # ---- commands ----------------------------------------------------------------------------
    @command("save_ckpt", NoPayload, mutating=True,
             description="write a ring checkpoint; replies when the file is on disk")
    def cmd_save_ckpt(self, p: NoPayload) -> Future:
        if self.model is None:
            raise CommandError("no model is bound to the session yet", ErrorCode.NOT_FOUND)
        path, written = self.save_checkpoint()
        step, run_id = self.state.step, self.cfg.run_name
        native = self.framework.save_native_checkpoint(self.native_checkpoint_path(step))
        reply: Future = Future()

        def done(f: Future) -> None:
            if f.exception() is not None:
                reply.set_exception(CommandError(f"save_ckpt failed: {f.exception()}"))
                return
            data = {"path": path, "step": step, "run_id": run_id}
            if native is not None:
                data["native_path"] = str(native)
            reply.set_result(data)

        written.add_done_callback(done)
        return reply

    def native_checkpoint_path(self, step: int) -> Path:
        """Where a framework-native checkpoint of `step` goes: `runs/<run>/native/step-<N>.ckpt`."""
        return self.storage.run_dir(self.cfg.run_name) / "native" / f"step-{int(step):08d}.ckpt"

    @command("load_ckpt", LoadCkpt, mutating=True, description="load a checkpoint into the live run")
    def cmd_load_ckpt(self, p: LoadCkpt) -> dict[str, Any]:
        path = self.wire_checkpoint(p.path, "payload.path")
        info = self.load_checkpoint_into_state(path)
        self.emit("checkpoint_loaded", path=str(path), step=info["step"])
        return info

    @command("list_checkpoints", ListCheckpoints, mutating=False, description="checkpoints of a run")
    def cmd_list_checkpoints(self, p: ListCheckpoints) -> dict[str, Any]:
        run_id = p.run_id or self.cfg.run_name
        if run_id not in self.known_runs() and run_id != self.cfg.run_name:
            raise CommandError(f"unknown run {run_id!r}", ErrorCode.NOT_FOUND)
        items = [{"path": str(i.path), "step": i.step, "size": i.size, "created": i.created}
                 for i in self.ring(run_id).list()]
        return {"run_id": run_id, "checkpoints": items}


def chain(source: Future, target: Future) -> None:
    """Complete `target` with `source`'s result or exception when `source` is done."""

    def copy(f: Future) -> None:
        if f.exception() is not None:
            target.set_exception(f.exception())
        else:
            target.set_result(f.result())

    source.add_done_callback(copy)
