"""OnTheFlyExternalSession: the session for training loops that a framework (or the user) drives.

The framework owns the batches; the session owns the control plane. The loop reports each
optimizer step with `record_step` and then calls `tick()` (directly, or through the hook a
`FrameworkDelegate` installed): that boundary is the only place where commands that mutate
model, optimizer, data or run state run, on the training thread, inside a pause window. No
background thread ever runs a mutating handler, so no command can overlap an optimizer step.

What the framework does differently (pausing, its own test loop, its checkpoint format, stopping,
picking up a new train loader) goes through the delegate; see `integrations/base.py`.
"""

from __future__ import annotations

import atexit
import inspect
import threading
import weakref
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..checkpoints import CheckpointError, load_checkpoint, read_meta
from ..control.errors import CommandError, ErrorCode
from ..integrations.base import FrameworkDelegate
from ..sampler_utils import clone_loader
from ..session.schemas import Empty
from ..telemetry import as_float, mean_lr
from .base import OnTheFlySessionBase
from .config import SessionConfig

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


class ExternalControlDelegate:
    """The pause window's view of an external session: pausing and resuming reach the framework too."""

    def __init__(self, session: OnTheFlyExternalSession) -> None:
        self.session = session

    def current_step(self) -> int:
        return self.session.current_step()

    def checkpoint_for_pause(self) -> str | None:
        return self.session.checkpoint_for_pause()

    def on_paused(self) -> None:
        framework = self.session.framework
        if framework is not None:
            framework.request_pause()

    def on_resumed(self) -> None:
        framework = self.session.framework
        if framework is not None:
            framework.request_resume()


