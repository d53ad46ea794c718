"""Suggested cut-offs: confident learning on class probabilities, a two-Gaussian mixture on scores."""

from __future__ import annotations

import json

import numpy as np
import pytest

from onthefly.data_explorer import (
    CutoffError,
    confident_learning,
    mixture_cutoff,
    suggest_cutoff,
)


def _noisy_probs(n: int = 600, c: int = 3, noise: float = 0.1, seed: int = 0):
    """Out-of-sample-like probabilities that favour the true class, and labels with `noise` flipped."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, c, n)
    logits = rng.normal(0, 1, (n, c))
    logits[np.arange(n), true] += 3.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    flipped = np.zeros(n, bool)
    flipped[rng.choice(n, int(noise * n), replace=False)] = True
    given = true.copy()
    given[flipped] = (true[flipped] + rng.integers(1, c, flipped.sum())) % c
    return probs, given, flipped


def test_confident_learning_by_hand() -> None:
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]])
    labels = np.array([0, 0, 1, 1, 1])
    # t_0 = mean(0.9, 0.8) = 0.85; t_1 = mean(0.8, 0.7, 0.4) = 0.6333
    result = confident_learning(probs, labels, indices=[10, 11, 12, 13, 14], flag="off_diagonal")
    np.testing.assert_allclose(result.class_thresholds, [0.85, 1.9 / 3])
    # samples 1 (0.8 < t_0, 0.2 < t_1) and 4 (0.6 < t_0, 0.4 < t_1) are confidently nothing
    assert result.meta["confident_joint"] == [[1, 0], [0, 2]]
    assert result.flagged.tolist() == [] and result.noise_rate == 0.0
    probs[4] = [0.9, 0.1]  # now confidently class 0 although labelled 1
    result = confident_learning(probs, labels, indices=[10, 11, 12, 13, 14], flag="off_diagonal")
    np.testing.assert_allclose(result.class_thresholds, [0.85, 1.6 / 3])
    assert result.meta["confident_joint"] == [[1, 0], [1, 2]]
    assert result.flagged.tolist() == [14]
    # calibrated: row 0 [1, 0] / 1 * 2 labelled = [2, 0]; row 1 [1, 2] / 3 * 3 = [1, 2]; Q = that / 5
    assert result.noise_rate == pytest.approx(0.2)


def test_confident_learning_finds_flipped_labels_and_the_noise_rate() -> None:
    probs, given, flipped = _noisy_probs()
    result = confident_learning(probs, given)
    assert result.method == "confident_learning/prune_by_noise_rate"
    assert result.noise_rate == pytest.approx(0.1, abs=0.03)
    hits = flipped[result.flagged].sum()
    assert hits / len(result.flagged) > 0.85 and hits / flipped.sum() > 0.8
    off = confident_learning(probs, given, flag="off_diagonal")
    assert flipped[off.flagged].mean() > 0.8
    payload = result.to_dict()
    assert json.loads(json.dumps(payload)) == payload and payload["flagged_count"] == len(result.flagged)


def test_confident_learning_rejects_bad_input() -> None:
    probs, given, _ = _noisy_probs(30)
    with pytest.raises(CutoffError, match=r"\(N, C\) array with C >= 2"):
        confident_learning(probs[:, 0], given)
    with pytest.raises(CutoffError, match="labels must lie in \\[0, 3\\)"):
        confident_learning(probs, given + 3)
    with pytest.raises(CutoffError, match="differ in length"):
        confident_learning(probs, given[:10])
    bad = probs.copy()
    bad[0, 0] = np.nan
    with pytest.raises(CutoffError, match="finite and non-negative"):
        confident_learning(bad, given)
    with pytest.raises(CutoffError, match="fractional"):
        confident_learning(probs, given + 0.5)
    with pytest.raises(CutoffError, match="flag must be one of"):
        confident_learning(probs, given, flag="both")


def test_mixture_cutoff_separates_two_populations() -> None:
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(0, 1, 900), rng.normal(6, 1, 100)])
    result = mixture_cutoff(scores, indices=np.arange(1000) + 5000)
    assert result.noise_rate == pytest.approx(0.1, abs=0.01)
    assert 2.0 < result.threshold < 4.5
    assert set(result.flagged.tolist()) == set((np.flatnonzero(scores >= result.threshold) + 5000).tolist())
    assert np.mean(result.flagged >= 5900) > 0.97 and len(result.flagged) == pytest.approx(100, abs=5)
    again = mixture_cutoff(scores, indices=np.arange(1000) + 5000)
    assert again.threshold == result.threshold  # deterministic


def test_losses_are_cut_on_a_log_scale_and_non_finite_handled() -> None:
    rng = np.random.default_rng(1)
    losses = np.concatenate([np.exp(rng.normal(-4, 0.7, 450)), np.exp(rng.normal(0.5, 0.4, 50)),
                             [0.0, np.inf, np.nan]])
    result = suggest_cutoff(losses=losses)
    assert result.method == "mixture/log"
    assert 500 + 1 in result.flagged and 500 + 2 not in result.flagged and 500 not in result.flagged
    assert result.meta["left_out_non_finite"] == 2
    hits = np.isin(np.arange(450, 500), result.flagged).mean()
    assert hits > 0.95 and np.isin(np.arange(450), result.flagged).mean() < 0.02


def test_suggest_cutoff_dispatch_and_errors() -> None:
    probs, given, _ = _noisy_probs(60)
    assert suggest_cutoff(probs=probs, labels=given).method.startswith("confident_learning")
    assert suggest_cutoff(scores=np.r_[np.zeros(20), np.ones(5) * 4] + np.linspace(0, 0.1, 25)).method == "mixture"
    assert suggest_cutoff(losses=np.r_[-np.ones(20), np.ones(5) * 4] + np.linspace(0, 0.1, 25)).method == "mixture"
    with pytest.raises(CutoffError, match="exactly one of"):
        suggest_cutoff(probs=probs, losses=given)
    with pytest.raises(CutoffError, match="probs need the given labels"):
        suggest_cutoff(probs=probs)
    with pytest.raises(CutoffError, match="at least 4 finite, not all equal"):
        mixture_cutoff(np.ones(10))
    with pytest.raises(CutoffError, match="log=True needs positive scores"):
        mixture_cutoff(np.r_[0.0, 1, 2, 3, 4], log=True)


def test_scores_that_are_not_bimodal_carry_a_warning() -> None:
    for seed in range(4):
        rng = np.random.default_rng(seed)
        normal = mixture_cutoff(rng.normal(0, 1, 500))  # one population: a 2nd component is not worth it
        assert normal.meta["bic_gain"] < 10 and "not clearly bimodal" in normal.warning
        skewed = mixture_cutoff(rng.exponential(1, 500))  # one skewed population: the components overlap
        assert skewed.meta["separation"] < 2 and skewed.warning is not None
    rng = np.random.default_rng(0)
    clear = mixture_cutoff(np.concatenate([rng.normal(0, 1, 900), rng.normal(6, 1, 100)]))
    assert clear.warning is None and clear.meta["separation"] > 4 and clear.meta["bic_gain"] > 100
