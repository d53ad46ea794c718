"""Principled cut-offs for "which samples are suspect": per-class confident-learning thresholds
on class probabilities (Northcutt et al. 2021), and a two-component mixture on a 1-D score such
as a loss (Arazo et al. 2019; DivideMix). Each returns the flagged indices, the threshold(s)
and an estimated noise rate, with the rule that produced them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

CL_FLAG_RULES = ("prune_by_noise_rate", "off_diagonal")
# Ashman's D below this: the two fitted components overlap too much to be told apart.
MIN_SEPARATION = 2.0
# BIC(one Gaussian) - BIC(two) below this: the data do not support a second population.
MIN_BIC_GAIN = 10.0


class CutoffError(ValueError):
    """The scores or probabilities given cannot support a cut-off (shape, values, too few samples)."""


@dataclass
class CutoffResult:
    """A suggested flagged set.

    `flagged`: dataset indices (from `indices`, else positions), ascending. `noise_rate`: the
    estimated fraction of samples with a wrong label / in the high-score population (a model
    estimate, not `len(flagged) / n`). `threshold`: the score above which samples are flagged
    (mixture); `class_thresholds`: per-class probability thresholds (confident learning).
    `rule` says in words what was done; `meta` holds the fitted quantities. `warning` is set
    when the fit itself says the cut-off is not to be trusted (e.g. the mixture's components
    overlap: the scores are not bimodal).
    """

    method: str
    flagged: np.ndarray
    noise_rate: float
    rule: str
    threshold: float | None = None
    class_thresholds: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    warning: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (non-finite numbers become None)."""
        def num(v: Any) -> Any:
            return float(v) if v is not None and np.isfinite(v) else None

        return {
            "method": self.method,
            "flagged": self.flagged.tolist(),
            "flagged_count": len(self.flagged),
            "noise_rate": num(self.noise_rate),
            "threshold": num(self.threshold),
            "class_thresholds": None if self.class_thresholds is None else [num(t) for t in self.class_thresholds],
            "rule": self.rule,
            "warning": self.warning,
            "meta": self.meta,
        }


def _names(indices: Any, n: int) -> np.ndarray:
    if indices is None:
        return np.arange(n, dtype=np.int64)
    idx = np.asarray(indices).reshape(-1)
    if len(idx) != n:
        raise CutoffError(f"indices ({len(idx)}) and scores ({n}) differ in length")
    return idx.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# confident learning


def confident_learning(
    probs: Any, labels: Any, indices: Any = None, *, flag: str = "prune_by_noise_rate"
) -> CutoffResult:
    """Per-class confident-learning cut-off on (N, C) class probabilities and given labels.

    Rule: class `j`'s threshold `t_j` is the mean probability of class `j` over the samples
    labelled `j`. A sample labelled `i` is *confidently* of class `j` when `j` is its most
    probable class among those with `p_j >= t_j` (none: not counted). The counts form the
    confident joint `C[i, j]`; calibrated so that row `i` sums to the number labelled `i` and
    normalised, it estimates the joint of given and true labels `Q`, and the noise rate is its
    off-diagonal mass. `flag="prune_by_noise_rate"` flags, for each `i != j`, the `round(N * Q[i,
    j])` samples labelled `i` with the largest `p_j - p_i`; `flag="off_diagonal"` flags the
    samples counted off the diagonal of `C`.

    Assumptions: the probabilities are out-of-sample (cross-validated, or from before the model
    memorised its labels) and roughly calibrated per class; label errors depend on the true
    class, not on the individual sample.
    """
    if flag not in CL_FLAG_RULES:
        raise CutoffError(f"flag must be one of {CL_FLAG_RULES}, got {flag!r}")
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise CutoffError(f"probs must be an (N, C) array with C >= 2, got shape {p.shape}")
    n, c = p.shape
    y = np.asarray(labels).reshape(-1)
    if len(y) != n:
        raise CutoffError(f"labels ({len(y)}) and probs ({n}) differ in length")
    if y.size and not np.issubdtype(y.dtype, np.integer) and not np.all(np.equal(np.mod(y, 1), 0)):
        raise CutoffError(f"labels must be class indices, got dtype {y.dtype} with fractional values")
    y = y.astype(np.int64)
    if n == 0:
        raise CutoffError("no samples given")
    if y.min() < 0 or y.max() >= c:
        raise CutoffError(f"labels must lie in [0, {c}), got values {int(y.min())}..{int(y.max())}")
    if not np.isfinite(p).all() or (p < 0).any():
        raise CutoffError("probs must be finite and non-negative")
    sums = p.sum(axis=1, keepdims=True)
    if (sums <= 0).any():
        raise CutoffError("a row of probs sums to 0")
    p = p / sums
    names = _names(indices, n)
    counts = np.bincount(y, minlength=c)
    # t_j: mean self-confidence of class j (no sample labelled j: nothing can be confidently j).
    thresholds = np.full(c, np.inf)
    present = counts > 0
    thresholds[present] = np.bincount(y, weights=p[np.arange(n), y], minlength=c)[present] / counts[present]
    above = p >= thresholds[None, :]
    masked = np.where(above, p, -np.inf)
    confident_class = masked.argmax(axis=1)
    counted = above.any(axis=1)
    joint = np.zeros((c, c), dtype=np.int64)
    np.add.at(joint, (y[counted], confident_class[counted]), 1)
    calibrated = joint.astype(np.float64)
    row = calibrated.sum(axis=1, keepdims=True)
    calibrated = np.where(row > 0, calibrated / np.maximum(row, 1) * counts[:, None], 0.0)
    total = calibrated.sum()
    q = calibrated / total if total > 0 else calibrated
    noise_rate = float(q.sum() - np.trace(q))
    if flag == "off_diagonal":
        picked = counted & (confident_class != y)
    else:
        picked = np.zeros(n, dtype=bool)
        for i in range(c):
            members = np.flatnonzero(y == i)
            for j in range(c):
                k = int(round(n * q[i, j])) if i != j else 0
                if k <= 0 or members.size == 0:
                    continue
                margin = p[members, j] - p[members, i]
                order = np.argsort(-margin, kind="stable")[: min(k, members.size)]
                picked[members[order]] = True
    return CutoffResult(
        method=f"confident_learning/{flag}",
        flagged=np.sort(names[picked]),
        noise_rate=noise_rate,
        rule=("per-class thresholds t_j = mean p_j over samples labelled j; confident joint of "
              f"given vs. confident class, calibrated; flagged by {flag.replace('_', ' ')}"),
        class_thresholds=thresholds,
        meta={"confident_joint": joint.tolist(), "joint_estimate": q.tolist(),
              "per_class_noise": (1.0 - np.diag(q) / np.maximum(q.sum(axis=1), 1e-300)).tolist(),
              "samples": n, "classes": c},
    )


