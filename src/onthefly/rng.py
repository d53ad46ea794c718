"""RNG state: capture and restore python, numpy, torch and CUDA generators, checkpoint-safe.

The state is turned into plain ints, lists and tensors so a checkpoint holding it loads with
`torch.load(weights_only=True)`; restoring checks every part before touching any generator.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng_state", "restore_rng_state"]

log = logging.getLogger("onthefly.checkpoints")


def capture_rng_state() -> dict[str, Any]:
    """Return python, numpy, torch and CUDA RNG states in a form `weights_only` loading accepts.

    numpy's legacy state tuple holds a uint32 array and Python's holds a tuple of ints; both are
    turned into plain ints, lists and int64 tensors so the checkpoint needs no unsafe pickling.
    """
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    cuda_states: list[torch.Tensor] = []
    if torch.cuda.is_available():
        cuda_states = [state.clone() for state in torch.cuda.get_rng_state_all()]
    return {
        "python": {"version": int(py_version), "state": list(py_internal), "gauss": py_gauss},
        "numpy": {
            "bit_generator": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64).copy()),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": cuda_states,
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Set python, numpy, torch (and CUDA when present) RNGs from `capture_rng_state()` output."""
    if not isinstance(state, Mapping):
        raise TypeError(f"RNG state must be a dict, got {type(state).__name__}")
    missing = [key for key in ("python", "numpy", "torch") if key not in state]
    if missing:
        raise ValueError(f"RNG state is missing {missing}; expected keys python, numpy, torch, cuda")
    unknown = sorted(set(state) - {"python", "numpy", "torch", "cuda"})
    if unknown:
        raise ValueError(f"RNG state has unknown keys {unknown}; expected python, numpy, torch, cuda")

    py_state = _python_rng_tuple(state["python"])
    np_state = _numpy_rng_tuple(state["numpy"])
    torch_state = state["torch"]
    if not isinstance(torch_state, torch.Tensor) or torch_state.dtype != torch.uint8:
        raise ValueError(f"RNG state 'torch' must be a uint8 tensor, got {_describe(torch_state)}")
    cuda_states = state.get("cuda", [])
    if not isinstance(cuda_states, (list, tuple)) or not all(
        isinstance(s, torch.Tensor) and s.dtype == torch.uint8 for s in cuda_states
    ):
        raise ValueError("RNG state 'cuda' must be a list of uint8 tensors")

    random.setstate(py_state)
    np.random.set_state(np_state)
    torch.set_rng_state(torch_state.detach().cpu())
    _restore_cuda_rng(list(cuda_states))


def _python_rng_tuple(value: Any) -> tuple[Any, ...]:
    if not isinstance(value, Mapping) or not {"version", "state", "gauss"} <= set(value):
        raise ValueError("RNG state 'python' must be a dict with keys version, state, gauss")
    internal = value["state"]
    if not isinstance(internal, (list, tuple)) or not all(isinstance(v, int) for v in internal):
        raise ValueError("RNG state 'python.state' must be a list of ints")
    return (int(value["version"]), tuple(internal), value["gauss"])


def _numpy_rng_tuple(value: Any) -> tuple[Any, ...]:
    needed = {"bit_generator", "keys", "pos", "has_gauss", "cached_gaussian"}
    if not isinstance(value, Mapping) or not needed <= set(value):
        raise ValueError(f"RNG state 'numpy' must be a dict with keys {sorted(needed)}")
    keys = value["keys"]
    if not isinstance(keys, torch.Tensor) or keys.dim() != 1:
        raise ValueError(f"RNG state 'numpy.keys' must be a 1-d tensor, got {_describe(keys)}")
    return (
        str(value["bit_generator"]),
        keys.detach().cpu().numpy().astype(np.uint32),
        int(value["pos"]),
        int(value["has_gauss"]),
        float(value["cached_gaussian"]),
    )


def _restore_cuda_rng(states: list[torch.Tensor]) -> None:
    if not states:
        return
    if not torch.cuda.is_available():
        log.warning(
            "checkpoint carries CUDA RNG state for %d device(s) but CUDA is not available here; "
            "CUDA randomness is not restored",
            len(states),
        )
        return
    count = torch.cuda.device_count()
    if count != len(states):
        log.warning(
            "checkpoint carries CUDA RNG state for %d device(s), this process sees %d; "
            "restoring the first %d",
            len(states),
            count,
            min(count, len(states)),
        )
    for index, cuda_state in enumerate(states[:count]):
        torch.cuda.set_rng_state(cuda_state.detach().cpu(), index)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
