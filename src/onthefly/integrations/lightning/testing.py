"""Tests on demand under Lightning: its real test loop, run beside a fit that is in progress."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden

from ...control.errors import CommandError, ErrorCode
from ...session.delegate import TestOutcome
from .metrics import TEST_LOSS_NAMES, loss_of

if TYPE_CHECKING:
    from ...session.external import OnTheFlyExternalSession


class TorchFlags:
    """torch's global determinism switches, which constructing a `Trainer` may change."""

    def __init__(self) -> None:
        self.deterministic = torch.are_deterministic_algorithms_enabled()
        self.warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        self.cudnn_deterministic = torch.backends.cudnn.deterministic
        self.cudnn_benchmark = torch.backends.cudnn.benchmark
        self.cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")

    def restore(self) -> None:
        torch.use_deterministic_algorithms(self.deterministic, warn_only=self.warn_only)
        torch.backends.cudnn.deterministic = self.cudnn_deterministic
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        if self.cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = self.cublas


class TestEvents(Callback):
    """On the test `Trainer`: one `testStep` event per test batch, from the step's own output."""

    def __init__(self) -> None:
        self.session: OnTheFlyExternalSession | None = None
        self.losses: list[torch.Tensor] = []

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.losses = []

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        loss = loss_of(outputs)
        if loss is None and isinstance(outputs, Mapping):
            loss = loss_of({"loss": outputs.get("test_loss")})
        if loss is not None:
            self.losses.append(loss.float().mean())
        if self.session is not None:
            self.session.emit("testStep", step=len(self.losses) if loss is not None else batch_idx + 1, loss=loss)

    def mean_loss(self) -> float | None:
        if not self.losses:
            return None
        return float(torch.stack([t.to(self.losses[0].device) for t in self.losses]).mean().item())


class LightningTester:
    """Runs Lightning's real `Trainer.test` on the live module, from inside `fit`.

    Lightning cannot run `trainer.test` within `fit`, so a second, quiet `Trainer` (same device
    and precision; no logger, checkpointing or progress bar) shares the module; afterwards the
    module's trainer, device and per-layer train/eval modes, and torch's determinism flags, are
    put back.
    """

    def __init__(self, trainer: pl.Trainer, *, datamodule: Any = None, test_loader: Any = None) -> None:
        self.trainer = trainer
        self.datamodule = datamodule
        self.test_loader = test_loader
        self.events = TestEvents()
        self._tester: pl.Trainer | None = None

    def run(self, module: pl.LightningModule) -> TestOutcome:
        """Test `module` with Lightning's test loop; the average loss is its logged test loss."""
        trainer = self.trainer
        if trainer.world_size > 1:
            raise CommandError(
                f"test_now is not supported under the multi-process strategy {type(trainer.strategy).__name__}",
                ErrorCode.FAILED)
        loader, datamodule = self.test_source(module)
        tester = self.test_trainer()
        flags = TorchFlags()
        modes = [(m, m.training) for m in module.modules()]
        dm_trainer = getattr(datamodule, "trainer", None) if datamodule is not None else None
        try:
            results = tester.test(module, dataloaders=loader, datamodule=datamodule, verbose=False)
        finally:
            module.trainer = trainer
            if datamodule is not None:
                datamodule.trainer = dm_trainer
            module.to(trainer.strategy.root_device)  # the test trainer's teardown moved it to the CPU
            for m, training in modes:
                m.training = training
            flags.restore()
        metrics: dict[str, float] = {}
        for result in results or []:
            for key, value in result.items():
                metrics[key] = float(value)
        avg = next((metrics[k] for k in TEST_LOSS_NAMES if k in metrics), None)
        if avg is None:
            avg = next((v for k, v in metrics.items() if "loss" in k.lower()), None)
        if avg is None:
            avg = self.events.mean_loss()
        return TestOutcome(avg, metrics)

    def test_source(self, module: pl.LightningModule) -> tuple[Any, Any]:
        """(test loader, datamodule) for `Trainer.test`: an explicit loader, a datamodule's, or the module's hook."""
        if self.test_loader is not None:
            return self.test_loader, None
        dm = self.datamodule if self.datamodule is not None else self.trainer.datamodule
        if dm is not None and is_overridden("test_dataloader", dm):
            return None, dm
        if is_overridden("test_dataloader", module):
            return None, None
        raise CommandError(
            "no test data: pass test_loader= to attach_lightning, or define test_dataloader() on the "
            "module or datamodule", ErrorCode.NOT_FOUND)

    def test_trainer(self) -> pl.Trainer:
        """A quiet `Trainer` on the same device and precision, built once (flags restored after)."""
        if self._tester is not None:
            return self._tester
        fit = self.trainer
        device = fit.strategy.root_device
        if device.type == "cuda":
            accelerator, devices = "gpu", [device.index or 0]
        else:
            accelerator, devices = device.type, 1
        flags = TorchFlags()
        options: dict[str, Any] = {}
        if fit.limit_test_batches != 1.0:
            options["limit_test_batches"] = fit.limit_test_batches
        rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        level = rank_zero_log.level
        rank_zero_log.setLevel(logging.WARNING)  # the fit trainer already told the user about devices
        try:
            self._tester = pl.Trainer(
                accelerator=accelerator, devices=devices, precision=fit.precision,
                logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, callbacks=[self.events],
                deterministic="warn" if flags.warn_only else flags.deterministic,
                benchmark=flags.cudnn_benchmark, default_root_dir=fit.default_root_dir,
                inference_mode=fit.test_loop.inference_mode, **options,
            )
        finally:
            rank_zero_log.setLevel(level)
            flags.restore()
        return self._tester
