"""SessionConfig: every knob of a session in one validated dataclass."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

from ..storage import safe_component

DATA_ORDER_POLICIES = ("user", "epoch_reseed", "fixed_order")
TRANSPORTS = ("tcp", "stdio", "off", "memory")
SCHEDULER_INTERVALS = ("epoch", "step")


class ConfigError(ValueError):
    """A session setting has a value it cannot take; the message names the setting."""


@dataclass
class SessionConfig:
    """What a session needs to know before it starts; validated on construction."""

    project: str = "default"
    run_name: str = "baseline"
    device: str | None = None
    amp: bool = False
    grad_clip_norm: float | None = None
    save_dir: str | None = None  # storage root; None -> $ONTHEFLY_HOME or ./.onthefly
    ckpt_keep: int = 10
    ckpt_every_steps: int = 0  # 0 = no periodic checkpoints
    data_order_policy: str = "user"
    enforce_sampler_state: bool = True
    seed: int | None = None
    max_epochs: int | None = 1
    max_steps: int | None = None
    val_every_n_epochs: int = 1
    do_test_after: bool = False
    log_every_n_steps: int | None = None  # None: every step, at most one event per log_interval_s
    log_interval_s: float = 0.02
    diagnostics_every_n_steps: int = 10  # grad/weight norm, accuracy, memory
    diagnostics_interval_s: float = 0.5  # ... and no more often than this (0: every n steps)
    dynamics_every_epochs: int | None = None  # record training dynamics every n-th epoch end (None: off)
    dynamics_every_steps: int | None = None  # ... and/or every n optimizer steps
    scheduler_interval: str = "epoch"
    transport: str | None = None  # None -> $ONTHEFLY_TRANSPORT or tcp
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int | None = None
    allow_remote_dashboard: bool = False
    allowed_paths: tuple[str, ...] = ()
    serve_after_training: bool = False  # keep answering a connected dashboard after training ends
    start_paused: bool = False  # hold the run before its first step until a dashboard resumes it
    dist_sync_every_steps: int = 8  # distributed runs: the ranks agree on commands every n steps
    dist_timeout_s: float = 120.0  # ... and give a silent peer rank up for lost after this long
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.project, str) or not self.project.strip():
            raise ConfigError(f"project must be a non-empty string, got {self.project!r}")
        if not isinstance(self.run_name, str) or not self.run_name.strip():
            raise ConfigError(f"run_name must be a non-empty string, got {self.run_name!r}")
        # The run name is the run's id and folder name: a configured "my run" becomes "my-run".
        self.run_name = safe_component(self.run_name)
        if self.data_order_policy not in DATA_ORDER_POLICIES:
            raise ConfigError(
                f"data_order_policy must be one of {DATA_ORDER_POLICIES}, got {self.data_order_policy!r}"
            )
        if self.scheduler_interval not in SCHEDULER_INTERVALS:
            raise ConfigError(
                f"scheduler_interval must be one of {SCHEDULER_INTERVALS}, got {self.scheduler_interval!r}"
            )
        if self.transport is None:
            self.transport = os.environ.get("ONTHEFLY_TRANSPORT", "tcp").strip().lower() or "tcp"
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.log_every_n_steps is not None and (
            not isinstance(self.log_every_n_steps, int) or isinstance(self.log_every_n_steps, bool)
            or self.log_every_n_steps < 1
        ):
            raise ConfigError(f"log_every_n_steps must be None or an integer >= 1, got {self.log_every_n_steps!r}")
        for name in ("ckpt_keep", "val_every_n_epochs", "diagnostics_every_n_steps", "dist_sync_every_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("log_interval_s", "diagnostics_interval_s"):
            interval = getattr(self, name)
            if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not interval >= 0:
                raise ConfigError(f"{name} must be a number >= 0, got {interval!r}")
            setattr(self, name, float(interval))
        if isinstance(self.dist_timeout_s, bool) or not isinstance(self.dist_timeout_s, (int, float)) \
                or not self.dist_timeout_s > 0:
            raise ConfigError(f"dist_timeout_s must be a number > 0, got {self.dist_timeout_s!r}")
        self.dist_timeout_s = float(self.dist_timeout_s)
        if not isinstance(self.ckpt_every_steps, int) or self.ckpt_every_steps < 0:
            raise ConfigError(f"ckpt_every_steps must be an integer >= 0, got {self.ckpt_every_steps!r}")
        for name in ("max_epochs", "max_steps", "dynamics_every_epochs", "dynamics_every_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ConfigError(f"{name} must be None or an integer >= 0, got {value!r}")
        if self.grad_clip_norm is not None and not (float(self.grad_clip_norm) > 0):
            raise ConfigError(f"grad_clip_norm must be > 0, got {self.grad_clip_norm!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an int, got {self.seed!r}")
        self.allowed_paths = tuple(str(p) for p in self.allowed_paths)

    def updated(self, **changes: Any) -> "SessionConfig":
        """A copy with `changes` applied (and validated); unknown names are an error."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"unknown session setting(s): {', '.join(unknown)}")
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return SessionConfig(**values)
