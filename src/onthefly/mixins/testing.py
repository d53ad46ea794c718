"""Tests and validation passes: the framework's own test loop when it has one, else ours.

Commands: `test_now` (the extension's Test Now button), `test` (inside a pause window).
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Any

import torch

from ..control.errors import CommandError, ErrorCode
from .command import command


@dataclass
class TestNow:
    __test__ = False  # not a pytest test class
    label: str = "final"


@dataclass
class TestRequest:
    __test__ = False
    label: str = "manual"
    source: str = "manual"


class TestingMixin:
    """Owns `self.test_lock` (one test at a time)."""

    def _init_testing(self) -> None:
        self.test_lock = threading.Lock()

    def autocast_context(self) -> contextlib.AbstractContextManager[Any]:
        if not self.cfg.amp:
            return contextlib.nullcontext()
        device = self.resolve_device()
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return torch.autocast(device.type, dtype=torch.bfloat16)

    def batch_loss(self, batch: Any, model: torch.nn.Module | None = None) -> torch.Tensor:
        """The mean loss of one batch through `model` (default: the session's), whatever the batch's shape."""
        model = self.model if model is None else model
        if (isinstance(batch, (tuple, list)) and len(batch) == 2 and torch.is_tensor(batch[0])
                and not getattr(self.loss_fn, "_otf_uses_batch", False)):
            return self.loss_fn(model(batch[0]), batch[1])
        from ..data_explorer import compute_batch_loss

        return compute_batch_loss(model, batch, self.loss_fn, per_sample=False)

    def mean_loss(self, loader: Any) -> float | None:
        """Average batch loss over `loader` in eval mode (one host sync, at the end)."""
        from ..data_explorer import move_to_device

        model, device = self.model, self.resolve_device()
        was_training = model.training
        total = torch.zeros((), dtype=torch.float64, device=device)
        count = 0
        model.eval()
        try:
            with torch.inference_mode(), self.autocast_context():
                for batch in loader:
                    total += self.batch_loss(move_to_device(batch, device)).detach().float()
                    count += 1
        finally:
            model.train(was_training)
        return float(total.item() / count) if count else None

    def run_test(self, *, label: str = "manual") -> float | None:
        """The framework's own test loop if it has one, else one pass over `test_loader` (`testStep` per batch)."""
        outcome = self.framework.run_test(label)
        if outcome is not None:
            self.log(f"step {self.state.step}: test_loss = {outcome.avg_loss}", phase="test")
            return outcome.avg_loss
        from ..data_explorer import move_to_device

        if self.test_loader is None:
            raise CommandError("no test_loader is configured for this session", ErrorCode.NOT_FOUND)
        if self.model is None:
            raise CommandError("no model is bound to the session yet", ErrorCode.NOT_FOUND)
        if self.loss_fn is None:
            raise CommandError("a test pass needs a loss_fn (pass loss_fn= when attaching)", ErrorCode.NOT_FOUND)
        model = self.model
        was_training = model.training
        device = self.resolve_device()
        total = torch.zeros((), dtype=torch.float64, device=device)
        count = 0
        self.log(f"[test] running test '{label}'", phase="test")
        model.eval()
        try:
            with torch.inference_mode(), self.autocast_context():
                for i, batch in enumerate(self.test_loader, start=1):
                    loss = self.batch_loss(move_to_device(batch, device)).detach().float()
                    total += loss
                    count += 1
                    self.emit("testStep", step=i, loss=loss)
        finally:
            model.train(was_training)
        avg = float(total.item() / count) if count else None
        self.log(f"step {self.state.step}: test_loss = {avg}", phase="test")
        return avg

    def has_test_data(self) -> bool:
        return self.test_loader is not None or self.framework.has_own_test()

    def run_labeled_test_and_ckpt(self, label: str, source: str = "manual") -> dict[str, Any]:
        """A test pass plus a checkpoint, reported as `test_complete` (and `auto_test_complete`)."""
        if not self.test_lock.acquire(blocking=False):
            return {"status": "busy", "run_id": self.cfg.run_name, "session_id": self.session_id,
                    "step": self.state.step, "label": label}
        try:
            self.state.test_count += 1
            env_label = f"test_{self.state.test_count}"
            os.environ["ONTHEFLY_TEST_LABEL"] = env_label
            avg = self.run_test(label=label)
            ckpt_path = self.save_checkpoint_now()
            result = {"status": "ok", "avg_loss": avg, "run_id": self.cfg.run_name, "session_id": self.session_id,
                      "step": self.state.step, "label": label, "ckpt_path": ckpt_path,
                      "env_test_label": env_label, "source": source}
            self.emit("test_complete", **result)
            if source == "auto":
                self.emit("auto_test_complete", **result)
            return result
        finally:
            self.test_lock.release()

    @command("test_now", TestNow, mutating=True, description="run the test data now and checkpoint")
    def cmd_test_now(self, p: TestNow) -> dict[str, Any]:
        return self.run_labeled_test_and_ckpt(p.label, source="manual")

    @command("test", TestRequest, mutating=True, description="run the test data inside a pause window")
    def cmd_test(self, p: TestRequest) -> dict[str, Any]:
        request = {"action": "test", "label": p.label, "source": p.source}
        return self.console.pause_window(request, lambda: self.run_labeled_test_and_ckpt(p.label, p.source))
