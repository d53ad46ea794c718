"""FrameworkDelegate: the moments at which a session meets the loop that drives the batches.

Every runtime — our `Trainer`, a user's own loop, Lightning, and later others — meets the
session through this one protocol, in the style of Lightning's `Callback`: one method per
moment, each with a working default, so a delegate only overrides what its framework does
differently. The base class itself describes a loop with no checkpoint format and no test loop
of its own, which is right for the native `Trainer` and for a plain PyTorch loop.

All methods except `attach` are called on the training thread, at a batch boundary, inside the
session's pause window when they mutate anything (see docs/architecture.md, "Threads").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .base import OnTheFlySessionBase

BoundaryHook = Callable[[], bool]


@dataclass
class TestOutcome:
    """What a framework's own test loop produced: the average loss (None if it logged none) and metrics."""

    __test__ = False  # not a pytest test class

    avg_loss: float | None
    metrics: dict[str, float] = field(default_factory=dict)


class FrameworkDelegate:
    """The moments at which a session and a training loop meet (defaults: a plain loop)."""

    #: The runtime's name, as `server_info` and `status` report it.
    runtime: str = "custom"
    #: Whether `load_native_checkpoint` takes checkpoint folders (e.g. Hugging Face's), so `load_ckpt` may name one.
    native_folders: bool = False
    session: OnTheFlySessionBase | None = None
    boundary_hook: BoundaryHook | None = None

    def attach(self, session: OnTheFlySessionBase) -> None:
        """Called once when the session adopts this delegate: remember it, hook into the framework."""
        self.session = session

    def install_batch_boundary_hook(self, hook: BoundaryHook) -> None:
        """The framework must call `hook()` at every safe batch boundary (after an optimizer step).

        `hook()` runs pending commands (blocking while paused) and returns False once the run
        should end. A safe boundary is one where no gradients are half accumulated.
        """
        self.boundary_hook = hook

    def request_pause(self) -> None:
        """The run became paused; the training thread is already held at the boundary."""

    def request_resume(self) -> None:
        """A paused run is about to continue."""

    def refresh_train_loader(self, loader: Any) -> None:
        """The loader training iterates changed (a fork's subset, a merge, a reset).

        The native loop and an own loop read the session's loader at every epoch; a framework that
        iterates its own copy must switch to `loader` here (at the latest from its next epoch).
        """

    def data_edit_timing(self) -> str | None:
        """When a new train loader (a data edit) reaches this loop: "now" (it re-opens its epoch
        iterator at the next boundary), "next_epoch", or None (it iterates a loader of its own)."""
        return "next_epoch"

    def loop_settings(self) -> dict[str, Any]:
        """The loop settings onthefly may change here, with their values now; an absent key cannot change.

        Keys: `grad_clip_norm` (None: no clipping) and `accumulate_grad_batches`.
        """
        return {}

    def apply_loop_settings(self, changes: dict[str, Any]) -> None:
        """Apply validated `changes` (keys of `loop_settings()`) from the next optimizer step on."""

    def run_test(self, label: str) -> TestOutcome | None:
        """Run the framework's own test loop; None means it has none (the session's generic pass runs)."""
        return None

    def has_own_test(self) -> bool:
        """Whether `run_test` runs a test loop of the framework's own."""
        return False

    def reports_validation(self) -> bool:
        """Whether the framework reports validation losses itself (beyond the session's val_loader)."""
        return False

    def save_native_checkpoint(self, path: Path) -> Path | None:
        """Write a checkpoint in the framework's native format at `path` (atomically); None if it has none."""
        return None

    def load_native_checkpoint(self, path: Path, document: dict[str, Any]) -> dict[str, Any] | None:
        """Load a framework-native checkpoint `document` into the live objects.

        Returns `{"path", "step", "epoch", "last_val_loss"}`, or None when the framework has no
        native format.
        """
        return None

    def capture_state(self) -> dict[str, Any] | None:
        """The framework's own loop state, stored in onthefly checkpoints (None: nothing to store)."""
        return None

    def restore_state(self, state: dict[str, Any] | None, document: dict[str, Any]) -> None:
        """After the session loaded an onthefly checkpoint: bring the framework's loop to its position."""

    def request_stop(self) -> None:
        """Called once on the training thread when the run must end: finish the loop after this batch."""

    @property
    def can_train_again(self) -> bool:
        """Whether the session can start training again after the loop ended (only loops the session drives)."""
        return False
