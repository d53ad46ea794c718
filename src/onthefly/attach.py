"""`onthefly.attach`: a dashboard for a plain PyTorch loop you keep writing yourself.

Two lines::

    session = onthefly.attach(model=model, optimizer=opt, loss_fn=loss_fn, train_loader=train_loader)
    for epoch in range(epochs):
        for x, y in train_loader:
            opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); opt.step()
            if not session.step(loss):      # reports the step; pauses/commands happen here
                break

`session.step(loss)` is the batch boundary: it counts the step, queues a `trainStep` event (the
loss stays on its device; no host sync), and runs any pending command right there, on your
thread, between two optimizer steps. While the dashboard holds the run paused, `step()` simply
does not return. It returns False after a `stop` (or when a fork's budget is spent).

To let onthefly own the data order as well — so a fork trains its child on the selected
samples, and a checkpoint resumes mid-epoch bit-exactly, also in a fresh process — iterate the
session's epochs and batches instead of your loader::

    for epoch in session.epochs(3):
        for x, y in session.batches():
            ...
            if not session.step(loss):
                break

Epochs end by themselves when `train_loader` has a length (or call `session.end_epoch()`), and the
run is reported finished when the `with` block or the program ends (or call `session.finish()`).

An Accelerate loop (`accelerator.prepare`, `accelerator.backward`, `with accelerator.accumulate(model)`)
works unchanged: pass `accelerator=accelerator` (or let `attach` find it from the prepared
optimizer). `session.step(loss)` is then called after every micro-batch, as the loop is written,
and counts — and pauses at — optimizer steps only: micro-batches of an unfinished gradient
accumulation are never a boundary.
"""

from __future__ import annotations

import os
import sys
from types import TracebackType
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .control.channels import Channel
from .mixins.hparams import GradClipHook
from .session.config import SessionConfig
from .session.delegate import FrameworkDelegate
from .session.external import EXTERNAL_DIAGNOSTICS_EVERY, OnTheFlyExternalSession


class OwnLoop(FrameworkDelegate):
    """A hand-written loop: it asks the session for each epoch's batches (or iterates its own loader)."""

    runtime = "own_loop"

    def __init__(self) -> None:
        self.clip_hook = GradClipHook()

    def data_edit_timing(self) -> str | None:
        """At once while the loop iterates `session.batches()`; never when it iterates its own loader."""
        session = self.session
        return "now" if session is not None and session.session_positions_data else None

    def loop_settings(self) -> dict[str, Any]:
        return {"grad_clip_norm": self.clip_hook.norm}

    def apply_loop_settings(self, changes: dict[str, Any]) -> None:
        """Clip with an optimizer step pre-hook: the loop's own `optimizer.step()` (or `scaler.step`) clips."""
        session = self.session
        if "grad_clip_norm" in changes and session is not None and session.optimizer is not None:
            self.clip_hook.set([session.optimizer, *session.extra_optimizers], changes["grad_clip_norm"])

    def accumulation_complete(self) -> bool:
        """Whether the step just reported ended with an optimizer step (a plain loop steps every batch)."""
        return True



class AccelerateLoop(OwnLoop):
    """A loop written with Accelerate: an optimizer step happens only when Accelerate syncs gradients."""

    runtime = "accelerate"

    def __init__(self, gradient_state: Any) -> None:
        super().__init__()
        self.gradient_state = gradient_state

    def accumulation_complete(self) -> bool:
        return bool(self.gradient_state.sync_gradients)


