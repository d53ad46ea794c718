"""OnTheFlySession: the session that drives the batches itself (used by `Trainer`)."""

from __future__ import annotations

import random
from typing import Any, Callable

import numpy as np
import torch

from ..mixins.hparams import GradClipHook
from ..mixins.training import TrainingMixin
from ..ranks import unwrap_parallel
from .base import OnTheFlySessionBase
from .delegate import FrameworkDelegate


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) in one call."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class NativeLoop(FrameworkDelegate):
    """The native loop reads the session's loader every epoch and stops on the session's flags."""

    runtime = "trainer"

    def __init__(self) -> None:
        self.clip_hook = GradClipHook()  # for a custom @training_step (the default step clips itself)

    @property
    def can_train_again(self) -> bool:
        return True

    def data_edit_timing(self) -> str | None:
        return "now"  # the loop re-opens its epoch iterator when a command moves the data

    def loop_settings(self) -> dict[str, Any]:
        return {"grad_clip_norm": self.session.cfg.grad_clip_norm if self.session is not None else None}

    def apply_loop_settings(self, changes: dict[str, Any]) -> None:
        session = self.session
        if session is None or "grad_clip_norm" not in changes:
            return
        session.cfg.grad_clip_norm = changes["grad_clip_norm"]
        if session.custom_step is not None and session.optimizer is not None:
            self.clip_hook.set([session.optimizer, *session.extra_optimizers], changes["grad_clip_norm"])


class OnTheFlySession(TrainingMixin, OnTheFlySessionBase):
    """A session plus the native loop. Bind objects with `bind()`, then `train()`."""

    def default_framework(self) -> FrameworkDelegate:
        return NativeLoop()

    def bind(
        self,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        loss_fn: Callable[..., Any] | None,
        train_loader: Any,
        val_loader: Any = None,
        test_loader: Any = None,
        scheduler: Any = None,
        device: str | torch.device | None = None,
        model_factory: Callable[[], torch.nn.Module] | None = None,
        embedding_hook: Callable[..., Any] | None = None,
    ) -> None:
        """Attach the user's objects; moves the model to the device and applies the data policy."""
        if model is None:
            raise TypeError("fit() needs a model")
        if train_loader is None:
            raise TypeError("fit() needs a train_loader")
        if optimizer is None and self.custom_step is None:
            raise TypeError("fit() needs an optimizer (or a custom @training_step)")
        if loss_fn is None and self.custom_step is None:
            raise TypeError("fit() needs a loss_fn (or a custom @training_step)")
        if device is not None:
            self.cfg.device = str(device)
        self.device = torch.device(self.cfg.device) if self.cfg.device else _default_device(model)
        self.train_module = model.to(self.device)  # a DistributedDataParallel wrapper stays what trains
        self.model = unwrap_parallel(self.train_module)
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.scheduler = scheduler
        self.val_loader = val_loader
        self.test_loader = test_loader
        self.model_factory = model_factory
        self.embedding_hook = embedding_hook
        if self.cfg.amp and self.device.type == "cuda":
            self.scaler = torch.amp.GradScaler("cuda")
        self.bind_train_loader(train_loader)

    def run(self) -> str:
        """Train; with `serve_after_training`, serve a connected dashboard and train again when it resumes."""
        status = self.train()
        while self.serve():
            status = self.train()
        return status


def _default_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
