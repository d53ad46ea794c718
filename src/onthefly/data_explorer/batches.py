"""Batch structure: splitting a user's batch into inputs and targets, sizing, moving and slicing it.

A collated batch can be a tensor, a tuple/list (namedtuples included), a mapping, a dataclass or
any object with attributes. These helpers walk such structures without knowing the user's types.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, MutableMapping
from typing import Any, Callable, NamedTuple

import torch

# Field names that hold the supervision signal in mapping- or attribute-style batches.
TARGET_KEYS: tuple[str, ...] = ("labels", "label", "targets", "target", "y")
# Field names that hold the model input, in order of preference, for models that take one tensor.
INPUT_KEYS: tuple[str, ...] = (
    "input",
    "inputs",
    "x",
    "input_ids",
    "pixel_values",
    "features",
    "image",
    "images",
    "data",
)

_SCALAR_TYPES = (str, bytes, int, float, bool, complex, type(None))


class BatchParts(NamedTuple):
    """A batch seen as `model(first, *rest...)` plus the targets a loss compares outputs to.

    `targets` is the default guess (the element after `first`, or the target-named field);
    `call_batch_loss` refines it once it knows how many elements the model consumes.
    """

    first: Any
    rest: tuple[Any, ...]
    targets: Any


def is_namedtuple(obj: Any) -> bool:
    """True for instances of classes made by `collections.namedtuple` / `typing.NamedTuple`."""
    return isinstance(obj, tuple) and hasattr(type(obj), "_fields")


def _is_attribute_batch(obj: Any) -> bool:
    if isinstance(obj, (torch.Tensor, Mapping, list, tuple, *_SCALAR_TYPES)):
        return False
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return True
    return hasattr(obj, "__dict__") and not isinstance(obj, type) and not callable(obj)


def batch_fields(batch: Any) -> dict[str, Any] | None:
    """The named fields of a mapping, dataclass or attribute-style batch; None for other shapes."""
    if isinstance(batch, Mapping):
        return {str(k): v for k, v in batch.items()}
    if not _is_attribute_batch(batch):
        return None
    if dataclasses.is_dataclass(batch):
        return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return {k: v for k, v in vars(batch).items() if not k.startswith("_")}


def split_batch(batch: Any) -> BatchParts:
    """Split a batch into (first, rest, targets).

    - tensor: `(batch, (), None)` — an input-only batch (autoencoders, loss(outputs, batch));
    - tuple/list/namedtuple: `(b[0], b[1:], b[1] or None)`;
    - mapping/dataclass/object: targets from the first field named like a target
      (`labels`, `label`, `targets`, `target`, `y`); `first` is a dict of the other fields.
    """
    if isinstance(batch, (list, tuple)):
        if len(batch) == 0:
            raise ValueError("cannot split an empty batch (a list/tuple with no elements)")
        rest = tuple(batch[1:])
        return BatchParts(batch[0], rest, rest[0] if rest else None)
    fields = batch_fields(batch)
    if fields is None:
        return BatchParts(batch, (), None)
    target_key = next((k for k in TARGET_KEYS if k in fields), None)
    inputs = {k: v for k, v in fields.items() if k != target_key}
    if not inputs:
        raise ValueError(
            f"batch of type {type(batch).__name__} has no input fields besides the target "
            f"{target_key!r} (fields: {sorted(fields)})"
        )
    return BatchParts(inputs, (), fields[target_key] if target_key is not None else None)


def _walk(value: Any, leaf: Callable[[Any], tuple[bool, Any]]) -> Any:
    """Rebuild a batch structure, letting `leaf` replace any value it claims (returns (True, new))."""
    claimed, out = leaf(value)
    if claimed:
        return out
    if isinstance(value, _SCALAR_TYPES):
        return value
    if is_namedtuple(value):
        return type(value)(*(_walk(v, leaf) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_walk(v, leaf) for v in value)
    if isinstance(value, Mapping):
        mapped = {k: _walk(v, leaf) for k, v in value.items()}
        if type(value) is dict or not isinstance(value, MutableMapping):
            return mapped
        rebuilt = copy.copy(value)
        for k, v in mapped.items():
            rebuilt[k] = v
        return rebuilt
    if _is_attribute_batch(value):
        rebuilt = copy.copy(value)
        for k, v in (batch_fields(value) or {}).items():
            setattr(rebuilt, k, _walk(v, leaf))
        return rebuilt
    return value


def map_batch(batch: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """Apply `fn` to every tensor in a batch structure, rebuilding containers of the same kind.

    Traversal order is deterministic (containers in order, mapping keys in insertion order), so
    two walks over the same batch meet the tensors in the same order.
    """
    return _walk(batch, lambda v: (True, fn(v)) if isinstance(v, torch.Tensor) else (False, None))


def iter_tensors(batch: Any) -> list[torch.Tensor]:
    """Every tensor in a batch, in `map_batch` order."""
    found: list[torch.Tensor] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        found.append(t)
        return t

    map_batch(batch, keep)
    return found


def batch_size_of(batch: Any) -> int:
    """The number of samples in a batch: the leading dimension of its first tensor with one."""
    head = batch[0] if isinstance(batch, (list, tuple)) and batch else batch
    if isinstance(head, torch.Tensor) and head.dim() > 0:
        return int(head.shape[0])  # the common case, without walking the batch
    for t in iter_tensors(batch):
        if t.dim() > 0:
            return int(t.shape[0])
    if isinstance(batch, (list, tuple)) and batch and all(isinstance(v, _SCALAR_TYPES) for v in batch):
        return len(batch)
    raise ValueError(
        f"cannot tell the batch size of a {type(batch).__name__}: it holds no tensor with a "
        "leading (batch) dimension"
    )


def move_to_device(batch: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """The batch with every tensor on `device` (tensors already there are returned as they are)."""
    device = torch.device(device)
    if isinstance(batch, tuple) and type(batch) is tuple and all(isinstance(t, torch.Tensor) for t in batch):
        if all(t.device == device for t in batch):
            return batch  # the common case: nothing to move, nothing to rebuild
    return map_batch(batch, lambda t: t.to(device, non_blocking=non_blocking))


def _is_per_sample_list(value: Any, n: int) -> bool:
    return (
        isinstance(value, (list, tuple))
        and not is_namedtuple(value)
        and len(value) == n
        and all(isinstance(v, _SCALAR_TYPES) for v in value)
    )


def has_per_sample_python_values(batch: Any, n: int) -> bool:
    """True when the batch carries per-sample Python values (e.g. a list of strings) besides tensors."""
    if _is_per_sample_list(batch, n):
        return True
    if isinstance(batch, (list, tuple)):
        return any(has_per_sample_python_values(v, n) for v in batch)
    fields = batch_fields(batch)
    if fields is not None:
        return any(has_per_sample_python_values(v, n) for v in fields.values())
    return False


def select_sample(batch: Any, i: int, n: int) -> Any:
    """A batch of one sample: position `i` of a batch of `n`, batch dimension kept.

    Tensors whose leading dimension is `n` are sliced `[i:i+1]`; lists of `n` Python values
    become one-element lists; everything else (shared tensors, scalars) is kept whole.
    """
    if not 0 <= i < n:
        raise IndexError(f"sample position {i} is outside a batch of {n}")

    def pick(value: Any) -> tuple[bool, Any]:
        if isinstance(value, torch.Tensor):
            return True, (value[i : i + 1] if value.dim() > 0 and value.shape[0] == n else value)
        if _is_per_sample_list(value, n):
            return True, type(value)([value[i]])
        return False, None

    return _walk(batch, pick)
