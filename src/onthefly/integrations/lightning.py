"""Lightning: `attach_lightning`, the callback that marks batch boundaries, and the delegate.

    trainer = L.Trainer(max_epochs=3)
    session = onthefly.attach_lightning(trainer=trainer, model=model, project="demo")
    trainer.fit(model, train_loader, val_loader)      # unchanged

The callback reports each optimizer step from what Lightning already computed (the step's
output loss every step, `trainer.callback_metrics` at Lightning's `log_every_n_steps`; never an
extra forward pass). It calls the session's boundary hook in `on_train_batch_end` once an
optimizer step has completed, so with gradient accumulation the run only pauses where no
gradients are half accumulated. Every mutating command therefore runs on Lightning's training
thread between two optimizer steps.

Tests run Lightning's real `Trainer.test` (so `test_step` and `on_test_end` fire) on a second,
quiet `Trainer` that shares the module: Lightning cannot run `test` from inside `fit`. The
module's trainer, device and train/eval modes, and torch's determinism flags, are restored after.

This module imports Lightning; `import onthefly` never does.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.utilities.model_helpers import is_overridden

from ..checkpoints import CheckpointError, fsync_directory, restore_rng_state
from ..control.channels import Channel
from ..control.errors import CommandError, ErrorCode
from ..data_explorer.batches import batch_size_of
from ..sampler_utils import forward_epoch
from ..session.config import SessionConfig
from ..session.delegate import FrameworkDelegate, TestOutcome
from ..session.external import EXTERNAL_DIAGNOSTICS_EVERY, OnTheFlyExternalSession
from ..telemetry import mean_lr

__all__ = ["LightningDelegate", "OnTheFlyCallback", "attach_lightning", "canonical_metric_name"]

_LOSS_NAMES = {"loss", "train_loss", "training_loss", "train_loss_step", "loss_step"}
_VAL_LOSS_NAMES = {"val_loss", "valid_loss", "validation_loss", "val_loss_epoch"}
_ACCURACY_NAMES = {"acc", "accuracy", "train_acc", "train_accuracy", "acc_step", "train_acc_step",
                   "accuracy_step", "train_accuracy_step"}
_TEST_LOSS_NAMES = ("test_loss", "test_loss_epoch", "loss", "test/loss")


def canonical_metric_name(name: str) -> str:
    """Lightning's logged names mapped onto the dashboard's: loss, val_loss, accuracy (others unchanged)."""
    key = name.lower().replace("/", "_").replace(".", "_").replace("-", "_")
    if key in _LOSS_NAMES:
        return "loss"
    if key in _VAL_LOSS_NAMES:
        return "val_loss"
    if key in _ACCURACY_NAMES:
        return "accuracy"
    return name


def _loss_of(outputs: Any) -> torch.Tensor | None:
    """The loss in a step's output (a tensor, or a dict with "loss"), detached; None if there is none."""
    if isinstance(outputs, torch.Tensor):
        return outputs.detach()
    if isinstance(outputs, Mapping):
        loss = outputs.get("loss")
        if isinstance(loss, torch.Tensor):
            return loss.detach()
    return None


class _TorchFlags:
    """torch's global determinism switches, which constructing a `Trainer` may change."""

    def __init__(self) -> None:
        self.deterministic = torch.are_deterministic_algorithms_enabled()
        self.warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        self.cudnn_deterministic = torch.backends.cudnn.deterministic
        self.cudnn_benchmark = torch.backends.cudnn.benchmark
        self.cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")

    def restore(self) -> None:
        torch.use_deterministic_algorithms(self.deterministic, warn_only=self.warn_only)
        torch.backends.cudnn.deterministic = self.cudnn_deterministic
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        if self.cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = self.cublas


