"""Weight-space merges: the parents' weights alone decide the result (SWA, adapters, task arithmetic, TIES)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .common import (
    MergeError,
    as_state_dict_list,
    check_base_and_parents,
    check_compatible,
    combine,
    finite_number,
    normalised_weights,
    weighted_sum,
)


def swa_merge(
    state_dicts: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | None = None
) -> dict[str, Tensor]:
    """Weighted mean of the parents (equal weights by default; weights are normalised to sum 1)."""
    items = as_state_dict_list(state_dicts)
    check_compatible(items)
    w = normalised_weights(weights, len(items))
    return combine(items, lambda _key, values: weighted_sum(values, w))

def adapter_merge(
    state_dicts: Sequence[Mapping[str, Tensor]],
    *,
    pattern: str = r"(adapter|lora)",
    weights: Sequence[float] | None = None,
) -> dict[str, Tensor]:
    """Average only the keys whose name matches `pattern` (case-insensitive search).

    Every other key is copied from the first parent, so the shared backbone stays exactly the
    first parent's. Raises `MergeError` when no key matches.
    """
    items = as_state_dict_list(state_dicts)
    check_compatible(items)
    try:
        regex = re.compile(pattern, re.IGNORECASE)
    except (re.error, TypeError) as exc:
        raise MergeError(f"pattern {pattern!r} is not a valid regular expression: {exc}") from exc
    matched = [key for key in items[0] if regex.search(key)]
    if not matched:
        sample = ", ".join(repr(k) for k in list(items[0])[:5])
        raise MergeError(f"no key matches adapter pattern {pattern!r} (keys start: {sample})")
    w = normalised_weights(weights, len(items))
    chosen = set(matched)
    return combine(items, lambda _key, values: weighted_sum(values, w), keys=chosen.__contains__)

def task_arithmetic_merge(
    base: Mapping[str, Tensor],
    state_dicts: Sequence[Mapping[str, Tensor]],
    *,
    scale: float = 1.0,
) -> dict[str, Tensor]:
    """Add the parents' task vectors to the base: base + scale * sum_i (theta_i - base)."""
    items = check_base_and_parents(base, state_dicts)
    scale = finite_number("scale", scale)

    def rule(_key: str, values: list[Tensor]) -> Tensor:
        base_value, parents = values[0], values[1:]
        delta = torch.stack([p - base_value for p in parents]).sum(dim=0)
        return base_value + scale * delta

    return combine(items, rule)

def _trim_to_top(taus: Tensor, density: float) -> Tensor:
    """Zero all but the `density` fraction of largest-magnitude entries in each row of `taus`.

    Ties at the cut are broken by position (earlier entries win), so the result is deterministic.
    """
    numel = taus.shape[1]
    keep = min(numel, max(1, math.ceil(round(density * numel, 9))))
    order = taus.abs().sort(dim=1, descending=True, stable=True).indices[:, :keep]
    mask = torch.zeros_like(taus, dtype=torch.bool).scatter_(1, order, True)
    return torch.where(mask, taus, torch.zeros_like(taus))

def ties_merge(
    base: Mapping[str, Tensor],
    state_dicts: Sequence[Mapping[str, Tensor]],
    *,
    density: float = 0.2,
    scale: float = 1.0,
) -> dict[str, Tensor]:
    """TIES merging: trim task vectors, elect a sign per element, average the agreeing parents.

    tau_i = theta_i - base is trimmed to its top-`density` fraction by magnitude (per tensor,
    at least one entry); the elected sign is sign(sum_i trimmed tau_i); the merged vector is the
    mean over parents whose trimmed tau is nonzero and has the elected sign (zero where none
    does); the result is base + scale * merged.
    """
    items = check_base_and_parents(base, state_dicts)
    density = finite_number("density", density)
    if not 0.0 < density <= 1.0:
        raise MergeError(f"density must be in (0, 1], got {density}")
    scale = finite_number("scale", scale)

    def rule(_key: str, values: list[Tensor]) -> Tensor:
        base_value, parents = values[0], values[1:]
        if base_value.numel() == 0:
            return base_value.clone()
        taus = torch.stack([p - base_value for p in parents]).reshape(len(parents), -1)
        trimmed = _trim_to_top(taus, density)
        elected = torch.sign(trimmed.sum(dim=0))
        agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
        count = agree.sum(dim=0)
        total = torch.where(agree, trimmed, torch.zeros_like(trimmed)).sum(dim=0)
        merged = total / count.clamp_min(1).to(total.dtype)
        return base_value + scale * merged.reshape(base_value.shape)

    return combine(items, rule)
