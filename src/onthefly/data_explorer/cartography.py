"""Per-sample views over recorded training dynamics: dataset cartography (mean confidence,
variability, correctness; Swayamdipta et al. 2020), forgetting events (Toneva et al. 2019),
area under the margin (Pleiss et al. 2020), loss statistics, and a "likely mislabelled" score.

Every view is computed over a chosen set of records (all by default), streaming over samples in
chunks, so memory stays bounded however many records there are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .cutoff import CutoffResult, suggest_cutoff
from .errors import DynamicsError

if TYPE_CHECKING:
    from .dynamics import DynamicsRecorder

# Higher value = a harder / more suspicious sample?  (Reports and fork selection orient with it.)
HARDER_WHEN_HIGHER: dict[str, bool] = {
    "loss": True,
    "mean_loss": True,
    "loss_std": True,
    "confidence": False,
    "variability": True,
    "correctness": False,
    "forgetting": True,
    "aum": False,
    "mislabel": True,
}
METRICS = tuple(HARDER_WHEN_HIGHER)
CLASSIFICATION_METRICS = ("confidence", "variability", "correctness", "forgetting", "aum")
_CHUNK_VALUES = 1 << 20  # values of one column read at a time (records × samples)


@dataclass
class DynamicsSummary:
    """The views of one set of records, aligned with `indices` (root-dataset indices, ascending).

    Loss views (every task): `loss` (the last selected record), `mean_loss`, `loss_std`.
    Classification views (None for loss-only tasks), over the selected records:
    `confidence` (mean probability of the labelled class), `variability` (its standard
    deviation), `correctness` (fraction of records where the prediction equals the label),
    `forgetting` (correct → incorrect transitions between consecutive records), `never_learned`
    (never predicted correctly), `aum` (mean margin: labelled-class logit minus the largest
    other logit). `mislabel` is the "likely mislabelled" score: the loss averaged over the
    records (for cross-entropy, the mean of -log p_true: cartography's confidence on a log
    scale, which keeps separating wrong labels after the model has memorised them). Higher =
    more suspect.
    """

    indices: np.ndarray
    labels: np.ndarray | None
    records: list[int]
    steps: list[int]
    epochs: list[int | None]
    task: str
    loss: np.ndarray
    mean_loss: np.ndarray
    loss_std: np.ndarray
    confidence: np.ndarray | None = None
    variability: np.ndarray | None = None
    correctness: np.ndarray | None = None
    forgetting: np.ndarray | None = None
    never_learned: np.ndarray | None = None
    aum: np.ndarray | None = None
    mislabel: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.indices)

    def metric(self, name: str) -> np.ndarray:
        """The named view (one of `METRICS`), aligned with `indices`."""
        if name not in HARDER_WHEN_HIGHER:
            raise KeyError(f"unknown dynamics metric {name!r}; expected one of {list(METRICS)}")
        values = getattr(self, name)
        if values is None:
            raise DynamicsError(f"metric {name!r} needs a classification task (this one is {self.task}: "
                                "only loss views were recorded)")
        return values

    def hardness(self, name: str) -> np.ndarray:
        """The named view oriented so that higher = harder / more suspect (float64)."""
        values = self.metric(name).astype(np.float64)
        return values if HARDER_WHEN_HIGHER[name] else -values

    def suggested_cutoff(self) -> CutoffResult:
        """Which samples to flag as likely mislabelled, without being told how many: a
        two-component mixture on the log of `mislabel` (`cutoff.suggest_cutoff(losses=...)`)."""
        return suggest_cutoff(losses=self.mislabel, indices=self.indices)

    def to_report(self, name: str) -> dict[str, Any]:
        """A JSON-ready per-sample report of one view: `values`, `sample_indices`, `metric`, `meta`
        (non-finite values become None)."""
        values = self.metric(name).astype(np.float64)
        return {
            "metric": name,
            "values": [float(v) if np.isfinite(v) else None for v in values],
            "sample_indices": self.indices.tolist(),
            "meta": {
                "samples": len(self),
                "records": len(self.records),
                "first_step": self.steps[0],
                "last_step": self.steps[-1],
                "task": self.task,
                "higher_is_harder": HARDER_WHEN_HIGHER[name],
            },
        }


def _select_records(count: int, records: Any) -> list[int]:
    if count == 0:
        raise DynamicsError("nothing recorded yet: no dynamics to summarise")
    if records is None:
        return list(range(count))
    if isinstance(records, slice):
        chosen = list(range(count))[records]
    else:
        try:
            chosen = sorted({int(r) for r in records})
        except (TypeError, ValueError) as exc:
            raise TypeError(f"records must be None, a slice or a sequence of record numbers, got {records!r}") from exc
        bad = [r for r in chosen if not 0 <= r < count]
        if bad:
            raise IndexError(f"record numbers {bad[:5]} out of range: {count} records exist")
    if not chosen:
        raise DynamicsError(f"the selection {records!r} matches none of the {count} records")
    return chosen


def summarize_dynamics(recorder: DynamicsRecorder, records: Any = None) -> DynamicsSummary:
    """Compute every view over `records` (None: all; a slice or record numbers, taken in order)."""
    all_records = recorder.records
    chosen = _select_records(len(all_records), records)
    n = len(recorder.indices)
    classification = bool(recorder.task and recorder.task.is_classification)
    out: dict[str, np.ndarray] = {"loss": np.empty(n, np.float32), "mean_loss": np.empty(n, np.float32),
                                  "loss_std": np.empty(n, np.float32)}
    if classification:
        for name in ("confidence", "variability", "correctness", "aum"):
            out[name] = np.empty(n, np.float32)
        out["forgetting"] = np.empty(n, np.int32)
        out["never_learned"] = np.empty(n, bool)
    rows = list(chosen)
    step = max(1, _CHUNK_VALUES // len(rows))
    with np.errstate(invalid="ignore", divide="ignore"):
        for a in range(0, n, step):
            b = min(n, a + step)
            loss = _block(recorder, "loss", rows, a, b)
            out["loss"][a:b] = loss[-1]
            out["mean_loss"][a:b] = _nanmean(loss)
            out["loss_std"][a:b] = _nanstd(loss)
            if not classification:
                continue
            p = _block(recorder, "p_true", rows, a, b)
            out["confidence"][a:b] = _nanmean(p)
            out["variability"][a:b] = _nanstd(p)
            correct = _block(recorder, "correct", rows, a, b) > 0
            out["correctness"][a:b] = correct.mean(axis=0)
            out["forgetting"][a:b] = (correct[:-1] & ~correct[1:]).sum(axis=0)
            out["never_learned"][a:b] = ~correct.any(axis=0)
            out["aum"][a:b] = _nanmean(_block(recorder, "margin", rows, a, b))
    mislabel = out["mean_loss"].copy()
    picked = [all_records[r] for r in chosen]
    return DynamicsSummary(
        indices=recorder.indices,
        labels=recorder.labels,
        records=chosen,
        steps=[r.step for r in picked],
        epochs=[r.epoch for r in picked],
        task=recorder.task.kind if recorder.task else "unknown",
        mislabel=mislabel.astype(np.float32),
        **out,
    )


def _block(recorder: DynamicsRecorder, column: str, rows: list[int], start: int, stop: int) -> np.ndarray:
    return recorder.read_block(column, rows, start, stop).astype(np.float64)


def _nanmean(x: np.ndarray) -> np.ndarray:
    """Mean over records ignoring NaN (NaN where every record is NaN), without warnings."""
    ok = ~np.isnan(x)
    count = ok.sum(axis=0)
    total = np.where(ok, x, 0.0).sum(axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _nanstd(x: np.ndarray) -> np.ndarray:
    """Population standard deviation over records ignoring NaN (as in dataset cartography)."""
    mean = _nanmean(x)
    ok = ~np.isnan(x)
    count = ok.sum(axis=0)
    sq = np.where(ok, (x - mean) ** 2, 0.0).sum(axis=0)
    return np.where(count > 0, np.sqrt(sq / np.maximum(count, 1)), np.nan)
