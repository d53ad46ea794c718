"""A small Lightning module, datamodule and trigger callback for the Lightning integration tests."""

from __future__ import annotations

import os
import threading
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from .helpers import make_dataset, make_net


class LitClassifier(pl.LightningModule):
    """Logs train_loss/train_acc/val_loss/test_loss; records what its test hooks saw and every optimizer step."""

    def __init__(self, lr: float = 0.02) -> None:
        super().__init__()
        self.net = make_net()
        self.lr = lr
        self.test_labels: list[str | None] = []
        self.test_end_labels: list[str | None] = []
        self.batch_losses: list[float] = []
        self.trace: list[tuple[str, int, str]] = []  # (what, global_step, thread name)
        self.test_modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.batch_losses.append(float(loss.detach()))
        self.log("train_loss", loss)
        self.log("train_acc", (logits.argmax(dim=1) == y).float().mean())
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.test_labels.append(os.environ.get("ONTHEFLY_TEST_LABEL"))
        self.test_modes.append(self.training)
        loss = F.cross_entropy(self(x), y)
        self.log("test_loss", loss)
        return loss

    def on_test_end(self) -> None:
        self.test_end_labels.append(os.environ.get("ONTHEFLY_TEST_LABEL"))

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        name = threading.current_thread().name
        self.trace.append(("opt_start", self.trainer.global_step, name))
        super().optimizer_step(*args, **kwargs)
        self.trace.append(("opt_end", self.trainer.global_step, name))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}


class LitData(pl.LightningDataModule):
    def __init__(self, batch: int = 16) -> None:
        super().__init__()
        self.batch = batch
        self.setups: list[str | None] = []

    def setup(self, stage: str | None = None) -> None:
        self.setups.append(stage)
        self.train_ds = make_dataset(128)
        self.val_ds = make_dataset(32, seed=3)
        self.test_ds = make_dataset(48, seed=5)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_ds, batch_size=self.batch, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_ds, batch_size=16)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_ds, batch_size=16)


def loaders() -> tuple[DataLoader, DataLoader, DataLoader]:
    train = DataLoader(make_dataset(256), batch_size=16, shuffle=True)
    val = DataLoader(make_dataset(32, seed=3), batch_size=16)
    test = DataLoader(make_dataset(64, seed=5), batch_size=16)
    return train, val, test


def make_trainer(**kw: Any) -> pl.Trainer:
    options: dict[str, Any] = dict(max_epochs=2, deterministic=True, logger=False, enable_checkpointing=False,
                                   enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                                   devices=1, num_sanity_val_steps=0)
    options.update(kw)
    return pl.Trainer(**options)


class AtStep(pl.Callback):
    """Runs `action(trainer, module)` once, at the start of the first batch whose global_step is `step`."""

    def __init__(self, step: int, action: Callable[[pl.Trainer, pl.LightningModule], None]) -> None:
        self.step = step
        self.action = action
        self.fired = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self.fired and trainer.global_step == self.step:
            self.fired = True
            self.action(trainer, pl_module)
