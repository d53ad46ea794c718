"""Checkpoints of the live run: capture, background write, ring per run, load into live state.

The training thread only gathers references (and, when training goes on right away, a host copy);
files are written by the background `CheckpointWriter`. A pause does not even wait for the copy:
it is made in the background while the run is paused, and every job or the resumed loop waits
for the copy (never for the disk) before touching the weights again.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import (
    CheckpointError,
    CheckpointRing,
    CheckpointWriter,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    snapshot_to_host,
)


class CheckpointMixin:
    """Owns `ckpt_writer`, one `CheckpointRing` per run, and the reset baseline."""

    def _init_checkpointing(self) -> None:
        self.ckpt_writer = CheckpointWriter()
        self._rings: dict[str, CheckpointRing] = {}
        self._snapshotter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onthefly-snapshot")
        self._copy_pending: Future | None = None
        self._last_saved: tuple[str, int, int, str, Future] | None = None  # (run, step, version, path, future)
        self._state_version = 0  # bumped whenever weights/optimizer change
        self._baseline: dict[str, Any] | None = None
        self._ckpt_lock = threading.Lock()

    # ---- state capture ----------------------------------------------------------------------
    def ring(self, run_id: str | None = None) -> CheckpointRing:
        run_id = run_id or self.cfg.run_name
        ring = self._rings.get(run_id)
        if ring is None:
            ring = CheckpointRing(self.storage.checkpoint_dir(run_id), keep=self.cfg.ckpt_keep)
            self._rings[run_id] = ring
        return ring

    def capture_state(self) -> dict[str, Any]:
        """References to everything a bit-exact resume needs (cheap: no tensor copies)."""
        st = self.state
        return {
            "model": self.model.state_dict() if self.model is not None else None,
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": int(st.step),
            "epoch": int(st.epoch),
            "batch_in_epoch": int(st.batch_in_epoch),
            "last_val_loss": st.last_val_loss,
            "rng": capture_rng_state(),
            "data": self._data_state(),
            "run": {
                "run_id": self.cfg.run_name,
                "run_gen": self.run_gen,
                "session_id": self.session_id,
                "project": self.cfg.project,
                "subset_indices": list(self.active_subset) if self.active_subset is not None else None,
            },
        }

    def _meta(self, step: int) -> dict[str, Any]:
        return {"run_id": self.cfg.run_name, "step": step, "session_id": self.session_id, "project": self.cfg.project}

    def mark_state_changed(self) -> None:
        """Called after anything that changes weights/optimizer, so an old checkpoint is not reused."""
        self._state_version += 1

    # ---- saving ----------------------------------------------------------------------------
    def save_checkpoint(self, *, background_copy: bool = False) -> tuple[str, Future]:
        """Start writing a ring checkpoint of the current state; returns (path, future of the path).

        With `background_copy` (only while paused) the host copy is made off the training thread
        too; `await_snapshot_copy()` must run before anything mutates the state.
        """
        run_id, step, version = self.cfg.run_name, int(self.state.step), self._state_version
        last = self._last_saved
        if last is not None and last[:3] == (run_id, step, version) and not (
            last[4].done() and last[4].exception() is not None
        ):
            return last[3], last[4]
        ring = self.ring(run_id)
        path = ring.path_for(step)
        refs = self.capture_state()
        meta = self._meta(step)
        if background_copy:
            copy_future = self._snapshotter.submit(snapshot_to_host, refs)
            self._copy_pending = copy_future
            done: Future = Future()

            def _after_copy(f: Future) -> None:
                if f.exception() is not None:
                    done.set_exception(CheckpointError(f"{path}: could not copy state: {f.exception()}"))
                    return
                self._chain(self.ckpt_writer.submit(path, f.result(), meta=meta), done)

            copy_future.add_done_callback(_after_copy)
            future = done
        else:
            future = self.ckpt_writer.submit(path, snapshot_to_host(refs), meta=meta)
        future.add_done_callback(lambda f: self._on_checkpoint_written(ring, path, step, f))
        self._last_saved = (run_id, step, version, str(path), future)
        return str(path), future

    @staticmethod
    def _chain(source: Future, target: Future) -> None:
        def _copy(f: Future) -> None:
            if f.exception() is not None:
                target.set_exception(f.exception())
            else:
                target.set_result(f.result())

        source.add_done_callback(_copy)

    def _on_checkpoint_written(self, ring: CheckpointRing, path: Path, step: int, future: Future) -> None:
        exc = future.exception()
        if exc is not None:
            self.log(f"checkpoint {path} failed: {exc}", level="error")
            return
        ring.register(path)
        self.emit("checkpoint_saved", path=str(path), step=step)

    def await_snapshot_copy(self) -> None:
        """Block until a background host copy (taken at pause) is complete."""
        pending = self._copy_pending
        if pending is not None:
            pending.result()
            self._copy_pending = None

    def checkpoint_for_pause(self) -> str | None:
        if self.model is None:
            return None
        path, _ = self.save_checkpoint(background_copy=True)
        return path

    # ---- loading ---------------------------------------------------------------------------
    def load_checkpoint_into_state(self, path: str | Path, *, restore_rng: bool = True) -> dict[str, Any]:
        """Load a checkpoint (ours or Lightning's) into the live objects; the loop repositions after."""
        self.await_snapshot_copy()
        ckpt = load_checkpoint(path)
        if ckpt.get("format") == "lightning":
            return self._load_lightning_checkpoint(path, ckpt)
        if self.model is None:
            raise CheckpointError(f"{path}: no model is bound to the session yet")
        try:
            self.model.load_state_dict(ckpt["model"], strict=True)
        except (RuntimeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: model weights do not fit this model: {exc}") from exc
        try:
            if self.optimizer is not None and ckpt.get("optimizer") is not None:
                self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.scheduler is not None and ckpt.get("scheduler") is not None:
                self.scheduler.load_state_dict(ckpt["scheduler"])
            if self.scaler is not None and ckpt.get("scaler") is not None:
                self.scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{path}: optimizer/scheduler state does not fit: {exc}") from exc
        st = self.state
        st.step = int(ckpt.get("step", 0))
        st.epoch = int(ckpt.get("epoch", 0))
        st.batch_in_epoch = int(ckpt.get("batch_in_epoch", 0))
        st.last_val_loss = ckpt.get("last_val_loss")
        self._schedule_resume(ckpt.get("data") or {}, ckpt.get("rng") if restore_rng else None)
        self.mark_state_changed()
        self._last_saved = None
        return {"path": str(path), "step": st.step, "epoch": st.epoch, "last_val_loss": st.last_val_loss}

    def _load_lightning_checkpoint(self, path: str | Path, ckpt: dict[str, Any]) -> dict[str, Any]:
        state_dict = ckpt.get("state_dict")
        if not isinstance(state_dict, dict):
            raise CheckpointError(f"{path}: Lightning checkpoint has no 'state_dict'")
        try:
            self.model.load_state_dict(state_dict, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: Lightning weights do not fit this model: {exc}") from exc
        opts = ckpt.get("optimizer_states") or []
        if self.optimizer is not None and opts:
            self.optimizer.load_state_dict(opts[0])
        scheds = ckpt.get("lr_schedulers") or []
        if self.scheduler is not None and scheds:
            self.scheduler.load_state_dict(scheds[0])
        self.state.step = int(ckpt.get("global_step", 0))
        self.state.epoch = int(ckpt.get("epoch", 0))
        self.mark_state_changed()
        self._last_saved = None
        return {"path": str(path), "step": self.state.step, "epoch": self.state.epoch, "last_val_loss": None}

    # ---- reset baseline --------------------------------------------------------------------
    def capture_baseline(self) -> None:
        """Keep a host copy of the state at the start of training, for `reset_session`."""
        if self.model is None:
            return
        self._baseline = snapshot_to_host({
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": capture_rng_state(),
        })

    def restore_baseline(self) -> bool:
        base = self._baseline
        if base is None:
            return False
        self.await_snapshot_copy()
        with torch.no_grad():
            self.model.load_state_dict(base["model"], strict=True)
        if self.optimizer is not None and base["optimizer"] is not None:
            self.optimizer.load_state_dict(base["optimizer"])
        if self.scheduler is not None and base["scheduler"] is not None:
            self.scheduler.load_state_dict(base["scheduler"])
        if self.scaler is not None and base["scaler"] is not None:
            self.scaler.load_state_dict(base["scaler"])
        restore_rng_state(base["rng"])
        self.mark_state_changed()
        self._last_saved = None
        return True

    def close_checkpointing(self, timeout: float | None = 30.0) -> None:
        self._snapshotter.shutdown(wait=True)
        self.ckpt_writer.close(timeout=timeout)