# ---------------------------------------------------------------------------------------------
# two-component mixture on a score


def _normal_logpdf(x: np.ndarray, mean: float, var: float) -> np.ndarray:
    return -0.5 * (np.log(2 * np.pi * var) + (x - mean) ** 2 / var)


# EM starts: the high component initialised as the top fraction of the scores, for each of these.
_START_FRACTIONS = (0.5, 0.25, 0.1, 0.05)


def _em_two_gaussians(x: np.ndarray, weights: np.ndarray, means: np.ndarray, variances: np.ndarray,
                      floor: float, max_iter: int, tol: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, float]:
    previous = -np.inf
    likelihood = -np.inf
    it = 0
    for it in range(1, max_iter + 1):
        log_joint = np.stack([np.log(weights[k]) + _normal_logpdf(x, means[k], variances[k]) for k in range(2)])
        top = log_joint.max(axis=0)
        log_norm = top + np.log(np.exp(log_joint - top).sum(axis=0))
        likelihood = float(log_norm.mean())
        if likelihood - previous < tol:
            break
        previous = likelihood
        resp = np.exp(log_joint - log_norm)
        mass = resp.sum(axis=1)
        if (mass < 1e-9 * len(x)).any():
            break  # one component collapsed: keep the last parameters
        weights = mass / len(x)
        means = (resp * x).sum(axis=1) / mass
        variances = np.maximum((resp * (x - means[:, None]) ** 2).sum(axis=1) / mass, floor)
    return weights, means, variances, it, likelihood


def _fit_two_gaussians(
    x: np.ndarray, max_iter: int, tol: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, float]:
    """EM for a 1-D mixture of two Gaussians: the best (highest likelihood) of a few deterministic
    starts, each splitting the scores at a quantile (a single start often settles on modelling
    the skew of the majority instead of a small second population)."""
    floor = max(float(x.var()) * 1e-6, 1e-12)
    best: tuple[np.ndarray, np.ndarray, np.ndarray, int, float] | None = None
    for fraction in _START_FRACTIONS:
        cut = np.quantile(x, 1.0 - fraction)
        high = x > cut
        if high.sum() < 2 or (~high).sum() < 2:
            continue
        parts = (x[~high], x[high])
        fit = _em_two_gaussians(
            x, np.array([p.size / x.size for p in parts]), np.array([p.mean() for p in parts]),
            np.array([max(float(p.var()), floor) for p in parts]), floor, max_iter, tol,
        )
        if best is None or fit[4] > best[4] + 1e-12:
            best = fit
    if best is None:
        raise CutoffError("the scores take too few distinct values to fit two components")
    return best

def _crossing(weights: np.ndarray, means: np.ndarray, variances: np.ndarray, lo: int, hi: int) -> float:
    """The score between the two means where both components are equally likely."""
    a = 0.5 / variances[lo] - 0.5 / variances[hi]
    b = means[hi] / variances[hi] - means[lo] / variances[lo]
    const = (0.5 * means[lo] ** 2 / variances[lo] - 0.5 * means[hi] ** 2 / variances[hi]
             + np.log(weights[hi] / weights[lo]) - 0.5 * np.log(variances[hi] / variances[lo]))
    # a x^2 + b x + const = 0 where log(w_hi N_hi) = log(w_lo N_lo)
    if abs(a) < 1e-15:
        roots = [-const / b] if abs(b) > 1e-15 else []
    else:
        disc = b * b - 4 * a * const
        roots = [] if disc < 0 else [(-b - np.sqrt(disc)) / (2 * a), (-b + np.sqrt(disc)) / (2 * a)]
    inside = [r for r in roots if means[lo] <= r <= means[hi]]
    if inside:
        return float(inside[0])
    # No crossing between the means: one component dominates the whole interval.
    post_hi_at_lo = np.log(weights[hi]) + _normal_logpdf(np.array([means[lo]]), means[hi], variances[hi])[0] > \
        np.log(weights[lo]) + _normal_logpdf(np.array([means[lo]]), means[lo], variances[lo])[0]
    return float(means[lo] if post_hi_at_lo else means[hi])


