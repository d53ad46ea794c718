"""Lightning: `attach_lightning`, the callback that marks batch boundaries, and the delegate.

    trainer = L.Trainer(max_epochs=3)
    session = onthefly.attach_lightning(trainer=trainer, model=model, project="demo")
    trainer.fit(model, train_loader, val_loader)      # unchanged

The callback reports each optimizer step from what Lightning already computed (the step's
output loss every step, `trainer.callback_metrics` at Lightning's `log_every_n_steps`; never an
extra forward pass). It calls the session's boundary hook in `on_train_batch_end` once an
optimizer step has completed, so with gradient accumulation the run only pauses where no
gradients are half accumulated. Every mutating command therefore runs on Lightning's training
thread between two optimizer steps.

Tests run Lightning's real `Trainer.test` (so `test_step` and `on_test_end` fire) on a second,
quiet `Trainer` that shares the module: Lightning cannot run `test` from inside `fit`. The
module's trainer, device and train/eval modes, and torch's determinism flags, are restored after.

This module imports Lightning; `import onthefly` never does.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import lightning.pytorch as pl

from ...control.channels import Channel
from ...session.config import SessionConfig
from ...session.external import EXTERNAL_DIAGNOSTICS_EVERY, OnTheFlyExternalSession
from .callback import OnTheFlyCallback
from .delegate import LightningDelegate
from .metrics import canonical_metric_name

__all__ = ["LightningDelegate", "OnTheFlyCallback", "attach_lightning", "canonical_metric_name"]


def attach_lightning(
    *,
    trainer: pl.Trainer,
    model: pl.LightningModule,
    project: str = "default",
    run_name: str = "baseline",
    train_loader: Any = None,
    val_loader: Any = None,
    test_loader: Any = None,
    loss_fn: Callable[..., Any] | None = None,
    do_test_after: bool = False,
    datamodule: Any = None,
    transport: str | None = None,
    save_dir: str | None = None,
    dashboard_port: int | None = None,
    channel: Channel | None = None,
    native_checkpoints: bool = True,
    resume_from: str | os.PathLike | None = None,
    resume_run: str | None = None,
    **settings: Any,
) -> OnTheFlyExternalSession:
    """Connect a Lightning `Trainer` to a dashboard; then call `trainer.fit(model, ...)` as usual.

    Loaders are only needed for the session's own features (tests, subset forks, scans); by
    default they are taken from what `fit` receives. `test_loader` (or a datamodule's or the
    module's `test_dataloader`) is what `test_now` and `do_test_after` run Lightning's `test` on.
    `loss_fn` is used only for modules without a `test_step`. `native_checkpoints` makes
    `save_ckpt` also write a Lightning `.ckpt`. `resume_from` (an onthefly checkpoint written
    under Lightning, or a session bundle; `resume_run` picks the bundle's run) is loaded before
    the first batch, and Lightning's own loop continues from its position: the run continues
    bit-exactly (with `Trainer(deterministic=True)`). Other `SessionConfig` settings may be passed.
    """
    if not isinstance(model, pl.LightningModule):
        raise TypeError(f"model must be a lightning.pytorch.LightningModule, got {type(model).__name__}")
    settings.setdefault("diagnostics_every_n_steps", EXTERNAL_DIAGNOSTICS_EVERY)
    config = SessionConfig(project=project, run_name=run_name, do_test_after=do_test_after, transport=transport,
                           save_dir=save_dir, dashboard_port=dashboard_port, **settings)
    delegate = LightningDelegate(trainer, datamodule=datamodule, test_loader=test_loader,
                                 native_checkpoints=native_checkpoints)
    session = OnTheFlyExternalSession(config, channel=channel, framework=delegate)
    try:
        session.bind_runtime(model)
        session.configure_loss_fn(loss_fn)
        session.configure_loaders(train_loader, val_loader, test_loader, datamodule)
        if resume_from is not None:
            delegate.pending_resume = (resume_from, resume_run)  # Lightning's loop exists once fit starts
    except BaseException:
        session.close()
        raise
    session.close_at_exit()
    return session
