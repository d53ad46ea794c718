"""OnTheFlySessionBase: identity, lifecycle, the command plumbing, and the test pass.

A session sits between a training loop (ours, the user's or a framework's) and the control plane.
It owns no loop itself: the loop calls `before_training`, then `tick()` at every batch boundary,
then `after_training`. Everything else (checkpoints, determinism, runs, commands) comes from the
mixins it is composed of.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from typing import Any, Callable, Iterator

import torch

from ..checkpoints import capture_rng_state, restore_rng_state
from ..control import (
    CommandDispatcher,
    CommandRouter,
    ConsoleAction,
    ControlBus,
    EventLog,
    MemoryChannel,
    NullChannel,
    PauseGate,
    StdioChannel,
    TcpClientChannel,
)
from ..control.channels import Channel
from ..mixins.checkpoint import CheckpointMixin
from ..mixins.commands import CommandsMixin
from ..mixins.determinism import DeterminismMixin
from ..mixins.events import EventsMixin
from ..mixins.features import FeaturesMixin
from ..mixins.fork_merge import ForkMergeMixin
from ..mixins.health import HealthMixin
from ..mixins.run_management import RunManagementMixin
from ..telemetry import StepTelemetry, mean_lr
from .config import SessionConfig
from .state import RunState
from .storage import SessionStorage


def new_session_id(project: str, run_name: str) -> str:
    """`sess-<12 hex>`: unique per process start, readable in logs."""
    seed = f"{project}|{run_name}|{time.time_ns()}|{os.getpid()}|{os.urandom(4).hex()}"
    return "sess-" + hashlib.blake2b(seed.encode(), digest_size=6).hexdigest()


def make_channel(cfg: SessionConfig) -> Channel:
    """The transport the configuration asks for."""
    if cfg.transport == "stdio":
        return StdioChannel()
    if cfg.transport == "off":
        return NullChannel()
    if cfg.transport == "memory":
        return MemoryChannel()
    return TcpClientChannel(
        cfg.dashboard_host, cfg.dashboard_port, allow_remote=cfg.allow_remote_dashboard
    )


class OnTheFlySessionBase(EventsMixin, CheckpointMixin, DeterminismMixin, RunManagementMixin, ForkMergeMixin,
                          FeaturesMixin, HealthMixin, CommandsMixin):
    """The framework-neutral session. Subclasses decide who drives the batches."""

    def __init__(self, config: SessionConfig | None = None, *, channel: Channel | None = None,
                 **overrides: Any) -> None:
        cfg = config if config is not None else SessionConfig()
        if overrides:
            cfg = cfg.updated(**overrides)
        self.cfg = cfg
        self.session_id = new_session_id(cfg.project, cfg.run_name)
        self.run_gen = 0
        self.storage = SessionStorage(cfg.save_dir, cfg.project, self.session_id, cfg.allowed_paths)
        self.storage.create({"project": cfg.project, "run_name": cfg.run_name, "pid": os.getpid()})
        self.state = RunState()
        self.telemetry = StepTelemetry()

        # Runtime objects, bound by the loop (native fit, attach, or a framework delegate).
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.scaler: Any = None
        self.loss_fn: Callable[..., Any] | None = None
        self.train_loader: Any = None
        self.train_root_loader: Any = None  # the user's loader; forks train on subsets of its dataset
        self.val_loader: Any = None
        self.test_loader: Any = None
        self.device: torch.device = torch.device(cfg.device) if cfg.device else torch.device("cpu")
        self.model_factory: Callable[[], torch.nn.Module] | None = None
        self.embedding_hook: Callable[..., Any] | None = None
        self.active_subset: list[int] | None = None

        self.channel = channel if channel is not None else make_channel(cfg)
        self.bus = ControlBus(self.channel, event_log=EventLog(self.storage.events_db), session_id=self.session_id)
        self._update_event_context()
        self.router = CommandRouter()
        self.gate = PauseGate()
        self.gate.job_context = self._job_context
        self.console = ConsoleAction(self.gate, self, self.emit_event)
        self.dispatcher = CommandDispatcher(self.bus, self.router, self.gate)

        self._started = False
        self._finished = False
        self._closed = False
        self._fatal: str | None = None
        self._reposition = False
        self._restart_requested = False
        self._stop_requested = False
        self._rng_overridden = False
        self._loop_thread: threading.Thread | None = None
        self._test_lock = threading.Lock()

        self._init_checkpointing()
        self._init_determinism()
        self._init_run_management()
        self._init_features()
        self._init_fork_merge()
        self._register_commands(self.router)
        self.bus.start()
        self.dispatcher.start()

    # ---- ControlDelegate ---------------------------------------------------------------------
    def current_step(self) -> int:
        return int(self.state.step)

    def on_paused(self) -> None:
        """Hook for framework sessions (ask the framework to hold)."""

    def on_resumed(self) -> None:
        """Hook for framework sessions (let the framework continue)."""

    # ---- the boundary ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _job_context(self, name: str) -> Iterator[None]:
        """Every gate job: wait for an in-flight state copy, and leave the RNG as it found it."""
        self.await_snapshot_copy()
        rng = capture_rng_state()
        self._rng_overridden = False
        try:
            yield
        finally:
            if not self._rng_overridden:
                restore_rng_state(rng)
            self._rng_overridden = False

    def request_reposition(self) -> None:
        """Ask the loop to re-open its epoch iterator from `state` (after a load, reset, fork, merge).

        The RNG is left as the command set it, and the old epoch's start state is forgotten, so a
        checkpoint taken now resumes exactly where the loop will continue.
        """
        self._reposition = True
        self._rng_overridden = True
        self._epoch_start = None

    def call(self, cmd: str, payload: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        """Run a command from Python, exactly as if a dashboard had sent it; returns its reply data.

        From another thread while a loop trains, the command waits for the next batch boundary;
        otherwise it runs right here. Errors raise `ProtocolError` (with the wire's `code`).
        """
        from concurrent.futures import Future as _Future

        from ..control.envelope import Request

        spec, validated = self.router.validate(Request(id=None, cmd=cmd, payload=payload or {}))
        if spec.mutating and self.state.training and threading.current_thread() is not self._loop_thread:
            result = self.gate.submit(lambda: self.router.execute(spec, validated), name=cmd).result(timeout)
        elif spec.mutating:
            with self._job_context(cmd):
                result = self.router.execute(spec, validated)
        else:
            result = self.router.execute(spec, validated)
        if isinstance(result, _Future):
            result = result.result(timeout)
        return result

    def tick(self) -> bool:
        """Call at every batch boundary; runs pending commands (and blocks while paused).

        Returns False when the run should stop.
        """
        if self.gate.pending:
            self.at_boundary()
        return self.state.running

    def at_boundary(self) -> None:
        self.report_unreported_steps()  # the dashboard sees the latest step before any command runs
        self.gate.service(keep_going=lambda: self.state.running)
        self.await_snapshot_copy()

    def report_unreported_steps(self) -> None:
        """Emit `trainStep` for the latest step if the cadence skipped it (epoch end, pause, the end)."""
        telemetry = self.telemetry
        if not telemetry.unreported:
            return
        st = self.state
        fields = telemetry.fields(st.step, st.epoch, st.last_val_loss, lr=mean_lr(self.optimizer))
        st.last_metrics = fields
        self.bus.emit("trainStep", fields)

    # ---- lifecycle ---------------------------------------------------------------------------
    def before_training(self) -> None:
        """Start (or restart) training: emit the opening events once, capture the reset baseline."""
        # A `stop` (or `enforce_version`) that arrived before training started still holds.
        self.state.running = not self._stop_requested
        self.state.training = True
        self.state.status = "running"
        self._loop_thread = threading.current_thread()
        self._finished = False
        if self.gate.closed:
            self.gate.reopen()
        cfg = self.cfg
        self.telemetry.configure(cfg.log_every_n_steps, cfg.diagnostics_every_n_steps, cfg.diagnostics_interval_s,
                                 cfg.log_interval_s, step=self.state.step)
        if not self._started:
            self._started = True
            self.emit("session_started", project=self.cfg.project, run_name=self.cfg.run_name)
            self.log(f"model session_id={self.session_id}")
            self.emit_new_run(self.cfg.run_name, parents=[], meta={"kind": "root"})
        if self._baseline is None:
            self.capture_baseline()

    def after_training(self, status: str, error: BaseException | str | None = None) -> None:
        """Emit `trainingFinished` exactly once per training, whatever ended it."""
        if self._finished:
            return
        self._finished = True
        self.report_unreported_steps()
        self.state.training = False
        self.state.status = status
        fields: dict[str, Any] = {
            "status": status,
            "run_id": self.cfg.run_name,
            "step": self.state.step,
            "session_id": self.session_id,
        }
        if error is not None:
            fields["error"] = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        self.update_run_manifest(status=status)
        self.emit("trainingFinished", **fields)

    def serve(self, *, timeout: float | None = None) -> bool:
        """After training: keep answering a connected dashboard until it says stop or goes away.

        Returns True when the dashboard asked to train again (a `resume` after a fork, merge,
        reset or checkpoint load made a new starting point), False when serving is over.
        """
        if not self.cfg.serve_after_training or not self.bus.connected or not self.state.running:
            return False
        deadline = None if timeout is None else time.monotonic() + timeout
        self._restart_requested = False
        self.log("training finished; still serving the dashboard (send 'stop' to end)")

        def done() -> bool:
            expired = deadline is not None and time.monotonic() >= deadline
            return expired or not self.state.running or not self.bus.connected or self._restart_requested

        self.gate.serve(until=done)
        return self._restart_requested and self.state.running

    def close(self, timeout: float = 10.0) -> None:
        """Flush everything (events, checkpoints) and release threads, sockets and files."""
        if self._closed:
            return
        self._closed = True
        self.state.running = False
        self.gate.close()
        self.dispatcher.stop()
        self.close_checkpointing(timeout=timeout)
        self.close_run_management()
        self.bus.close(timeout=timeout)

    def __enter__(self) -> "OnTheFlySessionBase":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def fatal_error(self) -> str | None:
        return self._fatal

    # ---- evaluation --------------------------------------------------------------------------
    def resolve_device(self) -> torch.device:
        if self.model is not None:
            for p in self.model.parameters():
                return p.device
        return self.device

    def batch_loss(self, batch: Any) -> torch.Tensor:
        """The mean loss of one batch, whatever its shape (fast path for `(inputs, targets)`)."""
        if isinstance(batch, (tuple, list)) and len(batch) == 2 and torch.is_tensor(batch[0]):
            return self.loss_fn(self.model(batch[0]), batch[1])
        from ..data_explorer import compute_batch_loss

        return compute_batch_loss(self.model, batch, self.loss_fn, per_sample=False)

    def run_test(self, loader: Any = None, *, label: str = "manual") -> float | None:
        """One pass over the test loader: `testStep` per batch, returns the average loss."""
        from ..data_explorer import move_to_device

        loader = loader if loader is not None else self.test_loader
        if loader is None:
            from ..control.errors import CommandError, ErrorCode

            raise CommandError("no test_loader is configured for this session", ErrorCode.NOT_FOUND)
        model = self.model
        was_training = model.training
        device = self.resolve_device()
        total = torch.zeros((), dtype=torch.float64, device=device)
        count = 0
        self.log(f"[test] running test '{label}'", phase="test")
        model.eval()
        try:
            with torch.inference_mode(), self.autocast_context():
                for i, batch in enumerate(loader, start=1):
                    batch = move_to_device(batch, device)
                    loss = self.batch_loss(batch).detach().float()
                    total += loss
                    count += 1
                    self.emit("testStep", step=i, loss=loss)
        finally:
            model.train(was_training)
        avg = float(total.item() / count) if count else None
        self.log(f"step {self.state.step}: test_loss = {avg}", phase="test")
        return avg

    def autocast_context(self) -> contextlib.AbstractContextManager[Any]:
        if not self.cfg.amp:
            return contextlib.nullcontext()
        device = self.resolve_device()
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return torch.autocast(device.type, dtype=torch.bfloat16)

    def run_labeled_test_and_ckpt(self, label: str, source: str = "manual") -> dict[str, Any]:
        """A test pass plus a forced ring checkpoint, reported as `test_complete`."""
        if not self._test_lock.acquire(blocking=False):
            return {"status": "busy", "run_id": self.cfg.run_name, "session_id": self.session_id,
                    "step": self.state.step, "label": label}
        try:
            self.state.test_count += 1
            env_label = f"test_{self.state.test_count}"
            os.environ["ONTHEFLY_TEST_LABEL"] = env_label
            avg = self.run_test(label=label)
            ckpt_path, _ = self.save_checkpoint()
            result = {
                "status": "ok",
                "avg_loss": avg,
                "run_id": self.cfg.run_name,
                "session_id": self.session_id,
                "step": self.state.step,
                "label": label,
                "ckpt_path": ckpt_path,
                "env_test_label": env_label,
                "source": source,
            }
            self.emit("test_complete", **result)
            if source == "auto":
                self.emit("auto_test_complete", **result)
            return result
        finally:
            self._test_lock.release()
