"""HFSession: the session `attach_hf` returns, and how it is opened for a Trainer.

It is the external session (the Trainer drives the batches) plus one duty HF leaves to it: HF
has no callback for an exception inside `trainer.train()`, so a session whose training never
reached `on_train_end` reports the run's end itself when it closes (at the latest at exit) —
"failed" with the error when an uncaught exception ended the program, else "stopped".
"""

from __future__ import annotations

import os
import sys
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable

from transformers import Trainer

from ...control.channels import Channel
from ...session.config import SessionConfig
from ...session.external import EXTERNAL_DIAGNOSTICS_EVERY, OnTheFlyExternalSession
from .delegate import HFDelegate
from .losses import ModelOutputLoss

if TYPE_CHECKING:
    from .callback import HFCallback


class HFSession(OnTheFlyExternalSession):
    """The session of a Hugging Face `Trainer` (see the module docstring)."""

    framework: HFDelegate

    def __init__(self, config: SessionConfig | None = None, *, channel: Channel | None = None,
                 framework: HFDelegate | None = None, **overrides: Any) -> None:
        super().__init__(config, channel=channel, framework=framework, **overrides)
        self._crash: BaseException | None = None
        self._previous_excepthook: Callable[..., Any] | None = None

    @property
    def trainer(self) -> Trainer:
        """The Trainer this session steers."""
        return self.framework.trainer

    def install_exit_handlers(self) -> None:
        """Report the run's end even when `trainer.train()` raised (at exit, or on an uncaught error)."""
        self.close_at_exit()
        self._previous_excepthook = sys.excepthook
        sys.excepthook = self._record_crash

    def _record_crash(self, exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        self._crash = exc
        previous = self._previous_excepthook or sys.__excepthook__
        previous(exc_type, exc, tb)

    def close(self, timeout: float = 10.0) -> None:
        """Report an unfinished training's end, then release threads, sockets and files."""
        if self.lifecycle.closed:
            return
        if self._previous_excepthook is not None and sys.excepthook == self._record_crash:
            sys.excepthook = self._previous_excepthook
        if self.lifecycle.started and not self.lifecycle.finished:
            crash = self._crash
            if crash is None:
                self.after_training("stopped")
            else:
                self.after_training("stopped" if isinstance(crash, KeyboardInterrupt) else "failed", crash)
            self.release_loop()
        super().close(timeout)


def causal_lm(model: Any) -> bool:
    """Whether `model` predicts the next token (HF's causal-LM loss, not an encoder-decoder)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    try:
        return getattr(model, "loss_function", None) is ForCausalLMLoss
    except (AttributeError, KeyError):
        return False


def open_session(trainer: Trainer, callback: HFCallback, *, project: str = "default", run_name: str = "baseline",
                 test_dataset: Any = None, test_loader: Any = None, loss_fn: Callable[..., Any] | None = None,
                 do_test_after: bool = False, native_checkpoints: bool = False, transport: str | None = None,
                 save_dir: str | None = None, dashboard_port: int | None = None, channel: Channel | None = None,
                 model_factory: Callable[[], Any] | None = None, resume_from: str | os.PathLike | None = None,
                 resume_run: str | None = None, **settings: Any) -> HFSession:
    """The session of `trainer`, with `callback` in its callbacks (see `attach_hf` for the arguments)."""
    settings.setdefault("diagnostics_every_n_steps", EXTERNAL_DIAGNOSTICS_EVERY)
    if settings.get("grad_clip_norm") is not None:  # HF clips with its own setting; ours becomes it
        trainer.args.max_grad_norm = float(settings["grad_clip_norm"])
    config = SessionConfig(project=project, run_name=run_name, do_test_after=do_test_after, transport=transport,
                           save_dir=save_dir, dashboard_port=dashboard_port, **settings)
    delegate = HFDelegate(trainer, callback, test_dataset=test_dataset, native_checkpoints=native_checkpoints)
    callback.delegate = delegate
    session = HFSession(config, channel=channel, framework=delegate)
    try:
        session.bind_runtime(trainer.model, device=trainer.args.device)
        session.configure_loss_fn(loss_fn if loss_fn is not None else ModelOutputLoss(shift_labels=causal_lm(trainer.model)))
        session.configure_loaders(test_loader=test_loader)
        session.model_factory = model_factory
        if resume_from is not None:
            delegate.pending_resume = (resume_from, resume_run)  # HF's optimizer exists once training begins
    except BaseException:
        callback.delegate = None
        session.close()
        raise
    session.install_exit_handlers()
    return session
