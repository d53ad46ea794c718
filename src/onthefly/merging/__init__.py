"""Model merging: pure functions that combine several state dicts into one.

Strategies: SWA (weighted mean), Fisher soup, adapter fusion, task arithmetic, TIES and a short
knowledge distillation. Nothing here touches files, sessions or the wire; the merge mixin loads the
parents, calls `merge_state_dicts` and loads the result.

Rules shared by every strategy (see docs/merging.md):

- Every state dict must have the same keys, shapes and dtypes, else `MergeError` naming the key.
- Floating-point tensors are combined in float32 (float64 when the input is float64) and cast back
  to the input dtype.
- Integer buffers (BatchNorm's `num_batches_tracked` and other counters) are never averaged: the
  result is the element-wise maximum over the inputs, in the integer dtype. Bool buffers take the
  value of the reference input.
- The reference input is the first state dict argument (the first parent, or the base for task
  arithmetic and TIES): each result tensor lives on the device of the reference's tensor.
- Results are new tensors; inputs are never mutated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from .common import MergeError, StateDict, as_state_dict_list, check_compatible
from .data import distill_merge, estimate_fisher, fisher_merge
from .weights import adapter_merge, swa_merge, task_arithmetic_merge, ties_merge

__all__ = [
    "MergeError",
    "STRATEGIES",
    "STRATEGY_ALIASES",
    "adapter_merge",
    "check_compatible",
    "distill_merge",
    "estimate_fisher",
    "fisher_merge",
    "merge_state_dicts",
    "resolve_strategy",
    "swa_merge",
    "task_arithmetic_merge",
    "ties_merge",
]


STRATEGIES: tuple[str, ...] = ("swa", "fisher", "adapter", "task_arithmetic", "ties", "distill")

# Names the reference dashboard sends for the same strategies.
STRATEGY_ALIASES: dict[str, str] = {
    "fisher_soup": "fisher",
    "adapter_fuse": "adapter",
    "distillation": "distill",
}

def resolve_strategy(strategy: str) -> str:
    """Return the canonical strategy name (case-insensitive, aliases allowed) or raise MergeError."""
    if not isinstance(strategy, str):
        raise MergeError(f"strategy must be a string, got {type(strategy).__name__}")
    name = strategy.strip().lower()
    name = STRATEGY_ALIASES.get(name, name)
    if name not in STRATEGIES:
        raise MergeError(f"unknown merge strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    return name

_KWARGS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # strategy: (required, optional)
    "swa": (frozenset(), frozenset({"weights"})),
    "fisher": (
        frozenset(),
        frozenset({"fishers", "eps", "model_factory", "loader", "loaders", "loss_fn", "forward",
                   "max_batches", "device"}),
    ),
    "adapter": (frozenset(), frozenset({"pattern", "weights"})),
    "task_arithmetic": (frozenset({"base"}), frozenset({"scale"})),
    "ties": (frozenset({"base"}), frozenset({"density", "scale"})),
    "distill": (
        frozenset({"model_factory", "loader"}),
        frozenset({"steps", "lr", "temperature", "forward", "device", "task", "seed", "weights"}),
    ),
}

_FISHER_DATA_KWARGS = ("model_factory", "loader", "loaders", "loss_fn", "forward", "max_batches")

def _check_kwargs(name: str, kwargs: Mapping[str, Any]) -> None:
    required, optional = _KWARGS[name]
    allowed = required | optional
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise MergeError(
            f"merge strategy {name!r} does not take {', '.join(unknown)}; "
            f"it takes: {', '.join(sorted(allowed)) or 'nothing'}"
        )
    missing = sorted(required - set(kwargs))
    if missing:
        raise MergeError(f"merge strategy {name!r} needs {', '.join(missing)}")

def _model_from_state(
    model_factory: Callable[[], nn.Module], state: StateDict, device: Any
) -> nn.Module:
    model = model_factory()
    if not isinstance(model, nn.Module):
        raise MergeError(f"model_factory must return a torch.nn.Module, got {type(model).__name__}")
    if device is not None:
        model = model.to(device)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise MergeError(f"a parent state dict does not fit model_factory()'s model: {exc}") from exc
    return model

def _fishers_from_data(
    items: Sequence[StateDict], kwargs: Mapping[str, Any]
) -> list[dict[str, Tensor]]:
    """Estimate each parent's Fisher with a fresh model from `model_factory` and its loader."""
    factory = kwargs.get("model_factory")
    if factory is None:
        raise MergeError(
            "merge strategy 'fisher' needs fishers=, or model_factory= with loader= (or loaders=) "
            "and loss_fn= (or forward=) to estimate them"
        )
    if ("loader" in kwargs) == ("loaders" in kwargs):
        raise MergeError(
            "merge strategy 'fisher' needs exactly one of loader= (shared) or loaders= (one per parent)"
        )
    if "loaders" in kwargs:
        loaders = list(kwargs["loaders"])
        if len(loaders) != len(items):
            raise MergeError(f"got {len(loaders)} loaders for {len(items)} state dicts")
    else:
        loaders = [kwargs["loader"]] * len(items)
    fishers = []
    for state, loader in zip(items, loaders):
        model = _model_from_state(factory, state, kwargs.get("device"))
        fishers.append(
            estimate_fisher(
                model,
                loader,
                kwargs.get("loss_fn"),
                max_batches=kwargs.get("max_batches", 32),
                device=kwargs.get("device"),
                forward=kwargs.get("forward"),
            )
        )
    return fishers

def merge_state_dicts(
    strategy: str, state_dicts: Sequence[Mapping[str, Tensor]], **kwargs: Any
) -> dict[str, Tensor]:
    """Merge `state_dicts` with the named strategy; keyword arguments go to that strategy.

    - swa: weights. adapter: pattern, weights.
    - fisher: fishers and eps; or, instead of fishers, model_factory + loader (or loaders, one per
      parent) + loss_fn (or forward) [+ max_batches, device] to estimate each parent's Fisher.
    - task_arithmetic: base, scale. ties: base, density, scale.
    - distill: model_factory + loader [+ steps, lr, temperature, forward, device, task, seed]; the
      teachers are the parents, the student starts from their SWA (with `weights`, if given).
    """
    name = resolve_strategy(strategy)
    _check_kwargs(name, kwargs)
    if name == "swa":
        return swa_merge(state_dicts, **kwargs)
    if name == "adapter":
        return adapter_merge(state_dicts, **kwargs)
    if name == "task_arithmetic":
        return task_arithmetic_merge(kwargs.pop("base"), state_dicts, **kwargs)
    if name == "ties":
        return ties_merge(kwargs.pop("base"), state_dicts, **kwargs)
    items = as_state_dict_list(state_dicts)
    check_compatible(items)
    if name == "fisher":
        fishers = kwargs.get("fishers")
        if fishers is None:
            fishers = _fishers_from_data(items, kwargs)
        elif any(k in kwargs for k in _FISHER_DATA_KWARGS):
            raise MergeError(
                "merge strategy 'fisher': pass either fishers= or the data to estimate them, not both"
            )
        return fisher_merge(items, fishers, eps=kwargs.get("eps", 1e-8))
    # distill
    factory = kwargs.pop("model_factory")
    loader = kwargs.pop("loader")
    device = kwargs.get("device")
    teachers = [_model_from_state(factory, state, device) for state in items]
    student = _model_from_state(factory, swa_merge(items, kwargs.pop("weights", None)), device)
    return distill_merge(student, teachers, loader, **kwargs)
