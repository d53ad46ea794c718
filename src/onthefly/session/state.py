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


def train_step_fields(state: RunState, *, loss: Any, accuracy: Any, lr: float | None, grad_norm: Any,
                      throughput: float | None) -> dict[str, Any]:
    """The protocol's `trainStep` fields (values may be device tensors; the writer reads them).

    The costlier diagnostics (`weight_norm`, `mem_vram`, `gpu_util`, `activation_zero_frac`)
    start as None and are filled in at the diagnostics cadence.
    """
    return {
        "step": state.step,
        "epoch": state.epoch,
        "loss": loss,
        "val_loss": state.last_val_loss,
        "accuracy": accuracy,
        "lr": lr,
        "grad_norm": grad_norm,
        "weight_norm": None,
        "activation_zero_frac": None,
        "throughput": throughput,
        "mem_vram": None,
        "gpu_util": None,
    }