def _optimizers(value: Any) -> list[torch.optim.Optimizer]:
    items = list(value) if isinstance(value, (list, tuple)) else ([] if value is None else [value])
    for item in items:
        if not isinstance(item, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer (or a list of them), got {type(item).__name__}")
    return items


def _schedulers(value: Any) -> list[Any]:
    items = list(value) if isinstance(value, (list, tuple)) else ([] if value is None else [value])
    for item in items:
        if not (hasattr(item, "state_dict") and hasattr(item, "load_state_dict")):
            raise TypeError(f"scheduler must have state_dict() and load_state_dict(), got {type(item).__name__}")
    return items


class OnTheFlyExternalSession(OnTheFlySessionBase):
    """A session whose batches are driven by someone else; see the module docstring."""

    def __init__(self, config: SessionConfig | None = None, *, channel: Any = None, **overrides: Any) -> None:
        super().__init__(config, channel=channel, **overrides)
        self.framework: FrameworkDelegate | None = None
        self.datamodule: Any = None
        self.train_root_loader: Any = None
        self.extra_optimizers: list[torch.optim.Optimizer] = []
        self.extra_schedulers: list[Any] = []
        # The session's step and epoch are the framework's counters plus these offsets, which
        # change when a command rewinds the run (load_ckpt, reset_session).
        self._framework_step = 0
        self._framework_epoch = 0
        self._step_offset = 0
        self._epoch_offset = 0
        self._stop_forwarded = False
        self.console.delegate = ExternalControlDelegate(self)

    # ---- binding -----------------------------------------------------------------------------
    def bind_runtime(self, model: nn.Module, optimizer: Any = None, scheduler: Any = None,
                     device: str | torch.device | None = None) -> None:
        """Point the session at the objects the framework trains (the model is not moved)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        optimizers = _optimizers(optimizer)
        schedulers = _schedulers(scheduler)
        self.model = model
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
            self.train_root_loader = train_loader
            self.train_loader = train_loader
        if val_loader is not None:
            self.val_loader = val_loader
        if test_loader is not None:
            self.test_loader = test_loader

    def attach_framework(self, delegate: FrameworkDelegate) -> None:
        """Install the framework adapter and have it call `tick()` at every safe batch boundary."""
        if not isinstance(delegate, FrameworkDelegate):
            raise TypeError(f"attach_framework needs a FrameworkDelegate, got {type(delegate).__name__}")
        if self.framework is not None and self.framework is not delegate:
            raise RuntimeError(
                f"a framework ({type(self.framework).__name__}) is already attached to session {self.session_id}"
            )
        self.framework = delegate
        delegate.attach(self)
        delegate.install_batch_boundary_hook(self.tick)

    # ---- the boundary ------------------------------------------------------------------------
    def tick(self) -> bool:
        """Call right after each optimizer step: runs pending commands, blocks while paused.

        Returns False once the run should stop (the framework has then been asked to stop).
        """
        if self.gate.pending:
            self.at_boundary()
        if self.state.running:
            return True
        self._forward_stop()
        return False

    def at_boundary(self) -> None:
        position = self.state.batch_in_epoch
        super().at_boundary()
        if self._reposition:
            # A command moved the run (a checkpoint load, a reset): keep counting from its step and
            # epoch. The framework's loader was not moved, so the position in the epoch stays.
            self._reposition = False
            self._step_offset = self.state.step - self._framework_step
            self._epoch_offset = self.state.epoch - self._framework_epoch
            self.state.batch_in_epoch = position

    def _forward_stop(self) -> None:
        if self._stop_forwarded:
            return
        self._stop_forwarded = True
        if self.framework is not None:
            self.framework.request_stop()

    def record_position(self, step: int, epoch: int) -> None:
        """The framework's counters where training (re)starts, e.g. after it resumed its own checkpoint."""
        self._framework_step, self._framework_epoch = int(step), int(epoch)
        self.state.step = self._framework_step + self._step_offset
        self.state.epoch = self._framework_epoch + self._epoch_offset

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
        self.mark_state_changed()
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
        st.epoch = ended + 1
        st.batch_in_epoch = 0
        if epoch is not None:
            self._framework_epoch = epoch + 1

    def note_validation(self, val_loss: Any, *, epoch: int | None = None) -> None:
        """Record a validation loss (reported as `val_loss` from now on) and log it."""
        value = as_float(val_loss)
        self.state.last_val_loss = value
        self.log(f"epoch {self.state.epoch if epoch is None else epoch} val_loss = {value}", phase="train")

    # ---- lifecycle ---------------------------------------------------------------------------
    def before_training(self) -> None:
        self._stop_forwarded = False
        super().before_training()

    def close_at_exit(self) -> None:
        """Close (report the end, flush events and checkpoints) when the interpreter exits.

        The hook runs at thread shutdown, before the interpreter stops the thread pools that the
        session's file writes use (a plain `atexit` handler runs after that); it holds only a weak
        reference, so a session closed and dropped earlier is not kept alive.
        """
        ref = weakref.ref(self)

        def close_if_alive() -> None:
            session = ref()
            if session is not None:
                session.close()

        register = getattr(threading, "_register_atexit", None)  # what concurrent.futures itself uses
        if register is not None:
            register(close_if_alive)
        else:
            atexit.register(close_if_alive)

    def release_loop(self) -> None:
        """The framework's loop has ended: fail commands nobody will run, flush files and events."""
        self.gate.close("the training loop has finished")
        self.ckpt_writer.flush(timeout=60)
        self.bus.flush()

    # ---- tests ---------------------------------------------------------------------------------
    def run_test(self, loader: Any = None, *, label: str = "manual") -> float | None:
        """The framework's own test loop when it has one, else the generic pass over `test_loader`."""
        if loader is None and self.framework is not None:
            outcome = self.framework.run_test(label)
            if outcome is not None:
                self.log(f"step {self.state.step}: test_loss = {outcome.avg_loss}", phase="test")
                return outcome.avg_loss
        if self.model is None:
            raise CommandError("no model is bound to the session yet", ErrorCode.NOT_FOUND)
        if self.loss_fn is None:
            raise CommandError("a test pass needs a loss_fn (pass loss_fn= when attaching)", ErrorCode.NOT_FOUND)
        return super().run_test(loader, label=label)

    def batch_loss(self, batch: Any) -> torch.Tensor:
        if getattr(self.loss_fn, "_otf_uses_batch", False):
            from ..data_explorer import compute_batch_loss

            return compute_batch_loss(self.model, batch, self.loss_fn, per_sample=False)
        return super().batch_loss(batch)

    # The names the architecture overview uses.
    def _run_labeled_test_and_ckpt(self, label: str, source: str = "manual") -> dict[str, Any]:
        return self.run_labeled_test_and_ckpt(label, source)

    # ---- checkpoints -------------------------------------------------------------------------
    def capture_state(self) -> dict[str, Any]:
        state = super().capture_state()
        if self.extra_optimizers:
            state["extra_optimizers"] = [o.state_dict() for o in self.extra_optimizers]
        if self.extra_schedulers:
            state["extra_schedulers"] = [s.state_dict() for s in self.extra_schedulers]
        return state

    def load_checkpoint_into_state(self, path: str | Path, *, restore_rng: bool = True) -> dict[str, Any]:
        """Load ours or the framework's format; the step continues from the checkpoint's step."""
        # A Lightning `.ckpt` is the one foreign format `load_checkpoint` accepts; its framework loads it natively.
        if self.framework is not None and read_meta(path).get("format") == "lightning":
            info = self.framework.load_checkpoint(Path(path), load_checkpoint(path))
            if info is not None:
                self.mark_state_changed()
                self.request_reposition()
                return info
        info = super().load_checkpoint_into_state(path, restore_rng=restore_rng)
        if self.extra_optimizers or self.extra_schedulers:
            self._load_extra_states(path)
        return info

    def _load_extra_states(self, path: str | Path) -> None:
        document = load_checkpoint(path)
        pairs = [(self.extra_optimizers, document.get("extra_optimizers") or []),
                 (self.extra_schedulers, document.get("extra_schedulers") or [])]
        try:
            for objects, states in pairs:
                for obj, state in zip(objects, states):
                    obj.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{path}: extra optimizer/scheduler state does not fit: {exc}") from exc

    def native_checkpoint_path(self, step: int | None = None) -> Path:
        """Where a framework-native checkpoint of `step` goes: `runs/<run>/native/step-<N>.ckpt`."""
        step = self.state.step if step is None else step
        return self.storage.run_dir(self.cfg.run_name) / "native" / f"step-{int(step):08d}.ckpt"

    def save_native_checkpoint(self) -> Path | None:
        """Have the framework write its own checkpoint format (None when it has none)."""
        if self.framework is None:
            return None
        return self.framework.save_checkpoint(self.native_checkpoint_path())

    def cmd_save_ckpt(self, p: Empty) -> Future:
        """Our ring checkpoint (what every other command reads) plus the framework's native file."""
        reply = super().cmd_save_ckpt(p)
        native = self.save_native_checkpoint()
        if native is None:
            return reply
        out: Future = Future()

        def _done(f: Future) -> None:
            if f.exception() is not None:
                out.set_exception(f.exception())
            else:
                out.set_result({**f.result(), "native_path": str(native)})

        reply.add_done_callback(_done)
        return out

    # ---- data --------------------------------------------------------------------------------
    def rebind_train_loader_to_subset(self, indices: Sequence[int] | None) -> Any:
        """Point the train loader at `Subset(root dataset, indices)` (None: the whole dataset).

        The new loader keeps the original's batch size, collate_fn, drop_last, workers, and the
        kind of sampler (shuffled or not); the framework is told through `refresh_train_loader`.
        """
        root = self.train_root_loader
        if root is None:
            raise CommandError("no train_loader is known to the session, so it cannot be narrowed",
                               ErrorCode.NOT_FOUND)
        if indices is None:
            loader = root
        else:
            if not isinstance(root, DataLoader):
                raise CommandError(f"the train loader is a {type(root).__name__}, not a DataLoader; "
                                   "it cannot be narrowed to a subset", ErrorCode.FAILED)
            picked = [int(i) for i in indices]
            size = len(root.dataset)
            bad = [i for i in picked if not 0 <= i < size]
            if bad:
                raise CommandError(f"subset indices out of range for a dataset of {size}: {bad[:5]}",
                                   ErrorCode.BAD_PAYLOAD)
            try:
                loader = clone_loader(root, dataset=Subset(root.dataset, picked))
            except ValueError as exc:
                raise CommandError(f"cannot narrow the train loader: {exc}", ErrorCode.FAILED) from exc
        self.train_loader = loader
        super().on_dataset_changed(None if indices is None else list(indices))
        if self.framework is not None:
            self.framework.refresh_train_loader(loader)
        return loader

    _rebind_train_loader_to_subset = rebind_train_loader_to_subset

    def on_dataset_changed(self, indices: list[int] | None) -> None:
        """The active subset changed: rebuild the loader the framework iterates."""
        if self.train_root_loader is None or (indices is None and self.active_subset is None):
            super().on_dataset_changed(indices)
            return
        self.rebind_train_loader_to_subset(indices)