def mixture_cutoff(
    scores: Any, indices: Any = None, *, log: bool = False, max_iter: int = 500, tol: float = 1e-9
) -> CutoffResult:
    """Fit two Gaussians to a 1-D score (higher = more suspect) and flag the high component.

    Rule: EM on the finite scores (on `log(score)` with `log=True`, for positive scores such as
    losses); the threshold is where the two components are equally likely, between their means;
    samples at or above it are flagged. The noise rate is the weight of the high component.
    Non-finite scores are left out of the fit; +inf is flagged, NaN never. `meta["separation"]`
    is Ashman's D of the two components and `meta["bic_gain"]` how much better two components
    explain the scores than one (BIC difference); when D < 2 or the gain is < 10 the scores are
    not clearly bimodal and `warning` says so.

    Assumptions: the samples form two populations (clean, suspect) whose scores are each roughly
    normal (after the log), and the suspect one scores higher.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    names = _names(indices, len(s))
    finite = np.isfinite(s)
    x = s[finite]
    if log:
        if (x <= 0).any():
            raise CutoffError("log=True needs positive scores (a loss of 0 or less was given)")
        x = np.log(x)
    if x.size < 4 or np.ptp(x) <= 0:
        raise CutoffError(f"need at least 4 finite, not all equal scores to fit a mixture (got {x.size})")
    weights, means, variances, iterations, likelihood = _fit_two_gaussians(x, max_iter, tol)
    one = float(_normal_logpdf(x, float(x.mean()), max(float(x.var()), 1e-12)).mean())
    bic_gain = float(x.size * 2 * (likelihood - one) - 3 * np.log(x.size))  # 5 parameters against 2
    lo, hi = (0, 1) if means[0] <= means[1] else (1, 0)
    cut = _crossing(weights, means, variances, lo, hi)
    threshold = float(np.exp(cut)) if log else cut
    picked = (s >= threshold) & ~np.isnan(s)
    separation = float(np.sqrt(2.0) * abs(means[hi] - means[lo]) / np.sqrt(variances[lo] + variances[hi]))
    warning = None
    if separation < MIN_SEPARATION or bic_gain < MIN_BIC_GAIN:
        warning = (f"the scores are not clearly bimodal (Ashman's D = {separation:.2f}, needs >= "
                   f"{MIN_SEPARATION:g}; BIC gain of a second component {bic_gain:.1f}, needs >= {MIN_BIC_GAIN:g}): "
                   "the flagged set is unreliable")
    return CutoffResult(
        method="mixture" + ("/log" if log else ""),
        flagged=np.sort(names[picked]),
        noise_rate=float(weights[hi]),
        rule=("two-Gaussian mixture fitted by EM to the " + ("log " if log else "") + "scores; flagged "
              "where the high component is at least as likely as the low one"),
        threshold=threshold,
        meta={"weights": weights[[lo, hi]].tolist(), "means": means[[lo, hi]].tolist(),
              "stds": np.sqrt(variances[[lo, hi]]).tolist(), "iterations": iterations,
              "left_out_non_finite": int((~finite).sum()), "samples": len(s), "separation": separation,
              "bic_gain": bic_gain},
        warning=warning,
    )


def suggest_cutoff(
    *,
    probs: Any = None,
    labels: Any = None,
    losses: Any = None,
    scores: Any = None,
    indices: Any = None,
) -> CutoffResult:
    """The report's suggested cut-off: confident learning when class probabilities and labels are
    given, else a mixture on `losses` (fitted on log-loss) or on any other `scores`."""
    given = [name for name, v in (("probs", probs), ("losses", losses), ("scores", scores)) if v is not None]
    if len(given) != 1:
        raise CutoffError(f"give exactly one of probs (with labels), losses or scores; got {given or 'none'}")
    if probs is not None:
        if labels is None:
            raise CutoffError("probs need the given labels")
        return confident_learning(probs, labels, indices)
    if losses is not None:
        arr = np.asarray(losses, dtype=np.float64).reshape(-1)
        finite = np.isfinite(arr)
        if (arr[finite] < 0).any():
            return mixture_cutoff(arr, indices)  # a loss that can be negative: no log scale
        # A loss of exactly 0 (a perfect fit) would break the log: lift it to the smallest positive loss.
        positive = arr[finite & (arr > 0)]
        floor = positive.min() if positive.size else 1.0
        return mixture_cutoff(np.where(finite & (arr == 0), floor, arr), indices, log=True)
    return mixture_cutoff(scores, indices)
