"""HFCallback: reports the Trainer's progress to the session and gives it the batch boundaries.

The boundary is `on_step_end`, right after HF's optimizer step (and `on_train_begin`, before
the first batch): with gradient accumulation HF calls it once per accumulation, so the run only
pauses where no gradients are half accumulated. Metrics come from what HF already computed: the
step's loss is the growth of the Trainer's on-device loss sum (no host sync), the learning rate
the one the optimizer step used.

When a command moves the run (a fork, a merge, a reset, a checkpoint load), the callback ends
HF's epoch iterator with `control.should_epoch_stop`; HF's next epoch then draws the batches the
session positions. The epoch-end evaluation/save/log that HF's `DefaultFlowCallback` schedules for
that early stop are taken back (the run's epoch did not end). Everything else — stopping,
saving, evaluating — stays HF's own `TrainerControl`.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .delegate import inner_optimizer

if TYPE_CHECKING:
    from .delegate import HFDelegate
    from .session import HFSession


def find_trainer(callback: TrainerCallback) -> Trainer:
    """The `Trainer` whose callback handler is calling `callback` right now (found up the call stack)."""
    frame = sys._getframe(1)
    for _ in range(24):
        if frame is None:
            break
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer) and any(cb is callback for cb in candidate.callback_handler.callbacks):
            return candidate
        frame = frame.f_back
    raise RuntimeError("HFCallback could not find the Trainer that calls it; use onthefly.attach_hf(trainer, ...)")


def strategy_is(value: Any, name: str) -> bool:
    return str(getattr(value, "value", value)) == name


class HFCallback(TrainerCallback):
    """onthefly as a `TrainerCallback`: `Trainer(..., callbacks=[onthefly.HFCallback(project="ft")])`.

    The keyword arguments are `attach_hf`'s. The session starts when the Trainer is built (or,
    for a callback added later, when training begins); `attach_hf(trainer, ...)` does the same
    for a Trainer that exists already and returns the session.
    """

    def __init__(self, project: str = "default", run_name: str = "baseline", **options: Any) -> None:
        self.options: dict[str, Any] = {"project": project, "run_name": run_name, **options}
        self.delegate: HFDelegate | None = None
        #: Between `on_train_begin` and `on_train_end`.
        self.training = False
        self._micro = 0  # micro-batches of the current accumulation that HF has finished
        self._lr: float | None = None
        self._loss_seen: torch.Tensor | None = None
        self._moved = False
        self._epoch_pending = False
        self._warned_dropped = False
        self._fed = False  # whether HF's current epoch iterator has yielded a batch

    # ---- binding -----------------------------------------------------------------------------
    @property
    def session(self) -> HFSession:
        delegate = self.delegate
        if delegate is None or delegate.session is None:
            raise RuntimeError("HFCallback is not bound to a Trainer yet (use onthefly.attach_hf(trainer, ...))")
        return delegate.session

    def bind(self, trainer: Trainer) -> HFSession:
        """Open the session for `trainer` (once; the session is returned again for the same Trainer)."""
        if self.delegate is not None:
            if self.delegate.trainer is not trainer:
                raise RuntimeError("this HFCallback already belongs to another Trainer")
            return self.session
        from .session import open_session

        return open_session(trainer, self, **self.options)

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if self.delegate is None:
            self.bind(find_trainer(self))

    # ---- start -------------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, *,
                       model: Any = None, optimizer: Any = None, lr_scheduler: Any = None,
                       train_dataloader: Any = None, **kwargs: Any) -> None:
        if self.delegate is None:
            self.bind(find_trainer(self))
        delegate, session = self.delegate, self.session
        trainer = delegate.trainer
        self.training = True
        session.bind_runtime(model if model is not None else trainer.model, inner_optimizer(optimizer),
                             lr_scheduler, args.device)
        session.scaler = getattr(trainer.accelerator, "scaler", None)
        delegate.install_data(train_dataloader)
        if session.val_loader is None and trainer.eval_dataset is not None and not isinstance(trainer.eval_dataset, dict):
            session.configure_loaders(val_loader=delegate.eval_loader())
        self._micro, self._lr, self._loss_seen = 0, None, None
        self._moved = self._epoch_pending = False
        if state.global_step > 0:
            # HF resumed from its own checkpoint folder: its epoch skips the batches already trained on.
            epoch, batch = delegate.position_of(float(state.epoch or 0.0))
            session.align_with_framework(state.global_step, epoch, batch)
        else:
            session.record_position(state.global_step, session.state.epoch)
        resume, delegate.pending_resume = delegate.pending_resume, None
        if resume is not None:
            with session.job_context("resume_from"):
                session.resume_from(*resume)
            session.take_reposition()
        session.before_training()
        delegate.boundary_hook()  # commands sent before training run before the first batch

    # ---- the hot path --------------------------------------------------------------------------
    def on_substep_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self._micro += 1
        self._fed = True

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, *,
                          optimizer: Any = None, **kwargs: Any) -> None:
        """The learning rate this step used (HF's scheduler steps after this)."""
        if optimizer is not None:
            self._lr = optimizer.param_groups[0]["lr"]

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> TrainerControl:
        delegate, session = self.delegate, self.session
        batches = self._micro + 1
        self._micro, self._fed = 0, True
        run = session.state
        position = run.batch_in_epoch + batches
        if delegate.shard is not None:
            length = delegate.epoch_length()
            if length:
                state.epoch = run.epoch + position / length  # HF's epoch counter may lag after a move
        metrics: dict[str, Any] = {}
        loss = self.step_loss(delegate.trainer)
        if loss is not None:
            metrics["loss"] = loss
        if self._lr is not None:
            metrics["lr"] = self._lr
        size = getattr(session.train_loader, "batch_size", None) or 0
        session.record_step(metrics, step=state.global_step, batch_in_epoch=position, samples=batches * size)
        moves = session.lifecycle.moves
        delegate.boundary_hook()
        if session.lifecycle.moves != moves:
            if delegate.shard is not None and self.training:
                control.should_epoch_stop = True  # HF's next epoch iterator starts where the session is
                self._moved = True
        return control

    def step_loss(self, trainer: Trainer) -> torch.Tensor | None:
        """This step's loss: how much the Trainer's on-device loss sum grew (HF resets it when it logs)."""
        total = getattr(trainer, "_tr_loss", None)
        if not isinstance(total, torch.Tensor):
            return None
        now = total.clone()  # HF accumulates detached losses: no graph to cut
        loss = now if self._loss_seen is None else now - self._loss_seen
        self._loss_seen = now
        return loss

    def forget_logged_loss(self, trainer: Trainer) -> None:
        """After a checkpoint load: HF's running loss sum starts again from this step.

        HF averages its logged loss over the steps since its last log; a load moves the step
        counter, so the sum and the last-logged step are reset to the new position.
        """
        total = getattr(trainer, "_tr_loss", None)
        if isinstance(total, torch.Tensor):
            total.zero_()
        if hasattr(trainer, "_globalstep_last_logged"):
            trainer._globalstep_last_logged = trainer.state.global_step
        self._loss_seen = None

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, *,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self._loss_seen = None  # HF has just reset its loss sum

    # ---- epochs and validation -----------------------------------------------------------------
    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self._fed = False
        if self._epoch_pending:
            self.close_epoch(None)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, *,
                     model: Any = None, **kwargs: Any) -> TrainerControl:
        session = self.session
        if self._micro:
            # The session's epoch ended inside an accumulation (a shorter epoch than HF counts):
            # HF does not step on it, so its gradients would leak into the next step.
            if model is not None:
                model.zero_grad(set_to_none=True)
            if not self._warned_dropped:
                self._warned_dropped = True
                session.log(f"[data] the epoch ended {self._micro} micro-batch(es) into a gradient accumulation; "
                            "HF takes no optimizer step on them, so their gradients were dropped", level="warn")
            self._micro = 0
        if self._moved:
            self._moved = False
            # The run's epoch did not end; take back what HF's flow scheduled for an epoch end.
            if strategy_is(args.eval_strategy, "epoch"):
                control.should_evaluate = False
            if strategy_is(args.save_strategy, "epoch"):
                control.should_save = False
            if strategy_is(args.logging_strategy, "epoch"):
                control.should_log = False
            return control
        length = self.delegate.epoch_length()
        complete = length is None or session.state.batch_in_epoch >= length
        if not complete and control.should_training_stop:
            return control  # stopped inside the epoch: it has not ended
        if (complete and not self._fed and control.should_training_stop and session.state.running
                and not 0 < state.max_steps <= state.global_step):
            # HF ends training when an epoch yields no batch. This one yielded none because the run
            # had trained on all of it already (a checkpoint taken at an epoch's last batch, loaded
            # in a fresh process): the epoch ends here, and the run goes on to the next.
            control.should_training_stop = False
        if complete and self.last_epoch(args):
            # The run's epochs are the session's: after a resume in a fresh process (or a fork's
            # shorter epochs) HF's own count lags, and it would start one epoch too many.
            control.should_training_stop = True
        if control.should_evaluate and self.delegate.reports_validation():
            self._epoch_pending = True  # closed with the validation loss HF computes next
        else:
            self.close_epoch(None)
        return control

    def last_epoch(self, args: TrainingArguments) -> bool:
        """Whether the session epoch ending now is the last of a whole `num_train_epochs` (no `max_steps`)."""
        epochs = float(args.num_train_epochs)
        if args.max_steps > 0 or not epochs.is_integer():
            return False
        return self.session.state.epoch + 1 >= int(epochs)

    def close_epoch(self, val_loss: float | None) -> None:
        self._epoch_pending = False
        self.session.end_epoch(val_loss)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, *,
                    metrics: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self.delegate is None or self.delegate.testing or not self.training:
            return
        value = next((v for k, v in (metrics or {}).items() if k.startswith("eval") and k.endswith("loss")), None)
        if value is not None:
            self.session.note_validation(value)
        if self._epoch_pending:
            self.close_epoch(None if value is None else float(value))

    def on_prediction_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                           **kwargs: Any) -> None:
        delegate = self.delegate
        if delegate is not None and delegate.testing:
            delegate.test_batches += 1
            self.session.emit("testStep", step=delegate.test_batches)

    # ---- the end -------------------------------------------------------------------------------
    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        session = self.session
        if self._epoch_pending:
            self.close_epoch(None)
        status = "completed" if session.state.running else "stopped"
        if status == "completed" and session.cfg.do_test_after and session.has_test_data():
            session.run_labeled_test_and_ckpt("final", source="auto")
        session.after_training(status)
        self.training = False
        session.serve()
        session.release_loop()
