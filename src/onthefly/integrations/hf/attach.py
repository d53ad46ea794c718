"""`attach_hf`: a dashboard for a Hugging Face `Trainer` that exists already."""

from __future__ import annotations

import os
from typing import Any, Callable

from transformers import Trainer

from ...control.channels import Channel
from .callback import HFCallback
from .session import HFSession


def attach_hf(
    trainer: Trainer,
    *,
    project: str = "default",
    run_name: str = "baseline",
    test_dataset: Any = None,
    test_loader: Any = None,
    loss_fn: Callable[..., Any] | None = None,
    do_test_after: bool = False,
    native_checkpoints: bool = False,
    transport: str | None = None,
    save_dir: str | None = None,
    dashboard_port: int | None = None,
    channel: Channel | None = None,
    resume_from: str | os.PathLike | None = None,
    resume_run: str | None = None,
    **settings: Any,
) -> HFSession:
    """Connect a `transformers.Trainer` to a dashboard; then call `trainer.train()` as usual.

    The session starts at once and adds its `HFCallback` to the Trainer. `test_dataset` is what
    `test_now` and `do_test_after` run `trainer.evaluate(..., metric_key_prefix="test")` on
    (`test_loader` instead: the generic pass with `loss_fn`). `loss_fn` scores samples for
    reports and forks; the default recomputes per-sample losses from the model's logits and the
    batch's labels (shifted for causal LMs, -100 ignored). `native_checkpoints` makes `save_ckpt`
    also write HF's checkpoint folder (which `trainer.train(resume_from_checkpoint=...)` resumes
    from). `resume_from` (an onthefly checkpoint written under HF, or a session bundle;
    `resume_run` picks the bundle's run) is loaded before the first batch and the Trainer
    continues from its position bit-exactly. Other `SessionConfig` settings may be passed.
    """
    callback = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, HFCallback)), None)
    if callback is not None:
        raise RuntimeError("this Trainer already has an onthefly HFCallback; its session is callback.session")
    options = dict(project=project, run_name=run_name, test_dataset=test_dataset, test_loader=test_loader,
                   loss_fn=loss_fn, do_test_after=do_test_after, native_checkpoints=native_checkpoints,
                   transport=transport, save_dir=save_dir, dashboard_port=dashboard_port, channel=channel,
                   resume_from=resume_from, resume_run=resume_run, **settings)
    return HFCallback(**options).bind(trainer)
