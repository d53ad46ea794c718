"""Which samples a fork trains on: selection rules over per-sample scores (pure, no session state).

Every rule returns root-dataset indices (sorted, unique) plus a small JSON-ready description of
how they were chosen, which goes into the child run's manifest.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..control.errors import CommandError, ErrorCode

KMEANS_FEATURES = ("loss", "margin", "embed")


def quantile_bounds(losses: np.ndarray, q_from: float, q_to: float) -> tuple[float, float]:
    """Linear-interpolated percentiles of the finite losses (q clamped to [0, 1])."""
    finite = losses[np.isfinite(losses)]
    if finite.size == 0:
        raise CommandError("every per-sample loss is NaN or infinite; nothing to select", ErrorCode.FAILED)
    lo, hi = (min(max(float(q), 0.0), 1.0) for q in (q_from, q_to))
    if lo > hi:
        raise CommandError(f"payload.selection.from ({q_from}) is greater than payload.selection.to ({q_to})",
                           ErrorCode.BAD_PAYLOAD)
    return float(np.quantile(finite, lo)), float(np.quantile(finite, hi))


def by_quantile(losses: np.ndarray, indices: np.ndarray, q_from: float | None, q_to: float | None
                ) -> tuple[np.ndarray, dict[str, Any]]:
    q_from = 0.85 if q_from is None else q_from
    q_to = 1.0 if q_to is None else q_to
    lo, hi = quantile_bounds(losses, q_from, q_to)
    chosen = indices[(losses >= lo) & (losses <= hi)]
    return np.unique(chosen), {"kind": "quantile", "from": q_from, "to": q_to, "lo": lo, "hi": hi,
                               "metric": "per_sample_loss"}


def by_region(losses: np.ndarray, indices: np.ndarray, min_loss: float | None, max_loss: float | None
              ) -> tuple[np.ndarray, dict[str, Any]]:
    lo = -np.inf if min_loss is None else float(min_loss)
    hi = np.inf if max_loss is None else float(max_loss)
    if lo > hi:
        raise CommandError(f"minLoss ({lo}) is greater than maxLoss ({hi})", ErrorCode.BAD_PAYLOAD)
    chosen = indices[(losses >= lo) & (losses <= hi)]
    return np.unique(chosen), {"kind": "region", "minLoss": min_loss, "maxLoss": max_loss}


def parse_features(feature: str) -> list[str]:
    """`loss|margin|embed` (any non-empty combination) as a list; unknown names are `bad_payload`."""
    wanted = [f.strip() for f in feature.split("|") if f.strip()]
    unknown = sorted(set(wanted) - set(KMEANS_FEATURES))
    if unknown or not wanted:
        raise CommandError(f"payload.selection.feature: unknown feature(s) {unknown or wanted}; "
                           "use loss, margin, embed joined by '|'", ErrorCode.BAD_PAYLOAD)
    return wanted


def scale_features(features: np.ndarray) -> np.ndarray:
    """Features ready for k-means: constant columns dropped, each column standardised robustly.

    A column's spread is its interquartile range, or its standard deviation when the IQR is 0
    (a mostly-constant column, e.g. a ReLU unit that rarely fires); columns whose spread is
    (nearly) zero carry no information and are dropped instead of being divided by ~0. A single
    remaining column is replaced by its rank in [0, 1]. Non-finite values become the column median.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D array, got shape {x.shape}")
    x = x.copy()
    for j in range(x.shape[1]):
        col = x[:, j]
        bad = ~np.isfinite(col)
        if bad.any():
            good = col[~bad]
            col[bad] = np.median(good) if good.size else 0.0
    q1, median, q3 = np.percentile(x, [25, 50, 75], axis=0)
    spread = q3 - q1
    std = x.std(axis=0)
    spread = np.where(spread > 0, spread, std)
    scale = np.maximum(np.maximum(np.abs(median), np.abs(x).max(axis=0)), 1.0)
    keep = spread > 1e-9 * scale
    if not keep.any():
        return np.zeros((len(x), 1))
    x, median, spread = x[:, keep], median[keep], spread[keep]
    if x.shape[1] == 1:
        ranks = np.argsort(np.argsort(x[:, 0], kind="stable"), kind="stable").astype(np.float64)
        return (ranks / max(len(ranks) - 1, 1))[:, None]
    return (x - median) / spread


def by_kmeans(columns: list[np.ndarray], losses: np.ndarray, indices: np.ndarray, *, k: int,
              target_clusters: list[int] | None, feature: str) -> tuple[np.ndarray, dict[str, Any]]:
    """k-means over the scaled feature columns; the chosen clusters (default: the hardest one)."""
    from ..data_explorer import cluster_embeddings, select_hard_clusters

    features = scale_features(np.concatenate(columns, axis=1))
    k = min(k, len(indices))
    if k < 1:
        raise CommandError("payload.selection.k must be >= 1", ErrorCode.BAD_PAYLOAD)
    finite = np.where(np.isfinite(losses), losses, np.nanmax(np.where(np.isfinite(losses), losses, np.nan)))
    labels = cluster_embeddings(features.astype(np.float32), k=k, seed=0)
    ranked = select_hard_clusters(labels, finite, indices)
    known = {c.cluster for c in ranked}
    targets = list(target_clusters) if target_clusters else [ranked[0].cluster]
    unknown = sorted(set(targets) - known)
    if unknown:
        raise CommandError(f"payload.selection.target_clusters: no cluster {unknown}; clusters are "
                           f"{sorted(known)}", ErrorCode.BAD_PAYLOAD)
    chosen = np.unique(np.concatenate([c.indices for c in ranked if c.cluster in set(targets)]))
    meta = {"kind": "kmeans", "k": k, "feature": feature, "target_clusters": targets,
            "clusters": [{"cluster": c.cluster, "size": c.size, "mean_loss": c.mean_loss} for c in ranked]}
    return chosen, meta
