"""RunState: the per-run progress counters, kept in one plain object."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunState:
    """Where the run is. Written by the training thread; read (racily but safely) by `status`."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    last_val_loss: float | None = None
    last_metrics: dict[str, Any] = field(default_factory=dict)
    running: bool = False
    training: bool = False  # a loop (ours or a framework's) is currently driving batches
    status: str = "idle"  # idle | running | completed | stopped | failed
    test_count: int = 0
