"""Deterministic data order: loader policies, epoch forwarding, and mid-epoch repositioning.

Policies (SessionConfig.data_order_policy):
- `user`: the loader is left alone. To resume mid-epoch in a fresh process, the RNG state at the
  start of the epoch is kept in the checkpoint; the epoch's iterator is re-created from it and the
  consumed batches are skipped.
- `epoch_reseed`: the sampler is replaced by an `EpochSeededRandomSampler` (order = f(seed, epoch))
  and the loader's generator is reseeded every epoch, so worker seeds are reproducible too.
- `fixed_order`: the same seeded order every epoch.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from ..checkpoints import capture_rng_state, restore_rng_state
from ..sampler_utils import (
    EpochSeededRandomSampler,
    clone_loader,
    forward_epoch,
    loader_is_shuffled,
    make_worker_init_fn,
)


class DeterminismMixin:
    """Applies the data-order policy to the train loader and repositions it after a load."""

    def _init_determinism(self) -> None:
        self._epoch_start: dict[str, Any] | None = None
        self._resume: dict[str, Any] | None = None  # set by a checkpoint load, consumed by the next epoch iterator
        self._managed_sampler: EpochSeededRandomSampler | None = None
        self._effective_policy = self.cfg.data_order_policy

    @property
    def effective_data_order_policy(self) -> str:
        """The policy in force (a managed policy falls back to `user` for loaders it cannot manage)."""
        return self._effective_policy

    @property
    def base_seed(self) -> int:
        return int(self.cfg.seed) if self.cfg.seed is not None else 0

    def prepare_train_loader(self, loader: Any) -> Any:
        """Apply the policy to a (new) train loader; returns the loader the loop should use."""
        self._managed_sampler = None
        policy = self.cfg.data_order_policy
        self._effective_policy = policy
        if policy == "user" or not isinstance(loader, DataLoader):
            return loader
        if isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
            self._effective_policy = "user"
            self.log(
                f"data_order_policy {policy!r} needs a map-style dataset with batch_size; "
                "keeping the loader's own order",
                level="warn",
            )
            return loader
        sampler = EpochSeededRandomSampler(
            len(loader.dataset), seed=self.base_seed, shuffle=loader_is_shuffled(loader) or policy == "fixed_order"
        )
        generator = torch.Generator()
        generator.manual_seed(self.base_seed)
        managed = clone_loader(
            loader,
            sampler=sampler,
            generator=generator,
            worker_init_fn=make_worker_init_fn(self.base_seed, loader.worker_init_fn),
        )
        self._managed_sampler = sampler
        return managed

    def _data_state(self) -> dict[str, Any]:
        return {
            "policy": self._effective_policy,
            "epoch_start": self._epoch_start,
            "sampler": self._managed_sampler.state_dict() if self._managed_sampler is not None else None,
        }

    def _schedule_resume(self, data_state: dict[str, Any], rng: dict[str, Any] | None) -> None:
        """Remember how to reposition the loader; applied when the loop next opens an epoch."""
        self._resume = {"data": data_state, "rng": rng}
        self.request_reposition()

    def open_epoch_iterator(self, loader: Any, epoch: int, skip_batches: int) -> Iterator[Any]:
        """An iterator over `loader` for `epoch`, positioned after `skip_batches` consumed batches."""
        resume, self._resume = self._resume, None
        # The checkpoint's RNG is put back after the iterator is positioned, unless it had to be
        # restored before creating the iterator (the checkpoint predates this epoch's iterator).
        restore_after = resume.get("rng") if resume is not None else None
        forward_epoch(loader, 0 if self._effective_policy == "fixed_order" else epoch)
        sampler = self._managed_sampler
        if sampler is not None:
            sampler.set_epoch(0 if self._effective_policy == "fixed_order" else epoch)
            if loader.generator is not None:
                loader.generator.manual_seed(self.base_seed * 1_000_003 + epoch)
            if skip_batches:
                sampler.skip(skip_batches * loader.batch_size)
            self._epoch_start = None
            iterator = iter(loader)
        else:
            gen = getattr(loader, "generator", None)
            saved = (resume.get("data") or {}).get("epoch_start") if resume is not None else None
            if resume is not None:
                if saved is not None and saved.get("epoch") == epoch:
                    # Re-create the epoch's order from the RNG as it was when the epoch began.
                    restore_rng_state(saved["rng"])
                    if saved.get("generator") is not None and isinstance(gen, torch.Generator):
                        gen.set_state(saved["generator"])
                elif resume.get("rng") is not None:
                    # The checkpoint was taken before this epoch's iterator existed.
                    restore_rng_state(resume["rng"])
                    restore_after = None
            self._epoch_start = {
                "epoch": epoch,
                "rng": capture_rng_state(),
                "generator": gen.get_state() if isinstance(gen, torch.Generator) else None,
            }
            iterator = iter(loader)
            for _ in range(skip_batches):
                try:
                    next(iterator)
                except StopIteration:
                    break
        if restore_after is not None:
            restore_rng_state(restore_after)
        return iterator
