"""What every merge strategy shares: the state-dict checks and the per-key combination rules."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

StateDict = Mapping[str, Tensor]

FloatRule = Callable[[str, list[Tensor]], Tensor]

INTEGER_DTYPES = frozenset(
    getattr(torch, name)
    for name in ("uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64")
    if hasattr(torch, name)
)

class MergeError(ValueError):
    """The inputs of a merge cannot be combined; the message names the key or argument at fault."""

def as_state_dict_list(state_dicts: Any, what: str = "state_dicts") -> list[StateDict]:
    """Return `state_dicts` as a non-empty list of mappings, or raise `MergeError` saying why."""
    if isinstance(state_dicts, Mapping):
        raise MergeError(f"{what} must be a sequence of state dicts, got a single mapping")
    if isinstance(state_dicts, (str, bytes)) or not isinstance(state_dicts, Iterable):
        raise MergeError(f"{what} must be a sequence of state dicts, got {type(state_dicts).__name__}")
    items = list(state_dicts)
    if not items:
        raise MergeError(f"{what} is empty: a merge needs at least one state dict")
    for i, sd in enumerate(items):
        if not isinstance(sd, Mapping):
            raise MergeError(f"{what}[{i}] must be a mapping of name -> tensor, got {type(sd).__name__}")
    return items

def _kind(key: str, tensor: Tensor) -> str:
    """Classify a state-dict entry as "float", "int" or "bool"; other dtypes are refused."""
    if tensor.is_floating_point():
        return "float"
    if tensor.dtype == torch.bool:
        return "bool"
    if tensor.dtype in INTEGER_DTYPES:
        return "int"
    raise MergeError(f"key {key!r}: dtype {tensor.dtype} cannot be merged (float, integer or bool only)")

def _check_labelled(state_dicts: Sequence[StateDict], labels: Sequence[str]) -> None:
    """Check keys, tensor types, shapes and dtypes of every input against the first one."""
    first, first_label = state_dicts[0], labels[0]
    for key, value in first.items():
        if not isinstance(value, Tensor):
            raise MergeError(f"key {key!r} in {first_label} is a {type(value).__name__}, not a tensor")
        _kind(key, value)
    for sd, label in zip(state_dicts[1:], labels[1:]):
        missing = [k for k in first if k not in sd]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise MergeError(f"key {missing[0]!r} is in {first_label} but missing from {label}{more}")
        extra = [k for k in sd if k not in first]
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise MergeError(f"key {extra[0]!r} is in {label} but missing from {first_label}{more}")
        for key, ref in first.items():
            other = sd[key]
            if not isinstance(other, Tensor):
                raise MergeError(f"key {key!r} in {label} is a {type(other).__name__}, not a tensor")
            if other.shape != ref.shape:
                raise MergeError(
                    f"key {key!r}: shape {tuple(ref.shape)} in {first_label} "
                    f"but {tuple(other.shape)} in {label}"
                )
            if other.dtype != ref.dtype:
                raise MergeError(
                    f"key {key!r}: dtype {ref.dtype} in {first_label} but {other.dtype} in {label}"
                )

def check_compatible(state_dicts: Sequence[Mapping[str, Tensor]]) -> None:
    """Raise `MergeError` unless the state dicts share keys, shapes and mergeable dtypes."""
    items = as_state_dict_list(state_dicts)
    _check_labelled(items, [f"state dict {i}" for i in range(len(items))])

def check_base_and_parents(base: StateDict, state_dicts: Any) -> list[StateDict]:
    """Validate a base plus its fine-tuned parents; return `[base, *parents]`."""
    if not isinstance(base, Mapping):
        raise MergeError(f"base must be a mapping of name -> tensor, got {type(base).__name__}")
    parents = as_state_dict_list(state_dicts)
    items = [base, *parents]
    _check_labelled(items, ["base", *(f"state dict {i}" for i in range(len(parents)))])
    return items

def normalised_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """Return weights that sum to one; `None` means equal weights."""
    if weights is None:
        return [1.0 / count] * count
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Iterable):
        raise MergeError(f"weights must be a sequence of numbers, got {type(weights).__name__}")
    values = list(weights)
    if len(values) != count:
        raise MergeError(f"got {len(values)} weights for {count} state dicts")
    out: list[float] = []
    for i, w in enumerate(values):
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise MergeError(f"weights[{i}] must be a number, got {type(w).__name__}")
        if not math.isfinite(w) or w < 0:
            raise MergeError(f"weights[{i}] must be finite and non-negative, got {w}")
        out.append(float(w))
    total = math.fsum(out)
    if total <= 0:
        raise MergeError("weights sum to zero: at least one weight must be positive")
    return [w / total for w in out]

def finite_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MergeError(f"{name} must be a finite number, got {value!r}")
    return float(value)

def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MergeError(f"{name} must be a positive integer, got {value!r}")
    return value

def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype floating-point arithmetic runs in: float64 stays float64, the rest use float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32

def _merge_discrete(kind: str, key: str, items: Sequence[StateDict]) -> Tensor:
    """Integer counters take the element-wise max; bool buffers copy the reference input."""
    ref = items[0][key]
    if kind == "bool":
        return ref.clone()
    return torch.stack([sd[key].to(ref.device) for sd in items]).amax(dim=0)

def combine(
    items: Sequence[StateDict],
    float_rule: FloatRule,
    *,
    keys: Callable[[str], bool] | None = None,
) -> dict[str, Tensor]:
    """Apply `float_rule` to every floating key of already-validated `items`.

    `float_rule(key, values)` gets each input's tensor moved to the reference device and cast to
    the work dtype, and must return a new tensor. Keys rejected by `keys` are copied from the
    reference input unchanged.
    """
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for key, ref in items[0].items():
            if keys is not None and not keys(key):
                out[key] = ref.detach().clone()
                continue
            kind = _kind(key, ref)
            if kind != "float":
                out[key] = _merge_discrete(kind, key, items)
                continue
            work = work_dtype(ref.dtype)
            values = [sd[key].detach().to(device=ref.device, dtype=work) for sd in items]
            merged = float_rule(key, values).to(ref.dtype)
            shared = {v.data_ptr() for v in values} | {ref.data_ptr()}
            if merged.data_ptr() in shared:  # a rule that returned an input: never alias it
                merged = merged.clone()
            out[key] = merged
    return out

def weighted_sum(values: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    acc = values[0] * weights[0]
    for value, weight in zip(values[1:], weights[1:]):
        acc = acc + value * weight
    return acc