class _TestEvents(Callback):
    """On the test `Trainer`: one `testStep` event per test batch, from the step's own output."""

    def __init__(self) -> None:
        self.session: OnTheFlyExternalSession | None = None
        self.losses: list[torch.Tensor] = []

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.losses = []

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        loss = _loss_of(outputs)
        if loss is None and isinstance(outputs, Mapping):
            loss = _loss_of({"loss": outputs.get("test_loss")})
        if loss is not None:
            self.losses.append(loss.float().mean())
        if self.session is not None:
            self.session.emit("testStep", step=len(self.losses) if loss is not None else batch_idx + 1, loss=loss)

    def mean_loss(self) -> float | None:
        if not self.losses:
            return None
        return float(torch.stack([t.to(self.losses[0].device) for t in self.losses]).mean().item())


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
        self._tester: pl.Trainer | None = None
        self._test_events = _TestEvents()
        self._pending_loader: Any = None
        #: Where Lightning is: "train_start" (before the first batch of a fit) or "batch_end".
        self.hook = "train_start"
        #: (checkpoint or bundle, run) to continue from, loaded before the first batch of the fit.
        self.pending_resume: tuple[Any, str | None] | None = None

    # ---- attach ----------------------------------------------------------------------------
    def attach(self, session: OnTheFlyExternalSession) -> None:
        """Add the callback to the trainer, before any checkpoint callback (which should run last)."""
        super().attach(session)
        self._test_events.session = session
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
        trainer = self.trainer
        if trainer.world_size > 1:
            raise CommandError(
                f"test_now is not supported under the multi-process strategy {type(trainer.strategy).__name__}",
                ErrorCode.FAILED)
        loader, datamodule = self._test_source(module)
        tester = self._test_trainer()
        flags = _TorchFlags()
        modes = [(m, m.training) for m in module.modules()]
        dm_trainer = getattr(datamodule, "trainer", None) if datamodule is not None else None
        try:
            results = tester.test(module, dataloaders=loader, datamodule=datamodule, verbose=False)
        finally:
            module.trainer = trainer
            if datamodule is not None:
                datamodule.trainer = dm_trainer
            module.to(trainer.strategy.root_device)  # the test trainer's teardown moved it to the CPU
            for m, training in modes:
                m.training = training
            flags.restore()
        metrics: dict[str, float] = {}
        for result in results or []:
            for key, value in result.items():
                metrics[key] = float(value)
        avg = next((metrics[k] for k in _TEST_LOSS_NAMES if k in metrics), None)
        if avg is None:
            avg = next((v for k, v in metrics.items() if "loss" in k.lower()), None)
        if avg is None:
            avg = self._test_events.mean_loss()
        return TestOutcome(avg, metrics)

    def _test_source(self, module: pl.LightningModule) -> tuple[Any, Any]:
        """(test loader, datamodule) for `Trainer.test`: an explicit loader, a datamodule's, or the module's hook."""
        if self.test_loader is not None:
            return self.test_loader, None
        dm = self.datamodule if self.datamodule is not None else self.trainer.datamodule
        if dm is not None and is_overridden("test_dataloader", dm):
            return None, dm
        if is_overridden("test_dataloader", module):
            return None, None
        raise CommandError(
            "no test data: pass test_loader= to attach_lightning, or define test_dataloader() on the "
            "module or datamodule", ErrorCode.NOT_FOUND)

    def _test_trainer(self) -> pl.Trainer:
        """A quiet `Trainer` on the same device and precision, built once (flags restored after)."""
        if self._tester is not None:
            return self._tester
        fit = self.trainer
        device = fit.strategy.root_device
        if device.type == "cuda":
            accelerator, devices = "gpu", [device.index or 0]
        else:
            accelerator, devices = device.type, 1
        flags = _TorchFlags()
        options: dict[str, Any] = {}
        if fit.limit_test_batches != 1.0:
            options["limit_test_batches"] = fit.limit_test_batches
        rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        level = rank_zero_log.level
        rank_zero_log.setLevel(logging.WARNING)  # the fit trainer already told the user about devices
        try:
            self._tester = pl.Trainer(
                accelerator=accelerator, devices=devices, precision=fit.precision,
                logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, callbacks=[self._test_events],
                deterministic="warn" if flags.warn_only else flags.deterministic,
                benchmark=flags.cudnn_benchmark, default_root_dir=fit.default_root_dir,
                inference_mode=fit.test_loop.inference_mode, **options,
            )
        finally:
            rank_zero_log.setLevel(level)
            flags.restore()
        return self._tester

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
        fetcher = getattr(fit_loop, "_data_fetcher", None)
        if fetcher is None or fit_loop._combined_loader is None:
            raise CommandError(f"this Lightning version ({pl.__version__}) does not let onthefly reposition "
                               "the training data", ErrorCode.FAILED)
        fit_loop.load_state_dict(state["fit_loop"])
        if self.hook == "batch_end":
            # Loaded at the hook it was saved at: Lightning carries on as the saved run did.
            fit_loop.restarting = False
        else:
            # Before the fit's first batch: the same path as Lightning's own resume from a checkpoint.
            fit_loop.reset()
            fit_loop.epoch_progress.current.completed = fit_loop.epoch_progress.current.processed
        epoch = trainer.current_epoch
        batches = fit_loop.epoch_loop.batch_progress.current.ready
        data = document.get("data") or {}
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
        rng = document.get("rng")
        if rng is not None:
            restore_rng_state(rng)
        session.align_with_framework(trainer.global_step, epoch, batches)


