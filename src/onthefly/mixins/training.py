"""The native training loop, written out top to bottom so a user could copy it.

Per batch the loop does exactly: one attribute read (`gate.pending`; in a distributed run also a
modulo of the step), fetch, the training step, and a small dict handed to the event queue. Metrics stay on the device; the writer thread reads
them when it encodes the event, so the training thread never waits on a host sync for telemetry.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable, Iterator

import torch

from ..data_explorer import batch_size_of, move_to_device
from ..telemetry import mean_lr

StepFn = Callable[[Any], dict[str, Any]]
#: Keys of a step's metrics that are the loop's own bookkeeping, never reported.
PRIVATE_METRICS = ("_outputs",)


class TrainingMixin:
    """`train()`: epochs and steps, validation, the end-of-run test, commands at every boundary."""

    custom_step: Callable[[Any, SimpleNamespace], Any] | None = None

    # ---- the loop ----------------------------------------------------------------------------
    def train(self) -> str:
        """Run training to the end (or until stopped); returns the final status."""
        self.before_training()
        status, error = "completed", None
        try:
            self._run_epochs()
            if not self.state.running:
                status = "stopped"
            elif self.cfg.do_test_after and self.test_loader is not None:
                self.run_labeled_test_and_ckpt("final", source="auto")
        except KeyboardInterrupt:
            status, error = "stopped", "KeyboardInterrupt"
            raise
        except BaseException as exc:
            status, error = "failed", exc
            raise
        finally:
            self.after_training(status, error)
        return status

    def _training_done(self) -> bool:
        """The run's limits: max_epochs / max_steps of this run, or a fork's budget (which replaces them)."""
        cfg, st = self.cfg, self.state
        if not st.running or self.lifecycle.finish_requested is not None:
            return True
        if self.forks.budget is not None:
            return False
        if cfg.max_epochs is not None and st.epoch >= cfg.max_epochs:
            return True
        return cfg.max_steps is not None and st.step - st.run_start_step >= cfg.max_steps

    def _run_epochs(self) -> None:
        st = self.state
        self._step_fn = self._make_step_fn()
        while not self._training_done():
            self.take_reposition()
            if st.batch_in_epoch == 0:
                self.log(f"epoch {st.epoch}", phase="train")
            self.model.train()
            iterator = self.open_epoch_iterator(self.train_loader, st.epoch, st.batch_in_epoch)
            finished = self._run_batches(iterator)
            if self.reposition_pending:
                self.telemetry.restart(st.step)  # a command moved the run to another step
                continue
            if not finished:
                break
            self._end_epoch()

    def _run_batches(self, iterator: Iterator[Any]) -> bool:
        """Train until the iterator ends (True) or the run ends / must reposition (False)."""
        gate, st, cfg = self.gate, self.state, self.cfg
        checkpoints = self.checkpoints
        step_fn = self._step_fn
        ckpt_every = cfg.ckpt_every_steps
        ranks = self.ranks  # a distributed run agrees every few steps (RankGroup.due), else nothing per step
        while True:
            if gate.pending or (ranks is not None and ranks.due(st.step, gate.paused)):
                self.at_boundary()
                if self.reposition_pending or self._training_done():
                    return False
            try:
                batch = next(iterator)
            except StopIteration:
                return True
            metrics = step_fn(batch)
            st.step += 1
            st.batch_in_epoch += 1
            checkpoints.version += 1
            if self.scheduler is not None and cfg.scheduler_interval == "step":
                self.scheduler.step()
            self._record_step(metrics, batch)
            if self.dynamics.schedule is not None:
                self.maybe_record_dynamics(epoch_end=False, epoch=st.epoch)
            if self.forks.budget is not None:
                self.check_fork_budget()
            if self.lifecycle.scheduled_pause is not None:
                self.check_scheduled_pause()
            if ckpt_every and st.step % ckpt_every == 0:
                self.save_checkpoint()
            if self._training_done():
                return st.running and self._epoch_complete()  # a limit reached on an epoch's last batch closes it

    def _epoch_complete(self) -> bool:
        """Whether the batch just trained was the last one of the epoch (for a loader with a length)."""
        try:
            return self.state.batch_in_epoch >= len(self.train_loader)
        except TypeError:
            return False

    def _end_epoch(self) -> None:
        self.report_unreported_steps()
        st, cfg = self.state, self.cfg
        val_loss = None
        if self.val_loader is not None and (st.epoch + 1) % cfg.val_every_n_epochs == 0:
            val_loss = self.mean_loss(self.val_loader)
            st.last_val_loss = val_loss
            self.log(f"epoch {st.epoch} val_loss = {val_loss}", phase="train")
        self.emit("epoch_end", epoch=st.epoch, val_loss=val_loss)
        self.maybe_record_dynamics(epoch_end=True, epoch=st.epoch)
        if self.scheduler is not None and cfg.scheduler_interval == "epoch":
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                if val_loss is not None:
                    self.scheduler.step(val_loss)
            else:
                self.scheduler.step()
        st.epoch += 1
        st.batch_in_epoch = 0
        self.note_fork_validation(val_loss)

    def validate(self) -> float | None:
        """Average loss over the validation loader (one host sync, at the end)."""
        return self.mean_loss(self.val_loader)

    # ---- one step ----------------------------------------------------------------------------
    def training_module(self) -> torch.nn.Module:
        """What a training step calls: the DDP wrapper the user passed (gradients sync), else the model."""
        return self.train_module if self.train_module is not None else self.model

    def _to_device(self, batch: Any) -> Any:
        return batch if self.device.type == "cpu" else move_to_device(batch, self.device)

    def _make_step_fn(self) -> StepFn:
        if self.custom_step is None:
            return self.default_step
        user_fn = self.custom_step
        state = SimpleNamespace(model=self.training_module(), optimizer=self.optimizer, loss_fn=self.loss_fn,
                                device=self.device, autocast=self.autocast_context, scaler=self.scaler,
                                scheduler=self.scheduler, session=self)

        def step(batch: Any) -> dict[str, Any]:
            state.model, state.optimizer, state.loss_fn = self.training_module(), self.optimizer, self.loss_fn
            out = user_fn(self._to_device(batch), state)
            if isinstance(out, dict):
                return dict(out)
            if torch.is_tensor(out):
                return {"loss": out.detach()}
            raise TypeError(f"training_step must return a dict of metrics or a loss tensor, got {type(out).__name__}")

        return step

    def default_step(self, batch: Any) -> dict[str, Any]:
        """zero_grad, forward under autocast, loss, backward (scaled), clip, optimizer step."""
        batch = self._to_device(batch)
        model, optimizer, scaler = self.training_module(), self.optimizer, self.scaler
        optimizer.zero_grad(set_to_none=True)
        with self.autocast_context():
            if isinstance(batch, (tuple, list)) and len(batch) == 2 and torch.is_tensor(batch[0]):
                outputs = model(batch[0])
                loss = self.loss_fn(outputs, batch[1])
            else:
                outputs, loss = None, self.batch_loss(batch, model)
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        grad_norm = None
        clip = self.cfg.grad_clip_norm
        if clip:
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        return {"loss": loss.detach(), "grad_norm": grad_norm, "_outputs": outputs}

    # ---- telemetry ---------------------------------------------------------------------------
    def _record_step(self, metrics: dict[str, Any], batch: Any) -> None:
        st, telemetry = self.state, self.telemetry
        if isinstance(batch, (tuple, list)) and batch and torch.is_tensor(batch[0]):
            samples = batch[0].shape[0] if batch[0].dim() else 1
        else:
            samples = batch_size_of(batch)
        step = st.step
        if not telemetry.count(step, samples, metrics.get("loss")):
            return
        outputs = metrics.get("_outputs")
        fields = telemetry.fields(step, st.epoch, st.last_val_loss, loss=metrics.get("loss"),
                                  accuracy=metrics.get("accuracy"), lr=mean_lr(self.optimizer),
                                  grad_norm=metrics.get("grad_norm"))
        if telemetry.diagnostics_due(step):
            targets = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
            telemetry.add_diagnostics(fields, self.model, self.resolve_device(), outputs, targets)
        for key, value in metrics.items():
            if key not in fields and key not in PRIVATE_METRICS:
                fields[key] = value
        st.last_metrics = fields
        self.bus.emit("trainStep", fields)
