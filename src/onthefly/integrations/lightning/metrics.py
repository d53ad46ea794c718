"""Lightning's metric names mapped onto the dashboard's, and the loss in a step's output."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch

__all__ = ["canonical_metric_name", "logged_metrics", "loss_of"]

LOSS_NAMES = {"loss", "train_loss", "training_loss", "train_loss_step", "loss_step"}
VAL_LOSS_NAMES = {"val_loss", "valid_loss", "validation_loss", "val_loss_epoch"}
ACCURACY_NAMES = {"acc", "accuracy", "train_acc", "train_accuracy", "acc_step", "train_acc_step",
                  "accuracy_step", "train_accuracy_step"}
TEST_LOSS_NAMES = ("test_loss", "test_loss_epoch", "loss", "test/loss")


def canonical_metric_name(name: str) -> str:
    """Lightning's logged names mapped onto the dashboard's: loss, val_loss, accuracy (others unchanged)."""
    key = name.lower().replace("/", "_").replace(".", "_").replace("-", "_")
    if key in LOSS_NAMES:
        return "loss"
    if key in VAL_LOSS_NAMES:
        return "val_loss"
    if key in ACCURACY_NAMES:
        return "accuracy"
    return name


def loss_of(outputs: Any) -> torch.Tensor | None:
    """The loss in a step's output (a tensor, or a dict with "loss"), detached; None if there is none."""
    if isinstance(outputs, torch.Tensor):
        return outputs.detach()
    if isinstance(outputs, Mapping):
        loss = outputs.get("loss")
        if isinstance(loss, torch.Tensor):
            return loss.detach()
    return None


def logged_metrics(trainer: pl.Trainer) -> dict[str, Any]:
    """What the module logged this step, under the dashboard's names (device tensors, not read here)."""
    out: dict[str, Any] = {}
    for name, value in trainer.callback_metrics.items():
        key = canonical_metric_name(name)
        if key == "val_loss":
            continue  # reported from the last validation, not per step
        out.setdefault(key, value)
    return out