def accelerate_parts(accelerator: Any, model: nn.Module, optimizer: Any, scheduler: Any) -> dict[str, Any] | None:
    """What a session binds in an Accelerate loop (None for a plain loop): the unwrapped model, the
    torch optimizers and schedulers inside Accelerate's wrappers, the device, the scaler, the loop.

    Without `accelerator`, an optimizer that `accelerator.prepare` returned identifies the loop.
    """
    optimizers = optimizer if isinstance(optimizer, (list, tuple)) else [optimizer]
    prepared = [o for o in optimizers if type(o).__module__.startswith("accelerate.")]
    if accelerator is None and not prepared:
        return None
    if accelerator is not None:
        gradient_state, scaler, device = accelerator.gradient_state, accelerator.scaler, accelerator.device
        model = accelerator.unwrap_model(model)
    else:
        from accelerate.utils import extract_model_from_parallel

        gradient_state, scaler = prepared[0].gradient_state, prepared[0].scaler
        model = extract_model_from_parallel(model)
        device = next((p.device for p in model.parameters()), None)

    def inner(obj: Any, attr: str) -> Any:
        return getattr(obj, attr) if type(obj).__module__.startswith("accelerate.") and hasattr(obj, attr) else obj

    schedulers = scheduler if isinstance(scheduler, (list, tuple)) else [scheduler]
    return {"model": model, "optimizer": [inner(o, "optimizer") for o in optimizers if o is not None] or None,
            "scheduler": [inner(s, "scheduler") for s in schedulers if s is not None] or None,
            "device": device, "scaler": scaler, "loop": AccelerateLoop(gradient_state)}


