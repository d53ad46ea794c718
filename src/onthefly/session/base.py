"""OnTheFlySessionBase: identity, lifecycle, the command plumbing and the batch boundary.

A session sits between a training loop (ours, the user's or a framework's) and the control plane.
It owns no loop itself: the loop calls `before_training`, then `tick()` at every batch boundary,
then `after_training`. What differs between loops goes through `self.framework` (a
`FrameworkDelegate`); everything else (checkpoints, data, runs, reports, commands) comes from
the mixins the session is composed of, each of which owns one small state object.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import threading
import time
from concurrent.futures import Future
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
from ..control.envelope import Request
from ..mixins.autopilot import AutopilotMixin
from ..mixins.bundles import BundleMixin
from ..mixins.checkpoint import CheckpointMixin
from ..mixins.command import declared_commands
from ..mixins.control import ControlMixin
from ..mixins.data import DataMixin
from ..mixins.distributed import DistributedMixin
from ..mixins.dynamics import DynamicsMixin
from ..mixins.events import EventsMixin
from ..mixins.forks import ForkMixin
from ..mixins.health import HealthMixin
from ..mixins.hparams import HparamsMixin
from ..mixins.info import InfoMixin
from ..mixins.layers import LayersMixin
from ..mixins.ledger import LedgerMixin
from ..mixins.merges import MergeMixin
from ..mixins.replay import ReplayMixin
from ..mixins.reports import ReportsMixin
from ..mixins.runs import RunsMixin
from ..mixins.sampling import SamplingMixin
from ..mixins.testing import TestingMixin
from ..storage import SessionStorage
from ..telemetry import StepTelemetry, mean_lr
from .config import SessionConfig
from .delegate import FrameworkDelegate
from .errors import SessionClosed, wire_handler
from .state import Lifecycle, RunState


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
    return TcpClientChannel(cfg.dashboard_host, cfg.dashboard_port, allow_remote=cfg.allow_remote_dashboard)


class OnTheFlySessionBase(EventsMixin, CheckpointMixin, DataMixin, RunsMixin, ForkMixin, MergeMixin, BundleMixin,
                          ReportsMixin, DynamicsMixin, ControlMixin, HparamsMixin, InfoMixin, TestingMixin,
                          HealthMixin, LedgerMixin, ReplayMixin, LayersMixin, SamplingMixin, AutopilotMixin,
                          DistributedMixin):
    """The framework-neutral session. Subclasses decide who drives the batches."""

    def __init__(self, config: SessionConfig | None = None, *, channel: Channel | None = None,
                 framework: FrameworkDelegate | None = None, **overrides: Any) -> None:
        cfg = config if config is not None else SessionConfig()
        if overrides:
            cfg = cfg.updated(**overrides)
        self.cfg = cfg
        self._init_replay()  # a replay (ONTHEFLY_REPLAY) names its run before anything records the name
        self._init_distributed()
        self.session_id = new_session_id(cfg.project, cfg.run_name)
        self.storage = SessionStorage(cfg.save_dir, cfg.project, self.session_id, cfg.allowed_paths)
        if not self.is_follower:  # a follower adopts rank 0's folder when training starts
            self.storage.create({"project": cfg.project, "run_name": cfg.run_name, "pid": os.getpid()})
        self.state = RunState()
        self.lifecycle = Lifecycle()
        self.telemetry = StepTelemetry()

        # Runtime objects, bound by the loop (native fit, attach, or a framework delegate).
        self.model: torch.nn.Module | None = None  # the bare module (never a DDP wrapper): state, scans, copies
        self.train_module: torch.nn.Module | None = None  # what the native loop calls (the DDP wrapper, if any)
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.extra_optimizers: list[torch.optim.Optimizer] = []
        self.extra_schedulers: list[Any] = []
        self.scaler: Any = None
        self.loss_fn: Callable[..., Any] | None = None
        self.val_loader: Any = None
        self.test_loader: Any = None
        self.device: torch.device = torch.device(cfg.device) if cfg.device else torch.device("cpu")
        self.model_factory: Callable[[], torch.nn.Module] | None = None
        self.embedding_hook: Callable[..., Any] | None = None
        self.loop_thread: threading.Thread | None = None

        if self.is_follower:  # only rank 0 talks to the dashboard and keeps the event log
            self.channel: Channel = NullChannel()
            self.bus = ControlBus(self.channel, event_log=None, session_id=self.session_id)
        else:
            self.channel = channel if channel is not None else make_channel(cfg)
            self.bus = ControlBus(self.channel, event_log=EventLog(self.storage.events_db), session_id=self.session_id)
        self.router = CommandRouter()
        self.gate = PauseGate()
        self.gate.job_context = self.job_context
        self.console = ConsoleAction(self.gate, self, self.emit_event)
        self.dispatcher = CommandDispatcher(self.bus, self.router, self.gate)

        self._init_checkpointing()
        self._init_data()
        self._init_runs()
        self._init_forks()
        self._init_reports()
        self._init_testing()
        self._init_dynamics()
        self._init_ledger()
        self._init_hparams()
        self._init_layers()
        self._init_sampling()
        self._init_autopilot()
        self.update_event_context()
        self.framework = FrameworkDelegate()
        self.use_framework(framework if framework is not None else self.default_framework())
        for attr, declaration in declared_commands(type(self)):
            handler = wire_handler(getattr(self, attr))
            if declaration.mutating:  # every change to the run is recorded in its ledger
                handler = self.ledgered(declaration.name, handler)
            self.router.register(declaration.name, handler, schema=declaration.schema,
                                 mutating=declaration.mutating, description=declaration.description)
        self.bus.set_connect_announcer(self.announcements)
        self.bus.start()
        self.dispatcher.start()

    def default_framework(self) -> FrameworkDelegate:
        """The delegate of a session nobody attached a framework to: a plain loop."""
        return FrameworkDelegate()

    def use_framework(self, delegate: FrameworkDelegate) -> None:
        """Adopt `delegate` and have it call `tick()` at every safe batch boundary."""
        if not isinstance(delegate, FrameworkDelegate):
            raise TypeError(f"a session needs a FrameworkDelegate, got {type(delegate).__name__}")
        self.framework = delegate
        delegate.attach(self)
        delegate.install_batch_boundary_hook(self.tick)

    # ---- ControlDelegate (what the pause window asks of the session) -------------------------
    def current_step(self) -> int:
        return int(self.state.step)

    def on_paused(self) -> None:
        self.framework.request_pause()

    def on_resumed(self) -> None:
        self.framework.request_resume()

    # ---- the boundary ------------------------------------------------------------------------
    @contextlib.contextmanager
    def job_context(self, name: str) -> Iterator[None]:
        """Every gate job: wait for an in-flight state copy, and leave the RNG as it found it."""
        self.await_snapshot_copy()
        rng = capture_rng_state()
        self.lifecycle.rng_overridden = False
        try:
            yield
        finally:
            if not self.lifecycle.rng_overridden:
                restore_rng_state(rng)
            self.lifecycle.rng_overridden = False

    def request_reposition(self) -> None:
        """Ask the loop to re-open its epoch iterator from `state` (after a load, reset, fork, merge).

        The RNG is left as the command set it, and the old epoch's start state is forgotten, so a
        checkpoint taken now resumes exactly where the loop will continue.
        """
        self.lifecycle.reposition = True
        self.lifecycle.moves += 1
        self.lifecycle.rng_overridden = True
        self.forget_epoch_start()

    @property
    def reposition_pending(self) -> bool:
        return self.lifecycle.reposition

    def take_reposition(self) -> bool:
        """True once after a command moved the run (the loop then re-opens its iterator)."""
        pending = self.lifecycle.reposition
        self.lifecycle.reposition = False
        return pending

    def call(self, cmd: str, payload: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        """Run a command from Python, exactly as if a dashboard had sent it; returns its reply data.

        From another thread while a loop trains, the command waits for the next batch boundary;
        otherwise it runs right here. Errors raise `ProtocolError` (with the wire's `code`).
        """
        if self.lifecycle.closed:
            raise SessionClosed(f"session {self.session_id} is closed (its training ended); "
                                f"{cmd!r} cannot run — start a new session or Trainer.fit() to continue")
        spec, validated = self.router.validate(Request(id=None, cmd=cmd, payload=payload or {}))
        if spec.mutating and self.state.training and threading.current_thread() is not self.loop_thread:
            result = self.gate.submit(lambda: self.execute_as("python", spec, validated), name=cmd,
                                      replica=(spec.name, validated, "python")).result(timeout)
        elif spec.mutating:
            with self.job_context(cmd):
                result = self.execute_as("python", spec, validated)
        else:
            result = self.router.execute(spec, validated)
        if isinstance(result, Future):
            result = result.result(timeout)
        return result

    def tick(self) -> bool:
        """Call at every batch boundary; runs pending commands (and blocks while paused).

        Returns False once training should end (a `stop`, or a fork's spent budget).
        """
        if self.gate.pending or self.distributed.group is not None:
            self.at_boundary()
        if self.state.running and self.lifecycle.finish_requested is None:
            return True
        self.framework.request_stop()
        return False

    def at_boundary(self) -> None:
        if self.distributed.group is not None:
            self.rank_boundary()  # every rank shares the window, at the same step
            self.await_snapshot_copy()
            return
        with self.command_boundary() as busy:  # a replay applies its edits due here first
            if busy:
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

    def request_stop(self) -> None:
        """End training at the next boundary (also releases a paused loop)."""
        if self.state.running or not self.lifecycle.stop_requested:
            self.emit("stopping", step=self.state.step)
        self.lifecycle.stop_requested = True
        if self.distributed.group is None:  # in a distributed run every rank stops at the next agreement
            self.state.running = False
        self.gate.interrupt()

    def request_finish(self, why: str) -> None:
        """End training as completed at the next boundary (nobody is connected to decide otherwise)."""
        self.lifecycle.finish_requested = why
        self.log(f"training ends: {why}")
        self.gate.interrupt()

    def has_validation(self) -> bool:
        """Whether validation losses will be seen (a val_loader, or a framework that validates)."""
        return self.val_loader is not None or self.framework.reports_validation()

    # ---- lifecycle ---------------------------------------------------------------------------
    def before_training(self) -> None:
        """Start (or restart) training: emit the opening events once, capture the reset baseline."""
        self.join_ranks()
        life = self.lifecycle
        # A `stop` (or `enforce_version`) that arrived before training started still holds.
        self.state.running = not life.stop_requested
        self.state.training = True
        self.state.status = "running"
        self.loop_thread = threading.current_thread()
        life.finished = False
        life.finish_requested = None
        if self.gate.closed:
            self.gate.reopen()
        cfg = self.cfg
        self.telemetry.configure(cfg.log_every_n_steps, cfg.diagnostics_every_n_steps, cfg.diagnostics_interval_s,
                                 cfg.log_interval_s, step=self.state.step)
        if not life.started:
            life.started = True
            self.emit("session_started", project=cfg.project, run_name=cfg.run_name)
            self.log(f"model session_id={self.session_id}")
            # Every rank decides as rank 0 does (its manifest may be on disk a moment later).
            manifest = self.distributed.root_manifest if self.ranks is not None else self.read_manifest(cfg.run_name)
            if manifest is None:
                self.open_root_run(cfg.run_name)  # with how it was launched (what `onthefly replay` re-runs)
            else:  # a run resumed from a bundle keeps its lineage
                self.update_run_manifest(status="running")
                self.emit("newRun", **self.new_run_fields(cfg.run_name, manifest.get("parents") or [],
                                                          manifest.get("meta") or {"kind": manifest.get("kind")}))
        if not self.has_baseline:
            self.capture_baseline()
        self.begin_replay()
        self.start_autopilot()
        if cfg.start_paused and not life.start_pause_done and not life.stop_requested:
            life.start_pause_done = True  # once per session, not again when training restarts
            self.pause_at_start()

    def after_training(self, status: str, error: BaseException | str | None = None) -> None:
        """Emit `trainingFinished` exactly once per training, whatever ended it."""
        if self.lifecycle.finished:
            return
        self.lifecycle.finished = True
        self.report_unreported_steps()
        self.state.training = False
        self.state.status = status
        fields: dict[str, Any] = {"status": status, "run_id": self.cfg.run_name, "step": self.state.step,
                                  "session_id": self.session_id}
        if error is not None:
            fields["error"] = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        fields.update(self.rank_fields())
        self.stop_autopilot()
        self.update_run_manifest(status=status)
        self.record_final_state(status)
        self.emit("trainingFinished", **fields)

    def serve(self, *, timeout: float | None = None) -> bool:
        """After training, with `serve_after_training`: keep answering a connected dashboard.

        Serving ends on `stop`, when the dashboard goes away, or after `timeout` seconds. Returns
        True when the dashboard asked to train again (a `resume` after a fork, merge, reset or
        checkpoint load made a new starting point) and this runtime can (`can_train_again`).
        """
        if not self.cfg.serve_after_training or not self.bus.connected or not self.state.running:
            return False
        if self.distributed.group is not None:
            self.log("serve_after_training is not available in a distributed run: training has ended on every rank")
            return False
        deadline = None if timeout is None else time.monotonic() + timeout
        self.lifecycle.restart_requested = False
        self.log("training finished; still serving the dashboard (send 'stop' to end)")

        def done() -> bool:
            expired = deadline is not None and time.monotonic() >= deadline
            return (expired or not self.state.running or not self.bus.connected
                    or self.lifecycle.restart_requested)

        self.gate.serve(until=done)
        return self.lifecycle.restart_requested and self.state.running and self.framework.can_train_again

    def release_loop(self) -> None:
        """The loop has ended for good: fail commands nobody will run, flush files and events."""
        self.gate.close("the training loop has finished")
        self.checkpoints.writer.flush(timeout=60)
        self.bus.flush()

    def close(self, timeout: float = 10.0) -> None:
        """Flush everything (events, checkpoints) and release threads, sockets and files."""
        if self.lifecycle.closed:
            return
        self.lifecycle.closed = True
        self.state.running = False
        self.gate.close("the session is closed")
        self.stop_autopilot()
        self.dispatcher.stop()
        self.close_checkpointing(timeout=timeout)
        self.close_runs()
        self.bus.close(timeout=timeout)

    def __enter__(self) -> "OnTheFlySessionBase":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def fatal_error(self) -> str | None:
        return self.lifecycle.fatal

    # ---- the model ---------------------------------------------------------------------------
    def resolve_device(self) -> torch.device:
        if self.model is not None:
            for p in self.model.parameters():
                return p.device
        return self.device

    def model_with_weights(self, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
        """A separate model (from `model_factory`, else a deep copy of the live one) holding `state_dict`."""
        model = self.model_factory() if self.model_factory is not None else copy.deepcopy(self.model)
        model.load_state_dict(state_dict, strict=True)
        return model.to(self.resolve_device())
