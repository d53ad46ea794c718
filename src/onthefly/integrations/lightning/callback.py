"""OnTheFlyCallback: reports Lightning's progress to the session and gives it the batch boundaries."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden

from ...data_explorer.batches import batch_size_of
from ...session.external import OnTheFlyExternalSession
from ...telemetry import mean_lr
from .metrics import canonical_metric_name, logged_metrics, loss_of

if TYPE_CHECKING:
    from .delegate import LightningDelegate


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
        loss = loss_of(outputs)
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
                                 samples=self._samples, more_metrics=lambda: logged_metrics(trainer))
        self._reset_accumulation()
        self.delegate.boundary_hook()

    def note_accumulation(self, trainer: pl.Trainer) -> None:
        """`accumulate_grad_batches` changed: reported losses undo Lightning's new loss scaling."""
        module = trainer.lightning_module
        self._loss_scale = trainer.accumulate_grad_batches if module is not None and module.automatic_optimization else 1

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
