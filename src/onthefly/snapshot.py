"""Host snapshots: a copy of training state (model, optimizer, RNG, ...) detached and on the CPU.

Taken while a run is paused, so a background writer can serialise it while training goes on
mutating the originals.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

__all__ = ["IMMUTABLE_LEAVES", "snapshot_to_host"]

IMMUTABLE_LEAVES = (
    type(None), bool, int, float, complex, str, bytes, torch.Size, torch.dtype, torch.device
)


_IMMUTABLE_TYPES = frozenset(IMMUTABLE_LEAVES)


def snapshot_to_host(obj: Any) -> Any:
    """Deep-copy a nested dict/list/tuple structure with every tensor detached, cloned, on CPU.

    The copy is independent of the originals, so training may keep mutating them while a writer
    thread serialises the copy. CUDA tensors are copied with `non_blocking=True` and the devices
    involved are synchronised once at the end, not once per tensor.
    """
    cuda_devices: set[int] = set()
    memo: dict[int, torch.Tensor] = {}
    result = _snapshot(obj, cuda_devices, memo)
    for index in sorted(cuda_devices):
        torch.cuda.synchronize(index)
    return result


def _snapshot(obj: Any, cuda_devices: set[int], memo: dict[int, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        # The same tensor object seen twice (tied entries) stays one tensor in the copy.
        cached = memo.get(id(obj))
        if cached is not None:
            return cached
        source = obj.detach()
        if source.device.type == "cpu":
            copied = source.clone()
        elif source.device.type == "cuda":
            copied = source.to("cpu", non_blocking=True)
            cuda_devices.add(source.device.index if source.device.index is not None else 0)
        else:
            copied = source.to("cpu")
        memo[id(obj)] = copied
        return copied
    if isinstance(obj, IMMUTABLE_LEAVES):
        return obj
    if type(obj) is dict:
        return {key: _snapshot(value, cuda_devices, memo) for key, value in obj.items()}
    if isinstance(obj, dict):
        # OrderedDict, defaultdict, ...: keep the type and its extra state (default_factory).
        duplicate = copy.copy(obj)
        for key, value in obj.items():
            duplicate[key] = _snapshot(value, cuda_devices, memo)
        return duplicate
    if type(obj) is list:
        return [_snapshot(value, cuda_devices, memo) for value in obj]
    if type(obj) is tuple:
        if all(type(value) in _IMMUTABLE_TYPES for value in obj):
            return obj  # e.g. Python's RNG state: 625 ints
        return tuple(_snapshot(value, cuda_devices, memo) for value in obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_snapshot(value, cuda_devices, memo) for value in obj))
    return copy.deepcopy(obj)
