"""OnTheFlyExternalSession: the session for training loops that a framework (or the user) drives.

The framework owns the batches; the session owns the control plane. The loop reports each
optimizer step with `record_step` and then calls `tick()` (directly, or through the hook its
`FrameworkDelegate` installed): that boundary is the only place where commands that mutate
model, optimizer, data or run state run, on the training thread, inside a pause window. No
background thread ever runs a mutating handler, so no command can overlap an optimizer step.
"""

from __future__ import annotations

import atexit
import inspect
import os
import threading
import weakref
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..ranks import unwrap_parallel
from ..telemetry import as_float, mean_lr
from .base import OnTheFlySessionBase
from .delegate import FrameworkDelegate

BATCH_PARAM_NAMES = ("batch", "data", "sample", "samples")
# Weight/gradient norms cost a few kernel launches per tensor; in loops we do not own they are
# taken every 50 steps by default, so the per-step boundary stays within a few percent.
EXTERNAL_DIAGNOSTICS_EVERY = 50
MODEL_PARAM_NAMES = ("model", "net", "module")


def loss_takes_batch(fn: Callable[..., Any]) -> bool:
    """Whether a loss looks like it consumes the whole batch (`loss(batch)`, `loss(model, batch)`, `loss(out, batch)`)."""
    target = fn.forward if isinstance(fn, nn.Module) else fn
    try:
        params = [
            p for p in inspect.signature(target).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        return False
    required = [p for p in params if p.default is p.empty]
    if len(required) == 1:
        return True
    if params and params[0].name in MODEL_PARAM_NAMES:
        return True
    return len(params) > 1 and params[1].name in BATCH_PARAM_NAMES


class LossFunctionModule(nn.Module):
    """A plain callable loss wrapped as an `nn.Module`, so every tool sees losses the same way.

    `forward` *is* the wrapped callable, so signature-based inspection (which call pattern a loss
    takes, whether it accepts `reduction=`) sees the user's own parameters. `_otf_uses_batch` is
    the hint that the loss consumes the batch object; `_otf_batch_call_cfg` caches the call
    pattern `data_explorer` discovers.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        if not callable(fn):
            raise TypeError(f"loss_fn must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.forward = fn  # type: ignore[method-assign]
        self._otf_uses_batch = loss_takes_batch(fn)
        self._otf_batch_call_cfg: dict[str, Any] | None = None

    def extra_repr(self) -> str:
        return getattr(self.fn, "__qualname__", type(self.fn).__name__)


def configure_loss(loss_fn: Callable[..., Any] | None) -> nn.Module | None:
    """`loss_fn` as an `nn.Module` (modules pass through, with the batch hint added); None stays None."""
    if loss_fn is None:
        return None
    if isinstance(loss_fn, nn.Module):
        if not hasattr(loss_fn, "_otf_uses_batch"):
            object.__setattr__(loss_fn, "_otf_uses_batch", loss_takes_batch(loss_fn))
        return loss_fn
    return LossFunctionModule(loss_fn)


def as_list(value: Any, what: str, check: Callable[[Any], bool], expected: str) -> list[Any]:
    items = list(value) if isinstance(value, (list, tuple)) else ([] if value is None else [value])
    for item in items:
        if not check(item):
            raise TypeError(f"{what} must be {expected} (or a list of them), got {type(item).__name__}")
    return items


class OnTheFlyExternalSession(OnTheFlySessionBase):
    """A session whose batches are driven by someone else; see the module docstring."""

    def __init__(self, config: Any = None, *, channel: Any = None, framework: FrameworkDelegate | None = None,
                 **overrides: Any) -> None:
        super().__init__(config, channel=channel, framework=framework, **overrides)
        self.datamodule: Any = None
        # The session's step and epoch are the framework's counters plus these offsets, which
        # change when a command rewinds the run and the framework's own counters stay.
        self._framework_step = 0
        self._framework_epoch = 0
        self._step_offset = 0
        self._epoch_offset = 0

    # ---- binding -----------------------------------------------------------------------------
    def bind_runtime(self, model: nn.Module, optimizer: Any = None, scheduler: Any = None,
                     device: str | torch.device | None = None) -> None:
        """Point the session at the objects the framework trains (the model is not moved)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        optimizers = as_list(optimizer, "optimizer", lambda o: isinstance(o, torch.optim.Optimizer),
                             "a torch.optim.Optimizer")
        schedulers = as_list(scheduler, "scheduler",
                             lambda s: hasattr(s, "state_dict") and hasattr(s, "load_state_dict"),
                             "an object with state_dict() and load_state_dict()")
        self.train_module = model
        self.model = unwrap_parallel(model)  # state, scans and copies use the module inside a DDP wrapper
        self.optimizer = optimizers[0] if optimizers else None
        self.extra_optimizers = optimizers[1:]
        self.scheduler = schedulers[0] if schedulers else None
        self.extra_schedulers = schedulers[1:]
        if device is not None:
            self.device = torch.device(device)
        else:
            self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.mark_state_changed()

    def configure_loss_fn(self, loss_fn: Callable[..., Any] | None) -> nn.Module | None:
        """Use `loss_fn` for tests and scans; a plain callable is wrapped in an `nn.Module`."""
        self.loss_fn = configure_loss(loss_fn)
        return self.loss_fn

    def configure_loaders(self, train_loader: Any = None, val_loader: Any = None, test_loader: Any = None,
                          datamodule: Any = None) -> None:
        """Set the loaders (from arguments, or later from a datamodule); None leaves a slot as it is.

        The framework iterates its own loaders, so no data-order policy is applied to them.
        """
        if datamodule is not None:
            self.datamodule = datamodule
        if train_loader is not None:
            self.bind_train_loader(train_loader, manage=False)
        if val_loader is not None:
            self.val_loader = val_loader
        if test_loader is not None:
            self.test_loader = test_loader

    def attach_framework(self, delegate: FrameworkDelegate) -> None:
        """Install the framework adapter and have it call `tick()` at every safe batch boundary."""
        if not isinstance(delegate, FrameworkDelegate):
            raise TypeError(f"attach_framework needs a FrameworkDelegate, got {type(delegate).__name__}")
        if type(self.framework) is not FrameworkDelegate and self.framework is not delegate:
            raise RuntimeError(
                f"a framework ({type(self.framework).__name__}) is already attached to session {self.session_id}")
        self.use_framework(delegate)

    # ---- the boundary ------------------------------------------------------------------------
    def at_boundary(self) -> None:
        position = self.state.batch_in_epoch
        super().at_boundary()
        if self.take_reposition():
            # A command moved the run (a checkpoint load, a reset, a fork): count from its step and
            # epoch. Unless the framework repositioned its own loop, the position in the epoch stays.
            self._step_offset = self.state.step - self._framework_step
            self._epoch_offset = self.state.epoch - self._framework_epoch
            if not (self.framework_repositioned or self.session_positions_data):
                self.state.batch_in_epoch = position
        self.framework_repositioned = False

    #: The framework moved its own loop to the session's position during the last command.
    framework_repositioned = False
    #: The loop iterates batches the session hands out (and re-positions after a command).
    session_positions_data = False

    def record_position(self, step: int, epoch: int) -> None:
        """The framework's counters where training (re)starts, e.g. after it resumed its own checkpoint."""
        self._framework_step, self._framework_epoch = int(step), int(epoch)
        self.state.step = self._framework_step + self._step_offset
        self.state.epoch = self._framework_epoch + self._epoch_offset

    def align_with_framework(self, step: int, epoch: int, batch_in_epoch: int) -> None:
        """The framework moved its own loop to the session's position: its counters are the session's."""
        self._framework_step, self._framework_epoch = int(step), int(epoch)
        self._step_offset = self._epoch_offset = 0
        self.state.step, self.state.epoch, self.state.batch_in_epoch = int(step), int(epoch), int(batch_in_epoch)
        self.framework_repositioned = True

    def record_step(self, metrics: Mapping[str, Any], *, step: int | None = None, epoch: int | None = None,
                    batch_in_epoch: int | None = None, samples: int = 0,
                    more_metrics: Callable[[], Mapping[str, Any]] | None = None) -> None:
        """Account one optimizer step and emit `trainStep` at the logging cadence.

        `step`/`epoch` are the framework's own counters (None: the session counts). Metric values
        may be device tensors: they are read on the writer thread, never here. `more_metrics` is
        only called on steps that are emitted.
        """
        st = self.state
        if step is None:
            st.step += 1
        else:
            self._framework_step = step
            st.step = step + self._step_offset
        if epoch is not None:
            self._framework_epoch = epoch
            st.epoch = epoch + self._epoch_offset
        st.batch_in_epoch = st.batch_in_epoch + 1 if batch_in_epoch is None else batch_in_epoch
        self.checkpoints.version += 1
        self.report_step(metrics, samples, more_metrics)
        every = self.cfg.ckpt_every_steps
        if every and st.step % every == 0:
            self.save_checkpoint()
        if self.dynamics.schedule is not None:
            self.maybe_record_dynamics(epoch_end=False, epoch=st.epoch)
        if self.forks.budget is not None:
            self.check_fork_budget()
        if self.lifecycle.scheduled_pause is not None:
            self.check_scheduled_pause()

    def report_step(self, metrics: Mapping[str, Any], samples: int,
                    more_metrics: Callable[[], Mapping[str, Any]] | None) -> None:
        """Count the step for telemetry and emit its `trainStep` when the cadence says so."""
        st = self.state
        telemetry = self.telemetry
        if not telemetry.count(st.step, samples, metrics.get("loss")):
            return
        extra = metrics if more_metrics is None else {**more_metrics(), **metrics}
        lr = extra.get("lr")
        if lr is None:
            lr = mean_lr(self.optimizer)
        fields = telemetry.fields(st.step, st.epoch, st.last_val_loss, loss=extra.get("loss"),
                                  accuracy=extra.get("accuracy"), lr=lr, grad_norm=extra.get("grad_norm"))
        if telemetry.diagnostics_due(st.step):
            telemetry.add_diagnostics(fields, self.model, self.resolve_device())
        for key, value in extra.items():
            if key not in fields:
                fields[key] = value
        st.last_metrics = fields
        self.bus.emit("trainStep", fields)

    def end_epoch(self, val_loss: Any = None, *, epoch: int | None = None) -> None:
        """Close an epoch: emit `epoch_end` (with this epoch's validation loss, if any)."""
        self.report_unreported_steps()
        st = self.state
        ended = st.epoch if epoch is None else epoch + self._epoch_offset
        if val_loss is not None:
            st.last_val_loss = as_float(val_loss)
        self.emit("epoch_end", epoch=ended, val_loss=None if val_loss is None else st.last_val_loss)
        self.maybe_record_dynamics(epoch_end=True, epoch=ended)
        st.epoch = ended + 1
        st.batch_in_epoch = 0
        if epoch is not None:
            self._framework_epoch = epoch + 1
        self.note_fork_validation(None if val_loss is None else st.last_val_loss)

    def note_validation(self, val_loss: Any, *, epoch: int | None = None) -> None:
        """Record a validation loss (reported as `val_loss` from now on) and log it."""
        value = as_float(val_loss)
        self.state.last_val_loss = value
        self.log(f"epoch {self.state.epoch if epoch is None else epoch} val_loss = {value}", phase="train")

    # ---- lifecycle ---------------------------------------------------------------------------
    def close_at_exit(self) -> None:
        """Close (report the end, flush events and checkpoints) when the interpreter exits.

        The hook runs at thread shutdown, before the interpreter stops the thread pools that the
        session's file writes use (a plain `atexit` handler runs after that); it holds only a weak
        reference, so a session closed and dropped earlier is not kept alive. A forked child (a
        DataLoader worker) inherits the hook but none of the session's threads: there the hook does
        nothing, or the child would hang at exit waiting for them and write into the parent's files.
        """
        ref = weakref.ref(self)
        owner = os.getpid()

        def close_if_alive() -> None:
            session = ref()
            if session is not None and os.getpid() == owner:
                session.close()

        register = getattr(threading, "_register_atexit", None)  # what concurrent.futures itself uses
        if register is not None:
            register(close_if_alive)
        else:
            atexit.register(close_if_alive)
