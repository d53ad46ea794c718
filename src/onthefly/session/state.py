"""RunState (where the run is) and Lifecycle (where the session is), each one plain object."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunState:
    """Where the run is. Written by the training thread; read (racily but safely) by `status`."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    run_start_step: int = 0  # the step the current run started at (max_steps counts from here)
    last_val_loss: float | None = None
    last_metrics: dict[str, Any] = field(default_factory=dict)
    running: bool = False
    training: bool = False  # a loop (ours or a framework's) is currently driving batches
    status: str = "idle"  # idle | running | completed | stopped | failed
    test_count: int = 0


@dataclass
class Lifecycle:
    """Where the session is in its life; owned by the session base."""

    started: bool = False  # the opening events were emitted
    finished: bool = False  # `trainingFinished` was emitted for the current training
    closed: bool = False
    fatal: str | None = None  # the dashboard refused this version (enforce_version)
    stop_requested: bool = False
    finish_requested: str | None = None  # why training should end as completed (e.g. a fork's budget)
    restart_requested: bool = False  # serving after training: a resume asked to train again
    reposition: bool = False  # a command moved the run; the loop must re-open its epoch iterator
    moves: int = 0  # how many times a command moved the run (loops that iterate for the user watch it)
    start_pause_done: bool = False  # `start_paused` held the run once already
    scheduled_pause: tuple[str, int, str] | None = None  # ("step" | "epoch", n, reason): `pause` with at_step/at_epoch
    rng_overridden: bool = False  # the running gate job set the RNG on purpose
