"""standardize_features: dead and nearly dead columns dropped, the rest z-scored and bounded, so
k-means finds the real groups instead of isolating the few samples a sparse unit fires for."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onthefly.data_explorer import (
    FeatureScalingError,
    cluster_embeddings,
    fit_feature_scaling,
    standardize_features,
)


def _relu_features(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three groups in 4 informative columns, plus what a ReLU layer also produces: dead units
    (all 0), units that fire for 1% of samples with large values, and a constant unit."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(3), 200)
    centers = np.array([[0, 0, 0, 0], [3, 3, 0, 0], [0, 3, 3, 3]], dtype=float)
    informative = centers[groups] + rng.normal(0, 0.5, (600, 4))
    dead = np.zeros((600, 5))
    sparse = np.zeros((600, 6))
    for j in range(6):
        fire = rng.choice(600, 6, replace=False)
        sparse[fire, j] = rng.uniform(5, 50, 6)
    constant = np.full((600, 1), 0.7)
    return np.hstack([informative, dead, sparse, constant]), groups


def _iqr_scaled(x: np.ndarray) -> np.ndarray:
    """The scaling the fork's k-means used before: (x - Q1) / (Q3 - Q1 + 1e-12)."""
    q1, q3 = np.percentile(x, 25, axis=0), np.percentile(x, 75, axis=0)
    return (x - q1) / (q3 - q1 + 1e-12)


def _agreement(labels: np.ndarray, groups: np.ndarray) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(groups, labels))


def test_dead_columns_no_longer_make_single_sample_clusters() -> None:
    x, groups = _relu_features()
    before = cluster_embeddings(_iqr_scaled(x).astype(np.float32), k=3, seed=0)
    assert np.abs(_iqr_scaled(x)).max() > 1e9  # what the issue saw: values up to 2e9
    assert np.bincount(before, minlength=3).min() <= 10 and _agreement(before, groups) < 0.2

    z = standardize_features(x)
    after = cluster_embeddings(z, k=3, seed=0)
    assert z.shape == (600, 4) and z.dtype == np.float32
    assert np.bincount(after, minlength=3).min() >= 150
    assert _agreement(after, groups) > 0.95


def test_what_is_dropped_and_why() -> None:
    x, _ = _relu_features()
    x[:, 15] = np.nan  # the constant column becomes all-NaN
    scaling = fit_feature_scaling(x)
    assert scaling.kept.tolist() == [0, 1, 2, 3]
    assert {j: r for j, r in scaling.dropped.items()} == {
        **{j: "constant" for j in range(4, 9)}, **{j: "near_constant" for j in range(9, 15)}, 15: "non_finite"}
    z = scaling.transform(x)
    np.testing.assert_allclose(z.mean(0), 0, atol=0.05)
    np.testing.assert_allclose(z.std(0), 1, atol=0.05)
    keep_sparse = fit_feature_scaling(x[:, :15], max_mode_fraction=1.0)
    assert 9 in keep_sparse.kept and np.abs(keep_sparse.transform(x[:, :15])).max() == pytest.approx(5.0)


def test_one_column_nan_and_inf_and_bounds() -> None:
    loss = np.r_[np.linspace(0.0, 1.0, 98), np.inf, np.nan]
    z = standardize_features(loss)
    assert z.shape == (100, 1)
    assert z[98, 0] == pytest.approx(5.0) and z[99, 0] == 0.0
    assert np.all(np.diff(z[:98, 0]) > 0)  # order kept
    t = standardize_features(torch.tensor(loss[:98]), clip=None)
    np.testing.assert_allclose(t[:, 0], (loss[:98] - loss[:98].mean()) / loss[:98].std(), rtol=1e-5)


def test_nothing_to_cluster_on_is_a_clear_error() -> None:
    with pytest.raises(FeatureScalingError, match=r"all 3 feature column\(s\) were dropped \(constant\)"):
        standardize_features(np.ones((10, 3)))
    with pytest.raises(FeatureScalingError, match="at least 2 rows"):
        standardize_features(np.ones((1, 3)))
    with pytest.raises(ValueError, match=r"\(N,\) or \(N, D\)"):
        standardize_features(np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match="max_mode_fraction"):
        standardize_features(np.ones((4, 1)), max_mode_fraction=0.2)
    scaling = fit_feature_scaling(np.random.default_rng(0).normal(size=(10, 3)))
    with pytest.raises(ValueError, match="fitted on 3"):
        scaling.transform(np.ones((4, 2)))
