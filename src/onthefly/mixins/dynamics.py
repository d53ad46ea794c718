"""Training dynamics recorded by the session: every training sample scored at fixed points.

Opt-in with `SessionConfig(dynamics_every_epochs=1)` (and/or `dynamics_every_steps=N`): at each
such point — an epoch end, or every N optimizer steps, in every runtime — the run's training
samples are scored once more (one extra forward pass per sample, eval mode, RNG left as it was)
and one record is appended to `runs/<run>/dynamics/`. Reports (`generate_report {metric}`) and
fork selections (`selection.metric`) then read the per-sample views over the records: mean
loss, confidence, variability, correctness, forgetting, AUM and the "likely mislabelled" score
(see docs/data_explorer.md). The points depend only on steps and epochs, so the figures are the
same on a re-run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..control.errors import CommandError, ErrorCode

#: Names of the per-sample views a report or a fork may ask for (`loss` is a fresh scan instead).
DYNAMICS_METRICS = ("mean_loss", "loss_std", "confidence", "variability", "correctness", "forgetting", "aum",
                    "mislabel")


@dataclass
class DynamicsState:
    """What DynamicsMixin owns: the schedule (None: off) and one recorder per run."""

    schedule: Any = None
    recorders: dict[str, Any] = field(default_factory=dict)
    failures: int = 0


class DynamicsMixin:
    """Owns `self.dynamics` (a `DynamicsState`)."""

    def _init_dynamics(self) -> None:
        cfg = self.cfg
        schedule = None
        if cfg.dynamics_every_epochs is not None or cfg.dynamics_every_steps is not None:
            from ..data_explorer import DynamicsSchedule

            schedule = DynamicsSchedule(every_epochs=cfg.dynamics_every_epochs, every_steps=cfg.dynamics_every_steps)
        self.dynamics = DynamicsState(schedule=schedule)

    def dynamics_recorder(self, run_id: str | None = None) -> Any:
        """The run's recorder (its folder `runs/<run>/dynamics`), opened on first use."""
        run_id = run_id or self.cfg.run_name
        recorder = self.dynamics.recorders.get(run_id)
        if recorder is None:
            from ..data_explorer import DynamicsRecorder

            recorder = self.dynamics.recorders[run_id] = DynamicsRecorder(self.storage.run_dir(run_id) / "dynamics")
        return recorder

    def maybe_record_dynamics(self, *, epoch_end: bool, epoch: int) -> None:
        """At a boundary: take a record if the schedule says so (a failure is logged, training goes on)."""
        schedule = self.dynamics.schedule
        if schedule is None or self.model is None or self.loss_fn is None:
            return
        recorder = self.dynamics_recorder()
        step = int(self.state.step)
        if not schedule.due(step=step, epoch=epoch, epoch_end=epoch_end, last_step=recorder.last_step):
            return
        from ..data_explorer import DynamicsError, ScanCancelled

        subset = self.active_subset
        data = self.scan_loader() if subset is None else self.loader_over(subset)
        try:
            record = recorder.record(self.model, data, self.loss_fn, step=step, epoch=epoch,
                                     device=self.resolve_device(), amp=self.cfg.amp,
                                     cancel=lambda: self.lifecycle.stop_requested)
        except (DynamicsError, ScanCancelled, ValueError, RuntimeError) as exc:
            self.dynamics.failures += 1
            self.log(f"[dynamics] record at step {step} skipped: {type(exc).__name__}: {exc}", level="warn")
            return
        self.emit("dynamics_recorded", step=step, epoch=epoch, record=record.number, samples=record.samples,
                  elapsed_s=record.elapsed_s)

    def dynamics_summary(self, run_id: str) -> Any:
        """The per-sample views over a run's records (`bad_payload` when none were recorded)."""
        recorder = self.dynamics_recorder(run_id)
        if recorder.num_records == 0:
            hint = ("set SessionConfig(dynamics_every_epochs=1) to record them" if self.dynamics.schedule is None
                    else "none has been taken yet")
            raise CommandError(f"run {run_id!r} has no training-dynamics records ({hint})", ErrorCode.BAD_PAYLOAD)
        return recorder.summary()

    def dynamics_values(self, run_id: str, metric: str, *, harder_is_higher: bool = False
                        ) -> tuple[np.ndarray, np.ndarray]:
        """(values, root-dataset indices) of a dynamics view; oriented higher = harder when asked."""
        from ..data_explorer import DynamicsError

        summary = self.dynamics_summary(run_id)
        try:
            values = summary.hardness(metric) if harder_is_higher else summary.metric(metric).astype(np.float64)
        except DynamicsError as exc:
            raise CommandError(f"metric {metric!r}: {exc}", ErrorCode.BAD_PAYLOAD) from exc
        return np.asarray(values, dtype=np.float64), np.asarray(summary.indices, dtype=np.int64)