class OnTheFlyCallback(Callback):
    """Reports Lightning's progress to the session and gives it the batch boundaries."""

    def __init__(self, delegate: LightningDelegate) -> None:
        self.delegate = delegate
        self._seen_step = -1
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0
        self._samples = 0
        self._epoch_val: float | None = None
        self._lr: float | None = None
        self._loss_scale = 1
        self._warned_batch_size = False

    @property
    def session(self) -> OnTheFlyExternalSession:
        session = self.delegate.session
        if session is None:
            raise RuntimeError("OnTheFlyCallback is not attached to a session (use onthefly.attach_lightning)")
        return session

    @property
    def state_key(self) -> str:
        return "onthefly"

    # ---- start -------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        session = self.session
        session.bind_runtime(pl_module, list(trainer.optimizers), schedulers, trainer.strategy.root_device)
        session.scaler = trainer.scaler
        # The first epoch's loader iterator is created right after this hook (in Lightning's
        # setup_data): this is the RNG state that epoch's order comes from.
        source = getattr(getattr(trainer.fit_loop, "_data_source", None), "instance", None)
        session.note_epoch_start(trainer.current_epoch,
                                 loader=source if isinstance(source, torch.utils.data.DataLoader) else None)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        session = self.session
        session.configure_loaders(
            train_loader=trainer.train_dataloader if session.train_root_loader is None else None,
            val_loader=trainer.val_dataloaders if session.val_loader is None else None,
        )
        self._seen_step = trainer.global_step
        self._loss_scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        self._reset_accumulation()
        session.record_position(trainer.global_step, trainer.current_epoch)
        self.delegate.hook = "train_start"
        resume, self.delegate.pending_resume = self.delegate.pending_resume, None
        if resume is not None:
            with session.job_context("resume_from"):
                session.resume_from(*resume)
            session.take_reposition()
        session.before_training()
        self.delegate.boundary_hook()  # commands sent before fit run before the first batch
        self.delegate.hook = "batch_end"

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_val = None
        start = self.session.data.epoch_start
        if start is None or start.get("epoch") != trainer.current_epoch:
            # Later epochs open their iterator right after this hook.
            self.session.note_epoch_start(trainer.current_epoch)

    # ---- the hot path --------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """Remember the learning rate this step uses (epoch schedulers step before `on_train_batch_end`)."""
        if self._lr is None or optimizer is self.delegate.session.optimizer:
            groups = optimizer.param_groups
            self._lr = groups[0]["lr"] if len(groups) == 1 else mean_lr(optimizer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = _loss_of(outputs)
        if loss is not None:
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._loss_count += 1
        self._samples += self._batch_samples(batch)
        step = trainer.global_step
        if step == self._seen_step:
            return  # gradients are still being accumulated: not a safe boundary
        self._seen_step = step
        metrics: dict[str, Any] = {}
        if self._loss_sum is not None:
            # Automatic optimization divides each micro-batch loss by accumulate_grad_batches.
            scale = self._loss_scale / self._loss_count
            metrics["loss"] = self._loss_sum if scale == 1 else self._loss_sum * scale
        if self._lr is not None:
            metrics["lr"] = self._lr
        # What the module logged (its latest values) is read only for the steps that are reported.
        self.session.record_step(metrics, step=step, epoch=trainer.current_epoch, batch_in_epoch=batch_idx + 1,
                                 samples=self._samples, more_metrics=lambda: _logged_metrics(trainer))
        self._reset_accumulation()
        self.delegate.boundary_hook()

    def _batch_samples(self, batch: Any) -> int:
        """Samples in a batch, for throughput; a batch without a batch dimension counts as 0."""
        try:
            return batch_size_of(batch)
        except ValueError as exc:
            if not self._warned_batch_size:
                self._warned_batch_size = True
                self.session.log(f"throughput is not reported: {exc}", level="warn")
            return 0

    def _reset_accumulation(self) -> None:
        self._loss_sum, self._loss_count, self._samples, self._lr = None, 0, 0, None

    # ---- validation and epochs -----------------------------------------------------------------
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for name, value in trainer.callback_metrics.items():
            if canonical_metric_name(name) == "val_loss":
                self._epoch_val = float(value)
                self.session.note_validation(self._epoch_val, epoch=trainer.current_epoch)
                return

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.session.end_epoch(self._epoch_val, epoch=trainer.current_epoch)
        if self.delegate.apply_pending_loader():
            # Lightning sets the new loader up (and opens its iterator) before the next epoch's hooks.
            self.session.note_epoch_start(trainer.current_epoch + 1)

    # ---- the end -------------------------------------------------------------------------------
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        session = self.session
        status = "completed" if session.state.running else "stopped"
        if status == "completed" and session.cfg.do_test_after:
            if is_overridden("test_step", pl_module) or session.test_loader is not None:
                session.run_labeled_test_and_ckpt("final", source="auto")
        session.after_training(status)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        session = self.session
        session.serve()
        session.release_loop()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        session = self.session
        status = "stopped" if isinstance(exception, KeyboardInterrupt) else "failed"
        session.after_training(status, exception)
        session.release_loop()

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Tag Lightning's own checkpoints with the run they belong to (plain values only)."""
        session = self.session
        checkpoint["onthefly"] = {
            "project": session.cfg.project, "run_id": session.cfg.run_name, "session_id": session.session_id,
            "step": int(session.state.step), "epoch": int(session.state.epoch),
        }


def _logged_metrics(trainer: pl.Trainer) -> dict[str, Any]:
    """What the module logged this step, under the dashboard's names (device tensors, not read here)."""
    out: dict[str, Any] = {}
    for name, value in trainer.callback_metrics.items():
        key = canonical_metric_name(name)
        if key == "val_loss":
            continue  # reported from the last validation, not per step
        out.setdefault(key, value)
    return out


def attach_lightning(
    *,
    trainer: pl.Trainer,
    model: pl.LightningModule,
    project: str = "default",
    run_name: str = "baseline",
    train_loader: Any = None,
    val_loader: Any = None,
    test_loader: Any = None,
    loss_fn: Callable[..., Any] | None = None,
    do_test_after: bool = False,
    datamodule: Any = None,
    transport: str | None = None,
    save_dir: str | None = None,
    dashboard_port: int | None = None,
    channel: Channel | None = None,
    native_checkpoints: bool = True,
    resume_from: str | os.PathLike | None = None,
    resume_run: str | None = None,
    **settings: Any,
) -> OnTheFlyExternalSession:
    """Connect a Lightning `Trainer` to a dashboard; then call `trainer.fit(model, ...)` as usual.

    Loaders are only needed for the session's own features (tests, subset forks, scans); by
    default they are taken from what `fit` receives. `test_loader` (or a datamodule's or the
    module's `test_dataloader`) is what `test_now` and `do_test_after` run Lightning's `test` on.
    `loss_fn` is used only for modules without a `test_step`. `native_checkpoints` makes
    `save_ckpt` also write a Lightning `.ckpt`. `resume_from` (an onthefly checkpoint written
    under Lightning, or a session bundle; `resume_run` picks the bundle's run) is loaded before
    the first batch, and Lightning's own loop continues from its position: the run continues
    bit-exactly (with `Trainer(deterministic=True)`). Other `SessionConfig` settings may be passed.
    """
    if not isinstance(model, pl.LightningModule):
        raise TypeError(f"model must be a lightning.pytorch.LightningModule, got {type(model).__name__}")
    settings.setdefault("diagnostics_every_n_steps", EXTERNAL_DIAGNOSTICS_EVERY)
    config = SessionConfig(project=project, run_name=run_name, do_test_after=do_test_after, transport=transport,
                           save_dir=save_dir, dashboard_port=dashboard_port, **settings)
    delegate = LightningDelegate(trainer, datamodule=datamodule, test_loader=test_loader,
                                 native_checkpoints=native_checkpoints)
    session = OnTheFlyExternalSession(config, channel=channel, framework=delegate)
    try:
        session.bind_runtime(model)
        session.configure_loss_fn(loss_fn)
        session.configure_loaders(train_loader, val_loader, test_loader, datamodule)
        if resume_from is not None:
            delegate.pending_resume = (resume_from, resume_run)  # Lightning's loop exists once fit starts
    except BaseException:
        session.close()
        raise
    session.close_at_exit()
    return session