class OwnLoopSession(OnTheFlyExternalSession):
    """The session `attach()` returns: `step()` per batch, `epochs()`/`batches()`, `end_epoch()`, `finish()`."""

    framework: OwnLoop

    def __init__(self, config: SessionConfig | None = None, *, channel: Channel | None = None,
                 framework: OwnLoop | None = None, **overrides: Any) -> None:
        super().__init__(config, channel=channel, framework=framework or OwnLoop(), **overrides)
        self._epoch_len: int | None = None
        self._batch_size = 0
        self._micro = 0  # micro-batches of an unfinished gradient accumulation
        self._micro_loss: Any = None  # their summed loss
        self._crash: BaseException | None = None
        self._previous_excepthook: Callable[..., Any] | None = None
        self._epoch_full = False  # the last batch of the epoch was reported; epoch_end is still due
        self._moved = False  # a command moved the run while batches() was handing out an epoch

    # ---- the per-batch call ------------------------------------------------------------------
    def step(self, loss: Any = None, **metrics: Any) -> bool:
        """Report one optimizer step (call it after `optimizer.step()`) and honour the dashboard.

        `loss` (a tensor stays on its device) and any other metrics (`accuracy=...`) go into the
        step's `trainStep` event. Returns False once the run should end. In an Accelerate loop,
        a micro-batch that does not finish a gradient accumulation is only counted (its loss goes
        into the step's mean loss); the step is reported, and commands run, at the optimizer step.
        """
        if self._epoch_full:
            self._close_epoch(None)
        if loss is not None:
            metrics["loss"] = loss.detach() if isinstance(loss, torch.Tensor) else loss
        if not self.framework.accumulation_complete():
            if loss is not None:
                self._micro_loss = metrics["loss"] if self._micro_loss is None else self._micro_loss + metrics["loss"]
            self._micro += 1
            return self.state.running and self.lifecycle.finish_requested is None
        batches = self._micro + 1
        if self._micro:
            if self._micro_loss is not None and loss is not None:
                metrics["loss"] = (self._micro_loss + metrics["loss"]) / batches
            self._micro, self._micro_loss = 0, None
        self.record_step(metrics, samples=self._batch_size * batches,
                         batch_in_epoch=self.state.batch_in_epoch + batches)
        keep_going = self.tick()
        if self._epoch_len is not None and self.state.batch_in_epoch >= self._epoch_len:
            self._epoch_full = True
        return keep_going

    # ---- epochs and batches the session owns ---------------------------------------------------
    def epochs(self, max_epochs: int | None = None) -> Iterator[int]:
        """The epochs to train, from where the run is (after a resume: the checkpoint's epoch).

        Ends at `max_epochs` (the run's own epochs), after a `stop`, or when a fork's budget is
        spent; an epoch the loop left without closing it is closed here.
        """
        st = self.state
        while st.running and self.lifecycle.finish_requested is None and (max_epochs is None or st.epoch < max_epochs):
            self.take_reposition()
            yield st.epoch
            if self._moved:
                self._moved = False
                continue  # a command moved the run: this epoch is not over
            if self._epoch_full or st.batch_in_epoch > 0:
                self._close_epoch(None)

    def batches(self) -> Iterator[Any]:
        """This epoch's batches from the loader the run trains on, positioned where the run is.

        The data order is the epoch's own (replayed from its start after a resume); after a fork
        the batches come from the child's subset. Stops early when a command moves the run.
        """
        st = self.state
        loader = self.train_loader
        if loader is None:
            raise RuntimeError("session.batches() needs the train_loader passed to onthefly.attach()")
        self._epoch_len = _length(loader)
        self._batch_size = _batch_size(loader)
        self._moved = False
        if callable(getattr(loader, "set_epoch", None)):
            loader.set_epoch(st.epoch)  # a loader that counts its own epochs (Accelerate's) follows the run
        moves = self.lifecycle.moves
        self.session_positions_data = True  # a command that moves the run here moves these batches too
        try:
            at_boundary = self.gate.pending or self.ranks is not None  # every rank decides alike
            if at_boundary and (not self.tick() or self.lifecycle.moves != moves):
                self._moved = self.lifecycle.moves != moves  # a command at the epoch's start moved the run
                return  # the start of an epoch is a boundary too: a held run (start_paused) waits here
            for batch in self.open_epoch_iterator(loader, st.epoch, st.batch_in_epoch):
                yield batch
                if self.lifecycle.moves != moves:
                    self._moved, self._epoch_full = True, False
                    return
                if not st.running or self.lifecycle.finish_requested is not None:
                    return
        finally:
            self.session_positions_data = False

    def end_epoch(self, val_loss: Any = None, *, epoch: int | None = None) -> None:
        """End the epoch, optionally with its validation loss; emits one `epoch_end`.

        With a sized `train_loader` epochs also end by themselves (at the next `step()`), so
        calling this after every epoch, with or without a validation loss, is always right.
        """
        if epoch is not None:
            raise TypeError("OwnLoopSession counts epochs itself; call end_epoch() without epoch=")
        if self._moved:
            return  # a command moved the run inside this epoch: it has not ended
        if self._epoch_full or self.state.batch_in_epoch > 0:
            self._close_epoch(val_loss)
        elif val_loss is not None:
            self.note_validation(val_loss)

    def _close_epoch(self, val_loss: Any) -> None:
        self._epoch_full = False
        if val_loss is not None:
            self.note_validation(val_loss)
        super().end_epoch(val_loss)
        self._epoch_len = _length(self.train_loader)

    # ---- the end -------------------------------------------------------------------------------
    def finish(self, status: str | None = None, error: BaseException | str | None = None) -> None:
        """Report the end of training (`trainingFinished`), run the final test if configured, flush.

        `status` defaults to "stopped" after a `stop` command, else "completed".
        """
        if self.lifecycle.finished or not self.lifecycle.started:
            return
        if status is None:
            status = "completed" if self.state.running else "stopped"
        if self._epoch_full:
            self._close_epoch(None)
        if status == "completed" and self.cfg.do_test_after and self.test_loader is not None:
            self.run_labeled_test_and_ckpt("final", source="auto")
        self.after_training(status, error)
        self.serve()
        self.release_loop()

    def close(self, timeout: float = 10.0) -> None:
        """Finish (if not done yet) and release threads, sockets and files."""
        if self.lifecycle.closed:
            return
        if self._previous_excepthook is not None and sys.excepthook == self._record_crash:
            sys.excepthook = self._previous_excepthook
        if self.lifecycle.started and not self.lifecycle.finished:
            crash = self._crash
            if crash is None:
                self.finish()
            else:
                self.finish("stopped" if isinstance(crash, KeyboardInterrupt) else "failed", crash)
        super().close(timeout)

    def __enter__(self) -> OwnLoopSession:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None and not self.lifecycle.finished:
            self.finish("stopped" if isinstance(exc, KeyboardInterrupt) else "failed", exc)
        self.close()

    def _record_crash(self, exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        """sys.excepthook: remember an uncaught error so the exit handler reports the run as failed."""
        self._crash = exc
        previous = self._previous_excepthook or sys.__excepthook__
        previous(exc_type, exc, tb)

    def install_exit_handlers(self) -> None:
        """Report the run's end even if the script never calls `finish()` (at exit, or on an uncaught error)."""
        self.close_at_exit()
        self._previous_excepthook = sys.excepthook
        sys.excepthook = self._record_crash

    def start(self, train_loader: Any) -> None:
        self._epoch_len = _length(train_loader)
        self._batch_size = _batch_size(train_loader)
        self.before_training()


def _batch_size(loader: Any) -> int:
    """Samples per batch (a loader built with a batch sampler has it there), 0 if unknown."""
    size = getattr(loader, "batch_size", None) or getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    return int(size or 0)


def _length(loader: Any) -> int | None:
    if loader is None:
        return None
    try:
        n = len(loader)
    except TypeError:  # an iterable without a length: epochs end only through end_epoch()
        return None
    return n if n > 0 else None


def attach(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer] | None = None,
    loss_fn: Callable[..., Any] | None = None,
    train_loader: Any = None,
    val_loader: Any = None,
    test_loader: Any = None,
    scheduler: Any = None,
    device: str | torch.device | None = None,
    project: str = "default",
    run_name: str = "baseline",
    transport: str | None = None,
    save_dir: str | None = None,
    dashboard_port: int | None = None,
    channel: Channel | None = None,
    model_factory: Callable[[], nn.Module] | None = None,
    embedding_hook: Callable[..., Any] | None = None,
    resume_from: str | os.PathLike | None = None,
    resume_run: str | None = None,
    accelerator: Any = None,
    **settings: Any,
) -> OwnLoopSession:
    """Connect a hand-written training loop to a dashboard; returns the session to call `step()` on.

    Nothing about the loop changes: the model is not moved, the loaders are not replaced. The
    session starts at once (`session_started`, `newRun`), takes commands from then on, and runs
    the mutating ones inside `session.step()`. `resume_from` continues from an onthefly checkpoint
    or a session bundle (`resume_run`: which of its runs); iterate `session.epochs()` /
    `session.batches()` to continue mid-epoch exactly. Other
    `SessionConfig` settings (for example `log_every_n_steps`, `do_test_after`, `ckpt_keep`) may
    be passed as keywords. `accelerator`: the loop's `accelerate.Accelerator` (found from a
    prepared optimizer when not given); the session then binds the unwrapped model and the torch
    optimizer inside Accelerate's, and counts optimizer steps (see the module docstring).
    """
    settings.setdefault("diagnostics_every_n_steps", EXTERNAL_DIAGNOSTICS_EVERY)
    config = SessionConfig(project=project, run_name=run_name, transport=transport, save_dir=save_dir,
                           dashboard_port=dashboard_port, **settings)
    parts = accelerate_parts(accelerator, model, optimizer, scheduler)
    if parts is not None:
        model, optimizer, scheduler = parts["model"], parts["optimizer"], parts["scheduler"]
        device = device if device is not None else parts["device"]
    session = OwnLoopSession(config, channel=channel, framework=parts["loop"] if parts is not None else None)
    try:
        session.bind_runtime(model, optimizer, scheduler, device)
        if parts is not None:
            session.scaler = parts["scaler"]
        session.configure_loss_fn(loss_fn)
        session.configure_loaders(train_loader, val_loader, test_loader)
        session.model_factory = model_factory
        session.embedding_hook = embedding_hook
        if resume_from is not None:
            session.resume_from(resume_from, resume_run)
            session.take_reposition()
            session.record_position(session.state.step, session.state.epoch)
        session.start(train_loader)
    except BaseException:
        session.close()
        raise
    session.install_exit_handlers()
    return session
