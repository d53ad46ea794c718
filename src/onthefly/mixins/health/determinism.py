"""`determinism_health`: whether the run can resume bit-exactly, and why not."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from ...checkpoints import capture_rng_state
from ...sampler_utils import EpochSeededRandomSampler, has_custom_batch_sampler, sampler_is_shuffled
from ..command import command
from .common import has_state, health_text, in_health_window, loader_samplers, train_sampler_of


@dataclass
class DeterminismHealth:
    """No fields (extra keys are ignored)."""


def determinism_report(session: Any) -> dict[str, Any]:
    notes: list[str] = []
    ok = True
    try:
        rng = capture_rng_state()  # exactly what a checkpoint stores
        torch_rng_len = int(rng["torch"].numel())
        numpy_state_len = int(rng["numpy"]["keys"].numel())
        cuda_rng_devices = len(rng["cuda"])
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:
        ok = False
        torch_rng_len = numpy_state_len = cuda_rng_devices = None
        notes.append(f"capturing the RNG state failed ({type(exc).__name__}: {exc}); checkpoints cannot "
                     "restore it")
    policy = session.cfg.data_order_policy
    loader = session.train_loader
    sampler = train_sampler_of(loader)
    ours = isinstance(sampler, EpochSeededRandomSampler)
    effective = policy if policy != "user" and ours else "user"
    if policy != effective:
        notes.append(f"data_order_policy {policy!r} could not be applied to this loader; "
                     "its own order is used (policy 'user')")
    if loader is None:
        notes.append("no train loader is bound yet")
    elif effective != "user":
        notes.append(f"the session owns the data order: epoch e is a permutation seeded by "
                     f"(seed={sampler.seed}, epoch={0 if effective == 'fixed_order' else 'e'}), "
                     "so any resume re-creates it exactly")
    else:
        ok = user_order_notes(loader, sampler, notes) and ok
    device = session.resolve_device()
    det_algos = torch.are_deterministic_algorithms_enabled()
    cudnn = torch.backends.cudnn
    if device.type == "cuda":
        if not det_algos:
            notes.append("warning: torch.are_deterministic_algorithms_enabled() is False on CUDA: some kernels "
                         "(e.g. atomics in scatter/index_add, some convolutions) are not bit-reproducible")
        if cudnn.benchmark:
            notes.append("warning: torch.backends.cudnn.benchmark is True: cuDNN may pick different "
                         "algorithms after a resume")
        if det_algos and not os.environ.get("CUBLAS_WORKSPACE_CONFIG"):
            notes.append("warning: CUBLAS_WORKSPACE_CONFIG is not set; deterministic cuBLAS needs "
                         "':4096:8' or ':16:8'")
    if session.cfg.seed is None:
        notes.append("no base seed is set: a run from scratch is not repeatable, though resuming from "
                     "a checkpoint still is (the RNG state is saved)")
    val_sampler = train_sampler_of(session.val_loader)
    generation = getattr(session.console, "pause_generation", None)
    if generation is None:
        notes.append("pause_generation is not tracked by this session's console")
    sampler_state = sampler.state_dict() if ours else None
    reply = {
        "ok": ok,
        "notes": notes,
        "data_order_policy": policy,
        "effective_policy": effective,
        "session_managed": effective != "user",
        "handled": ok,
        "train_sampler": type(sampler).__name__ if sampler is not None else None,
        "train_sampler_is_ours": ours,
        "train_sampler_state": sampler_state,
        "train_sampler_has_state": has_state(sampler),
        "val_sampler_has_state": has_state(val_sampler),
        "torch_rng_len": torch_rng_len,
        "numpy_state_len": numpy_state_len,
        "cuda_rng_devices": cuda_rng_devices,
        "deterministic_algorithms": det_algos,
        "deterministic_algorithms_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn": {"enabled": bool(cudnn.enabled), "deterministic": bool(cudnn.deterministic),
                  "benchmark": bool(cudnn.benchmark)},
        "device": str(device),
        "base_seed": session.cfg.seed,
        "epoch": session.state.epoch,
        "batch_cursor": session.state.batch_in_epoch,
        "pause_generation": generation,
    }
    lines = [f"policy={policy} (effective {effective}), train sampler={reply['train_sampler']}"
             + (" (ours)" if ours else ""),
             f"base_seed={session.cfg.seed} epoch={session.state.epoch} batch_cursor={session.state.batch_in_epoch} "
             f"pause_generation={generation}",
             f"deterministic_algorithms={det_algos} cudnn.deterministic={reply['cudnn']['deterministic']} "
             f"cudnn.benchmark={reply['cudnn']['benchmark']}",
             f"bit-exact resume: {'yes' if ok else 'NO'}"]
    reply["text"] = health_text(session, "Determinism health", lines + notes)
    return reply


def user_order_notes(loader: Any, sampler: Any, notes: list[str]) -> bool:
    """Notes on a loader whose order the session leaves alone; False when resume cannot be exact."""
    if not isinstance(loader, DataLoader):
        if isinstance(loader, Iterator):
            notes.append(f"the train loader ({type(loader).__name__}) is a one-shot iterator: an epoch "
                         "cannot be re-created to resume mid-epoch")
            return False
        notes.append(f"the train loader is a {type(loader).__name__}, not a DataLoader: a resume re-creates "
                     "the epoch from the RNG state at its start and skips the consumed batches, which is "
                     "exact only if its order depends on nothing else")
        return True
    ok = True
    if isinstance(loader.dataset, IterableDataset):
        notes.append("the train dataset is an IterableDataset: a resume replays it from the epoch-start RNG "
                     "and skips consumed batches; exact only if its order depends on nothing else")
    own = [(s, s.generator) for s in loader_samplers(loader)
           if isinstance(getattr(s, "generator", None), torch.Generator) and s.generator is not loader.generator]
    for s, _ in own:
        ok = False
        notes.append(f"the train {type(s).__name__} draws from its own torch.Generator, which checkpoints "
                     "do not record: a resume in a fresh process would see another order (pass generator= "
                     "to the DataLoader instead, or use data_order_policy='epoch_reseed')")
    if has_custom_batch_sampler(loader) and has_state(loader.batch_sampler):
        notes.append(f"warning: the custom batch sampler {type(loader.batch_sampler).__name__} has a "
                     "state_dict the session does not save under policy 'user'")
    if ok and sampler_is_shuffled(sampler):
        if isinstance(loader.generator, torch.Generator):
            notes.append("shuffled with the loader's generator: the session records its state at each epoch "
                         "start, so a resume re-creates the epoch's order exactly")
        elif not own:
            notes.append("shuffled without a generator (order drawn from the global torch RNG): the session "
                         "records the RNG state at each epoch start, so a resume re-creates the epoch's "
                         "order exactly")
    if loader.num_workers > 0 and loader.persistent_workers:
        notes.append("warning: persistent_workers keeps worker RNG streams across epochs; random "
                     "augmentations after a mid-run resume in a fresh process can differ")
    return ok


class DeterminismHealthMixin:
    @command("determinism_health", DeterminismHealth, mutating=True,
             description="whether the run can resume bit-exactly, and why not")
    def cmd_determinism_health(self, p: DeterminismHealth) -> dict[str, Any]:
        return in_health_window(self, "determinism_health", lambda: determinism_report(self))
