"""Feature scaling for clustering: `standardize_features` drops constant and near-constant
columns (dead ReLU units), standardises the rest safely and bounds every value, so that no
column and no single sample can dominate k-means distances.

Why not divide by an interquartile range: a ReLU unit that fires for 2% of samples has an IQR of
0, and dividing by it (plus an epsilon) sends those few samples to 1e9, where k-means gives them
a cluster of their own. Here such a column is dropped (its most common value covers more than
`max_mode_fraction` of the rows), and surviving columns are z-scored and clipped to ±`clip`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .spool import ChunkedArraySpool


class FeatureScalingError(ValueError):
    """No column is left to cluster on (all constant, near-constant or non-finite)."""


@dataclass
class FeatureScaling:
    """A fitted scaling: which columns are kept, their centre and scale, and why others were dropped.

    `dropped` maps a column number to its reason: `non_finite` (no finite value), `constant`
    (standard deviation at or below `atol + rtol * |mean|`) or `near_constant` (one value covers
    more than `max_mode_fraction` of the rows).
    """

    kept: np.ndarray
    center: np.ndarray
    scale: np.ndarray
    clip: float | None
    input_dims: int
    dropped: dict[int, str] = field(default_factory=dict)

    def transform(self, features: Any) -> np.ndarray:
        """Scale rows with the fitted parameters: float32 (N, len(kept)).

        NaN becomes 0 (the column centre); ±inf and values beyond ±`clip` become ±`clip`.
        """
        x = as_feature_matrix(features)
        if x.shape[1] != self.input_dims:
            raise ValueError(f"features have {x.shape[1]} columns; the scaling was fitted on {self.input_dims}")
        z = (np.asarray(x[:, self.kept], dtype=np.float64) - self.center) / self.scale
        z = np.nan_to_num(z, nan=0.0, posinf=np.inf, neginf=-np.inf)
        bound = self.clip if self.clip is not None else np.finfo(np.float32).max
        return np.clip(z, -bound, bound).astype(np.float32)


def as_feature_matrix(features: Any) -> np.ndarray:
    """An (N, D) array from an array, tensor, spool or sequence; (N,) becomes (N, 1)."""
    if isinstance(features, ChunkedArraySpool):
        features = features.to_numpy()
    elif isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    x = np.asarray(features)
    if x.ndim == 1:
        x = x.reshape(-1, 1)
    if x.ndim != 2:
        raise ValueError(f"features must be (N,) or (N, D), got shape {x.shape}")
    if x.size and not np.issubdtype(x.dtype, np.number):
        raise TypeError(f"features must be numeric, got dtype {x.dtype}")
    return x


def fit_feature_scaling(
    features: Any,
    *,
    max_mode_fraction: float = 0.95,
    clip: float | None = 5.0,
    rtol: float = 1e-6,
    atol: float = 1e-12,
) -> FeatureScaling:
    """Fit the scaling `standardize_features` applies (see its docstring for the rule)."""
    if not 0.5 <= max_mode_fraction <= 1.0:
        raise ValueError(f"max_mode_fraction must lie in [0.5, 1], got {max_mode_fraction}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")
    x = as_feature_matrix(features)
    n, d = x.shape
    if n < 2:
        raise FeatureScalingError(f"need at least 2 rows to scale features, got {n}")
    kept: list[int] = []
    centers: list[float] = []
    scales: list[float] = []
    dropped: dict[int, str] = {}
    for j in range(d):
        col = np.asarray(x[:, j], dtype=np.float64)
        finite = col[np.isfinite(col)]
        if finite.size < 2:
            dropped[j] = "non_finite"
            continue
        mean = float(finite.mean())
        std = float(finite.std())
        if std <= atol + rtol * abs(mean):
            dropped[j] = "constant"
            continue
        # A value held by more than half the rows is the median: count the rows equal to it.
        median = float(np.median(finite))
        if max_mode_fraction < 1.0 and np.count_nonzero(finite == median) > max_mode_fraction * finite.size:
            dropped[j] = "near_constant"
            continue
        kept.append(j)
        centers.append(mean)
        scales.append(std)
    if not kept:
        reasons = sorted(set(dropped.values()))
        raise FeatureScalingError(
            f"all {d} feature column(s) were dropped ({', '.join(reasons)}); there is nothing to cluster on"
        )
    return FeatureScaling(np.asarray(kept, dtype=np.int64), np.asarray(centers), np.asarray(scales), clip, d, dropped)


def standardize_features(
    features: Any,
    *,
    max_mode_fraction: float = 0.95,
    clip: float | None = 5.0,
    rtol: float = 1e-6,
    atol: float = 1e-12,
) -> np.ndarray:
    """Features ready for k-means: float32 (N, D') with D' <= D informative columns.

    Per column: values that are not finite are left out of the fit; a column with no finite
    values, a standard deviation at or below `atol + rtol * |mean|`, or one value covering more
    than `max_mode_fraction` of the rows (a dead or nearly dead unit) is dropped; the others
    become `(x - mean) / std`, clipped to ±`clip` (NaN → 0, ±inf → ±clip). A single column is
    treated the same way. Raises `FeatureScalingError` when no column is left.
    """
    scaling = fit_feature_scaling(features, max_mode_fraction=max_mode_fraction, clip=clip, rtol=rtol, atol=atol)
    return scaling.transform(features)
