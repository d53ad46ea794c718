"""LightningDelegate: the session's requests translated into Lightning, including repositioning
Lightning's own loop after a checkpoint load."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.model_helpers import is_overridden

from ...checkpoints import CheckpointError, fsync_directory, restore_rng_state
from ...control.errors import CommandError, ErrorCode
from ...ranks import rank_position
from ...sampler_utils import forward_epoch
from ...session.delegate import FrameworkDelegate, TestOutcome
from ...session.external import OnTheFlyExternalSession
from .callback import OnTheFlyCallback
from .testing import LightningTester


class LightningDelegate(FrameworkDelegate):
    """Translates session requests into Lightning: stop, test, checkpoints, a new train loader,
    and repositioning Lightning's own loop after a checkpoint load."""

    runtime = "lightning"

    def __init__(self, trainer: pl.Trainer, *, datamodule: Any = None, test_loader: Any = None,
                 native_checkpoints: bool = True) -> None:
        if not isinstance(trainer, pl.Trainer):
            raise TypeError(
                f"attach_lightning needs a lightning.pytorch.Trainer, got {type(trainer).__module__}."
                f"{type(trainer).__qualname__} (the separate 'pytorch_lightning' package is not supported)"
            )
        self.trainer = trainer
        self.datamodule = datamodule
        self.test_loader = test_loader
        self.native_checkpoints = native_checkpoints
        self.callback = OnTheFlyCallback(self)
        self.tester = LightningTester(trainer, datamodule=datamodule, test_loader=test_loader)
        self._pending_loader: Any = None
        #: Where Lightning is: "train_start" (before the first batch of a fit) or "batch_end".
        self.hook = "train_start"
        #: (checkpoint or bundle, run) to continue from, loaded before the first batch of the fit.
        self.pending_resume: tuple[Any, str | None] | None = None

    # ---- attach ----------------------------------------------------------------------------
    def attach(self, session: OnTheFlyExternalSession) -> None:
        """Add the callback to the trainer, before any checkpoint callback (which should run last)."""
        super().attach(session)
        self.tester.events.session = session
        callbacks = self.trainer.callbacks
        if any(cb is self.callback for cb in callbacks):
            return
        position = next((i for i, cb in enumerate(callbacks) if isinstance(cb, Checkpoint)), len(callbacks))
        callbacks.insert(position, self.callback)

    @property
    def module(self) -> pl.LightningModule:
        module = self.trainer.lightning_module
        if module is None:
            raise CommandError("the Lightning trainer has no module yet (fit() has not started)", ErrorCode.NOT_FOUND)
        return module

    # ---- stop --------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Lightning ends `fit` after the current batch once `should_stop` is set."""
        self.trainer.should_stop = True

    # ---- data --------------------------------------------------------------------------------
    def refresh_train_loader(self, loader: Any) -> None:
        """Lightning iterates its own copy of the loader: switch to `loader` from the next epoch."""
        fit_loop = self.trainer.fit_loop
        source = getattr(fit_loop, "_data_source", None)
        if source is None or not hasattr(source, "instance") or not hasattr(fit_loop, "_combined_loader"):
            raise CommandError(
                f"this Lightning version ({pl.__version__}) does not let onthefly swap the train loader "
                "during fit", ErrorCode.FAILED)
        if fit_loop._combined_loader is None or loader is fit_loop._data_source.instance:
            return
        self._pending_loader = loader
        if self.session is not None:
            self.session.log("[data] the new train loader takes effect at the next epoch")

    def apply_pending_loader(self) -> bool:
        """At an epoch end: make Lightning set its train data up again from the new loader (True if it did)."""
        loader, self._pending_loader = self._pending_loader, None
        if loader is None:
            return False
        fit_loop = self.trainer.fit_loop
        fetcher = getattr(fit_loop, "_data_fetcher", None)
        if fetcher is not None:
            fetcher.teardown()  # stop the old loader's workers now rather than at garbage collection
            fit_loop._data_fetcher = None
        fit_loop._data_source.instance = loader
        fit_loop._combined_loader = None
        return True

    # ---- loop settings (set_hparams) ---------------------------------------------------------
    def loop_settings(self) -> dict[str, Any]:
        """Lightning's own `gradient_clip_val` (clipping by norm) and `accumulate_grad_batches`.

        Both apply to automatic optimization only; a module that steps its optimizers itself has none.
        """
        trainer = self.trainer
        module = trainer.lightning_module or (self.session.model if self.session is not None else None)
        if module is None or not getattr(module, "automatic_optimization", True):
            return {}
        settings: dict[str, Any] = {"accumulate_grad_batches": int(trainer.accumulate_grad_batches)}
        algorithm = trainer.gradient_clip_algorithm
        if algorithm is None or str(getattr(algorithm, "value", algorithm)) == "norm":
            settings["grad_clip_norm"] = trainer.gradient_clip_val or None
        return settings

    def apply_loop_settings(self, changes: dict[str, Any]) -> None:
        """Set them on the trainer: Lightning reads both at every batch (the callback rescales its loss)."""
        if "grad_clip_norm" in changes:
            self.trainer.gradient_clip_val = changes["grad_clip_norm"]
        if "accumulate_grad_batches" in changes:
            self.trainer.accumulate_grad_batches = int(changes["accumulate_grad_batches"])
            self.callback.note_accumulation(self.trainer)

    # ---- tests -------------------------------------------------------------------------------
    def has_own_test(self) -> bool:
        module = self.trainer.lightning_module or (self.session.model if self.session is not None else None)
        return module is not None and is_overridden("test_step", module)

    def reports_validation(self) -> bool:
        module = self.trainer.lightning_module or (self.session.model if self.session is not None else None)
        return module is not None and is_overridden("validation_step", module) and self.trainer.limit_val_batches != 0

    def run_test(self, label: str) -> TestOutcome | None:
        """Lightning's real `Trainer.test` on the module (None if it defines no `test_step`)."""
        module = self.module
        if not is_overridden("test_step", module):
            return None
        return self.tester.run(module)

    # ---- checkpoints -------------------------------------------------------------------------
    def save_native_checkpoint(self, path: Path) -> Path | None:
        """`Trainer.save_checkpoint` into a temp file beside `path`, fsync, rename (it is not atomic itself)."""
        if not self.native_checkpoints:
            return None
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            self.trainer.save_checkpoint(temp)
            with open(temp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(temp, path)
            fsync_directory(path.parent)
        except BaseException:
            if temp.exists():
                temp.unlink()
            raise
        return path

    def load_native_checkpoint(self, path: Path, document: dict[str, Any]) -> dict[str, Any] | None:
        """Restore a Lightning `.ckpt`: weights, every optimizer and scheduler, precision state, step.

        Lightning's own loop is not moved (its counters stay; the session counts from the
        checkpoint's step); onthefly checkpoints written under Lightning reposition it exactly.
        """
        module, trainer = self.module, self.trainer
        state_dict = document.get("state_dict")
        if not isinstance(state_dict, dict):
            raise CheckpointError(path, "Lightning checkpoint has no 'state_dict'")
        module.on_load_checkpoint(document)
        try:
            module.load_state_dict(state_dict, strict=module.strict_loading)
        except RuntimeError as exc:
            raise CheckpointError(path, f"Lightning weights do not fit this module: {exc}") from exc
        try:
            for optimizer, state in zip(trainer.optimizers, document.get("optimizer_states") or []):
                optimizer.load_state_dict(state)
            for config, state in zip(trainer.lr_scheduler_configs, document.get("lr_schedulers") or []):
                config.scheduler.load_state_dict(state)
            precision_key = type(trainer.precision_plugin).__qualname__
            if precision_key in document:
                trainer.precision_plugin.load_state_dict(document[precision_key])
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(path, f"optimizer/scheduler state does not fit: {exc}") from exc
        session = self.session
        step, epoch = int(document.get("global_step", 0)), int(document.get("epoch", 0))
        if session is not None:
            session.state.step, session.state.epoch, session.state.batch_in_epoch = step, epoch, 0
        return {"path": str(path), "step": step, "epoch": epoch, "last_val_loss": None}

    # ---- Lightning's loop position in onthefly checkpoints -----------------------------------
    @staticmethod
    def _restart_finishing_the_saved_batch(fit_loop: Any) -> None:
        """Lightning's own restart (`fit_loop.reset()`), made to go on the way the saved run did.

        A checkpoint from `on_train_batch_end` restarts, in Lightning, past what followed that hook:
        the validation due after the batch is skipped and, at an epoch's last batch, so is the
        epoch's end (the loop moves to the next epoch). The saved run did both, and validation draws
        from the global RNG, so every later batch would differ. Marking the batch complete makes the
        epoch loop restart "on the last batch"; marking the due validation as begun (only while
        `reset()` reads the restart stage) makes it run that validation, its path for a validation
        interrupted midway, and then end the epoch as usual.
        """
        epoch_loop = fit_loop.epoch_loop
        batches = epoch_loop.batch_progress
        val = epoch_loop.val_loop.batch_progress
        val_due = epoch_loop._should_check_val_fx(fit_loop._data_fetcher)
        if val_due:
            val.current.reset()  # the due validation starts from its first batch
            val.total.ready = val.total.started = val.total.completed + 1
            val.total.processed = val.total.completed
        elif batches.is_last_batch and not epoch_loop._should_accumulate():
            # No hook of the saved batch is left to run; its count of stepped batches is.
            epoch_loop._batches_that_stepped += 1
        if val_due or batches.is_last_batch:
            batches.total.completed = batches.total.processed
            batches.current.completed = batches.current.processed
        # (mid-epoch with nothing due: Lightning's own restart continues exactly, unchanged)
        fit_loop.reset()
        if val_due:
            val.total.ready = val.total.started = val.total.completed

    def capture_state(self) -> dict[str, Any] | None:
        """Lightning's loop progress (its own `fit_loop.state_dict()`) and the precision plugin's state."""
        trainer = self.trainer
        if trainer.lightning_module is None or not trainer.training:
            return None
        state: dict[str, Any] = {"fit_loop": trainer.fit_loop.state_dict(), "hook": self.hook}
        precision = trainer.precision_plugin.state_dict()
        if precision:
            state["precision"] = precision
        return state

    def restore_state(self, state: dict[str, Any] | None, document: dict[str, Any]) -> None:
        """Move Lightning's loop to the checkpoint's position: its counters, then its data stream.

        Lightning's counters come from the checkpoint's `fit_loop` state; the data fetcher is then
        re-opened on the checkpoint's epoch with that epoch's starting RNG and fast-forwarded past
        the batches already trained on, so the next batch is the one the saved run trained next.
        When the load installed another train loader (the checkpoint's sampling plan), Lightning's
        data is set up on it first.
        Without Lightning state in the checkpoint (saved by another runtime) only weights and
        optimizers move; the session then counts from the checkpoint's step.
        """
        session = self.session
        trainer = self.trainer
        if session is None or state is None or trainer.lightning_module is None:
            return
        if state.get("hook") != "batch_end":
            session.log("[resume] the checkpoint was taken before its fit's first batch; Lightning's loop "
                        "is not moved", level="warn")
            return
        if "precision" in state:
            trainer.precision_plugin.load_state_dict(state["precision"])
        fit_loop = trainer.fit_loop
        if self._pending_loader is not None and getattr(fit_loop, "_combined_loader", None) is not None:
            # The checkpoint trained on another loader (its sampling plan): set Lightning's data up on it now.
            running = fit_loop._data_fetcher  # a running epoch loop holds this very object: keep it
            self.apply_pending_loader()
            fit_loop.setup_data()
            if running is not None:
                fresh, fit_loop._data_fetcher = fit_loop._data_fetcher, running
                if fresh is not None:
                    fresh.teardown()
                running.setup(fit_loop._combined_loader)
        fetcher = getattr(fit_loop, "_data_fetcher", None)
        if fetcher is None or fit_loop._combined_loader is None:
            raise CommandError(f"this Lightning version ({pl.__version__}) does not let onthefly reposition "
                               "the training data", ErrorCode.FAILED)
        fit_loop.load_state_dict(state["fit_loop"])
        if self.hook == "batch_end":
            # Loaded at the hook it was saved at: Lightning carries on as the saved run did.
            fit_loop.restarting = False
        else:
            # Before the fit's first batch: the same path as Lightning's own resume from a checkpoint,
            # except that what the saved run still did after its batch is done rather than skipped.
            self._restart_finishing_the_saved_batch(fit_loop)
            fit_loop.epoch_progress.current.completed = fit_loop.epoch_progress.current.processed
            # Lightning skips a restarted epoch's plateau-scheduler step; the saved run took it.
            fit_loop._restarting = False
        epoch = trainer.current_epoch
        batches = fit_loop.epoch_loop.batch_progress.current.ready
        data, rng = rank_position(document)  # this rank's own, in a distributed run
        start = data.get("epoch_start")
        if start is not None and start.get("epoch") == epoch:
            restore_rng_state(start["rng"])
            if start.get("generator") is not None:
                for loader in fit_loop._combined_loader.flattened:
                    generator = getattr(loader, "generator", None)
                    if isinstance(generator, torch.Generator):
                        generator.set_state(start["generator"])
        else:
            session.log(f"[resume] the checkpoint does not record how epoch {epoch} began; its remaining "
                        "batches come in this run's order", level="warn")
        for loader in fit_loop._combined_loader.flattened:
            if isinstance(loader, torch.utils.data.DataLoader):
                forward_epoch(loader, epoch)
        self._pending_loader = None
        iter(fetcher)
        for _ in range(batches):
            next(fetcher.iterator)
        if self.hook == "batch_end":
            fetcher.fetched = batches
            fetcher.done = fetcher.length is not None and batches >= fetcher.length
        session.note_epoch_start(epoch, start)
        session.discard_resume()
        if rng is not None:
            restore_rng_state(rng)
        session.align_with_framework(trainer.global_step, epoch, batches)
