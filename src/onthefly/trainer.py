"""Trainer: the friendly facade over OnTheFlySession (same arguments as the original package)."""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

from .control.channels import Channel
from .progress import ProgressDisplay, wants_progress
from .session.config import DATA_ORDER_POLICIES, ConfigError, SessionConfig
from .session.native import OnTheFlySession, seed_everything


class Trainer:
    """Create once, then `fit(...)`. Commands are answered from construction on."""

    def __init__(
        self,
        project: str = "default",
        run_name: str = "baseline",
        max_epochs: int | None = 1,
        max_steps: int | None = None,
        do_test_after: bool = False,
        val_every_n_epochs: int = 1,
        dashboard_host: str = "127.0.0.1",
        dashboard_port: int | None = None,
        auto_connect: bool = True,
        session_defaults: dict[str, Any] | None = None,
        *,
        transport: str | None = None,
        channel: Channel | None = None,
        autopilot: Any = None,
        **settings: Any,
    ) -> None:
        """`autopilot`: True for the default recovery rules, or a list of rules (docs/interventions.md)."""
        if transport is None and not auto_connect:
            transport = "off"
        values: dict[str, Any] = dict(session_defaults or {})
        values.update(settings)
        values.update(
            project=project, run_name=run_name, max_epochs=max_epochs, max_steps=max_steps,
            do_test_after=do_test_after, val_every_n_epochs=val_every_n_epochs,
            dashboard_host=dashboard_host, dashboard_port=dashboard_port, transport=transport,
        )
        self.config = SessionConfig(**values)
        self._channel = channel
        self._custom_step: Callable[..., Any] | None = None
        self._autopilot = autopilot
        self.session = OnTheFlySession(self.config, channel=channel)
        self.session.configure_autopilot(autopilot)

    def training_step(self, fn: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        """Decorator: `fn(batch, state)` does the whole step and returns a dict of metrics."""
        self._custom_step = fn
        self.session.custom_step = fn
        return fn

    def fit(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        loss_fn: Callable[..., Any] | None = None,
        train_loader: Any = None,
        val_loader: Any = None,
        test_loader: Any = None,
        *,
        scheduler: Any = None,
        device: str | torch.device | None = None,
        amp: bool | None = None,
        grad_clip_norm: float | None = None,
        seed: int | None = None,
        model_factory: Callable[[], torch.nn.Module] | None = None,
        embedding_hook: Callable[..., Any] | None = None,
        data_order_policy: str | None = None,
        resume_from: str | os.PathLike | None = None,
        resume_run: str | None = None,
        progress: bool | None = None,
    ) -> OnTheFlySession:
        """Train, flush, and return the session (closed).

        `progress` draws a one-line progress display on the terminal while no dashboard is
        connected (None: only when stdout is a TTY). With `serve_after_training=True` the session
        keeps answering a connected dashboard after training until it sends `stop` or goes away.
        """
        session = self.session
        if session.lifecycle.closed:  # a second fit() starts a new session
            self.session = session = OnTheFlySession(self.config, channel=self._channel)
            session.custom_step = self._custom_step
            session.configure_autopilot(self._autopilot)
        cfg = session.cfg
        if amp is not None:
            cfg.amp = bool(amp)
        if grad_clip_norm is not None:
            cfg.grad_clip_norm = float(grad_clip_norm)
        if data_order_policy is not None:
            if data_order_policy not in DATA_ORDER_POLICIES:
                raise ConfigError(
                    f"data_order_policy must be one of {DATA_ORDER_POLICIES}, got {data_order_policy!r}"
                )
            cfg.data_order_policy = data_order_policy
        if seed is not None:
            cfg.seed = int(seed)
            seed_everything(int(seed))
        try:
            session.bind(model=model, optimizer=optimizer, loss_fn=loss_fn, train_loader=train_loader,
                         val_loader=val_loader, test_loader=test_loader, scheduler=scheduler, device=device,
                         model_factory=model_factory, embedding_hook=embedding_hook)
            resume_from = resume_from or os.environ.get("ONTHEFLY_INIT_CKPT") or None
            if resume_from:
                session.resume_from(resume_from, resume_run)
                init_step = os.environ.get("ONTHEFLY_INIT_STEP")
                if init_step:
                    session.state.step = int(init_step)
            display = ProgressDisplay(session).start() if wants_progress(progress) else None
            try:
                session.run()
            finally:
                if display is not None:
                    display.stop()
            if session.fatal_error:
                raise RuntimeError(session.fatal_error)
        finally:
            session.close()
        return session
