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
    return np.unique(chosen), {"kind": "quantile", "from": q_from, "to": q_to, "lo": lo, "hi": hi}


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


def by_kmeans(columns: list[np.ndarray], losses: np.ndarray, indices: np.ndarray, *, k: int,
              target_clusters: list[int] | None, feature: str) -> tuple[np.ndarray, dict[str, Any]]:
    """k-means over the standardised feature columns (dead columns dropped); the chosen clusters
    (default: the hardest one)."""
    from ..data_explorer import FeatureScalingError, cluster_embeddings, select_hard_clusters, standardize_features

    try:
        features = standardize_features(np.concatenate(columns, axis=1))
    except FeatureScalingError as exc:
        raise CommandError(f"payload.selection.feature: {exc}", ErrorCode.BAD_PAYLOAD) from exc
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
