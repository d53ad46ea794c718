"""FrameworkDelegate: what a session asks of a framework that owns the training loop.

The framework (Lightning, or anything else that drives its own batches) keeps the loop; the
session keeps the control plane. A delegate translates between the two, one method per moment,
in the style of Lightning's `Callback`: every method has a working default, so a delegate only
overrides the moments its framework handles differently.

All methods except `attach` are called on the framework's training thread, at a batch boundary,
inside the session's pause window where the method mutates anything (see DESIGN.md, "Threads").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from ..session.external import OnTheFlyExternalSession

BoundaryHook = Callable[[], bool]


@dataclass
class TestOutcome:
    """What a framework's own test loop produced: the average loss (None if it logged none) and metrics."""

    __test__ = False  # not a pytest test class

    avg_loss: float | None
    metrics: dict[str, float] = field(default_factory=dict)


class FrameworkDelegate:
    """The moments at which a session and a framework-owned loop meet.

    Subclass it for a framework. The defaults describe a framework with no native checkpoint
    format and no test loop of its own: the session then uses its own checkpoint files and its
    generic test pass, which is right for a plain PyTorch loop.
    """

    session: OnTheFlyExternalSession | None = None
    boundary_hook: BoundaryHook | None = None

    def attach(self, session: OnTheFlyExternalSession) -> None:
        """Called once by `session.attach_framework(self)`: remember the session, hook into the framework."""
        self.session = session

    def install_batch_boundary_hook(self, hook: BoundaryHook) -> None:
        """Called once after `attach`: the framework must call `hook()` at every safe batch boundary.

        `hook()` runs pending commands (blocking while paused) and returns False once the run
        should stop. A safe boundary is one where an optimizer step has just completed and no
        gradients are half accumulated.
        """
        self.boundary_hook = hook

    def request_pause(self) -> None:
        """Called when the run became paused; the training thread is already held at the boundary."""

    def request_resume(self) -> None:
        """Called right before a paused run continues."""

    def refresh_train_loader(self, loader: Any) -> None:
        """Called when the session's train loader changed (e.g. a fork narrowed it to a subset).

        The default only records it on the session; a framework that iterates its own copy of the
        loader must switch to `loader` here (at the latest from its next epoch on).
        """
        if self.session is not None:
            self.session.train_loader = loader

    def run_test(self, label: str) -> TestOutcome | None:
        """Run the framework's own test loop; None means it has none and the session runs its generic pass."""
        return None

    def save_checkpoint(self, path: Path) -> Path | None:
        """Write a checkpoint in the framework's native format at `path` (atomically); None if it has none."""
        return None

    def load_checkpoint(self, path: Path, document: dict[str, Any]) -> dict[str, Any] | None:
        """Load a framework-native checkpoint `document` (read from `path`) into the live objects.

        Returns `{"path", "step", "epoch", "last_val_loss"}`, or None when `document` is not in the
        framework's format (the session then loads it itself).
        """
        return None

    def request_stop(self) -> None:
        """Called once on the training thread after a `stop`: end the framework's loop after this batch."""
