"""The training data of a run: the training set, the loader training iterates, and its position.

One path for every runtime:
- **The training set** is what the user's train loader draws (through `Subset`s, `random_split`
  and custom samplers), named by indices of the innermost dataset. Reports, region lookups,
  exports and fork selections all speak these indices, so a selection means the same samples
  from report to export to fork.
- **The loader training iterates** is the user's loader, or a clone of it over
  `Subset(root dataset, indices)` for a fork's subset (`rebind_train_loader`, the only place a
  train loader is re-pointed), with the data-order policy applied. The framework delegate is
  told through `refresh_train_loader`.
- **The position**: `open_epoch_iterator(epoch, skip)` opens an epoch positioned after `skip`
  consumed batches, reproducing the order the epoch had (policies below), so a checkpoint taken
  mid-epoch resumes bit-exactly, also in a fresh process.

- **The sampling plan** (`SamplingPlan`): per-sample weights and dropped samples on top of the
  run's samples (`set_data_weights`, `drop_samples`). The loader then draws from
  `Subset(root dataset, kept indices)`, with a `WeightedEpochSampler` when there are weights;
  it is built and installed through the same path, and the plan is part of `data_state()`, so a
  checkpoint resumes with the same weights and drops. Every other re-pointing (fork, merge,
  reset, switching runs) starts without a plan.

Policies (SessionConfig.data_order_policy):
- `user`: the loader is left alone. The RNG state at the start of the epoch is kept in the
  checkpoint; the epoch's iterator is re-created from it and the consumed batches are skipped.
- `epoch_reseed`: the sampler is replaced by an `EpochSeededRandomSampler` (order = f(seed, epoch))
  and the loader's generator is reseeded every epoch, so worker seeds are reproducible too.
- `fixed_order`: the same seeded order every epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Subset

from ..checkpoints import capture_rng_state, restore_rng_state
from ..control.errors import CommandError, ErrorCode
from ..ranks import whole_split
from ..sampler_utils import (
    EpochSeededRandomSampler,
    clone_loader,
    forward_epoch,
    loader_is_shuffled,
    make_worker_init_fn,
)
from .sampling import SamplingPlan, WeightedEpochSampler


@dataclass
class TrainData:
    """What DataMixin owns: the loaders, the policy in force, and the epoch's replay state."""

    root_loader: Any = None  # the user's train loader: it defines the training set
    loader: Any = None  # what training iterates now (a fork's subset, policy applied)
    policy: str = "user"  # the policy in force (a managed one falls back to "user" where it cannot apply)
    managed_sampler: EpochSeededRandomSampler | None = None
    epoch_start: dict[str, Any] | None = None  # RNG when the current epoch's iterator was created
    resume: dict[str, Any] | None = None  # set by a checkpoint load; consumed by the next epoch iterator
    subset: list[int] | None = None  # root-dataset indices the run trains on (None: the training set)
    training_indices: np.ndarray | None = None  # cached root indices of the training set
    generation: int = 0  # bumped whenever the loader or the position changes
    sampling: SamplingPlan | None = None  # weights / dropped samples of the run (None: the loader's own draw)
    drawing: EpochDraw | None = None  # the epoch in progress, while a data edit waits for the next epoch
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class EpochDraw:
    """What the epoch in progress draws from after a data edit that takes effect at the next epoch
    (on runtimes that cannot re-open an epoch): a checkpoint taken now replays this epoch from it."""

    sampling: SamplingPlan | None
    sampler: Any
    epoch_start: dict[str, Any] | None


class DataMixin:
    """Owns `self.data` (a `TrainData`)."""

    def _init_data(self) -> None:
        self.data = TrainData(policy=self.cfg.data_order_policy)

    # ---- binding -----------------------------------------------------------------------------
    @property
    def train_loader(self) -> Any:
        """The loader training iterates now (the user's, or a fork's subset of it)."""
        return self.data.loader

    @property
    def train_root_loader(self) -> Any:
        """The user's own train loader (the training set)."""
        return self.data.root_loader

    @property
    def active_subset(self) -> list[int] | None:
        """The root-dataset indices the current run trains on (None: the whole training set)."""
        return self.data.subset

    @property
    def effective_data_order_policy(self) -> str:
        return self.data.policy

    @property
    def base_seed(self) -> int:
        return int(self.cfg.seed) if self.cfg.seed is not None else 0

    def bind_train_loader(self, loader: Any, *, manage: bool = True) -> None:
        """Make `loader` the training set and train on all of it (with the policy when `manage`)."""
        data = self.data
        data.root_loader = loader
        data.training_indices = None
        data.subset = None
        data.sampling = None
        data.loader = self.apply_data_policy(loader) if manage else loader
        data.generation += 1

    def apply_data_policy(self, loader: Any) -> Any:
        """`loader` with the data-order policy applied (a managed sampler and generator)."""
        data = self.data
        data.managed_sampler = None
        policy = self.cfg.data_order_policy
        data.policy = policy
        if policy == "user" or not isinstance(loader, DataLoader):
            return loader
        if isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
            data.policy = "user"
            self.log(f"data_order_policy {policy!r} needs a map-style dataset with batch_size; "
                     "keeping the loader's own order", level="warn")
            return loader
        if isinstance(loader.sampler, WeightedEpochSampler):
            sampler = loader.sampler  # a sampling plan's draw already depends only on (seed, epoch)
        else:
            sampler = EpochSeededRandomSampler(
                len(loader.dataset), seed=self.base_seed, shuffle=loader_is_shuffled(loader) or policy == "fixed_order"
            )
        generator = torch.Generator()
        generator.manual_seed(self.base_seed)
        managed = clone_loader(loader, sampler=sampler, generator=generator,
                               worker_init_fn=make_worker_init_fn(self.base_seed, loader.worker_init_fn))
        data.managed_sampler = sampler
        return managed

    # ---- the training set --------------------------------------------------------------------
    def require_train_loader(self) -> Any:
        loader = self.data.root_loader
        if loader is None:
            raise CommandError("no train_loader is bound to the session", ErrorCode.NOT_FOUND)
        return loader

    def train_root_dataset(self) -> Any:
        """The innermost dataset under the train loader's `Subset`s (what indices refer to)."""
        from ..data_explorer import root_dataset

        loader = self.require_train_loader()
        if not hasattr(loader, "dataset"):
            raise CommandError(f"the train loader ({type(loader).__name__}) has no dataset", ErrorCode.NOT_FOUND)
        return root_dataset(loader.dataset)

    def training_indices(self) -> np.ndarray:
        """Root-dataset indices of the training set, in the order a scan visits them."""
        data = self.data
        if data.training_indices is None:
            from ..data_explorer import dataset_indices_of

            loader = self.require_train_loader()
            if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
                raise CommandError("the training set has no indices: the train loader is not a DataLoader over "
                                   "a map-style dataset", ErrorCode.FAILED)
            # Under DDP the training set is every rank's samples, not this rank's share of them.
            data.training_indices = np.asarray(dataset_indices_of(whole_split(loader)), dtype=np.int64)
        return data.training_indices

    def check_training_indices(self, indices: Any, field: str) -> np.ndarray:
        """`indices` as a sorted unique int64 array; every one must be in the training set."""
        ids = np.unique(np.asarray(list(indices), dtype=np.int64))
        allowed = self.training_indices()
        outside = ids[~np.isin(ids, allowed)]
        if outside.size:
            raise CommandError(
                f"{field}: {outside[:5].tolist()} are not in the training set "
                f"({allowed.size} samples of a dataset of {len(self.train_root_dataset())})",
                ErrorCode.BAD_PAYLOAD,
            )
        return ids

    def run_training_indices(self, run_id: str | None = None) -> np.ndarray:
        """What a run trains on: its subset, or the whole training set."""
        subset = self.run_subset_indices(run_id or self.cfg.run_name)
        return self.training_indices() if subset is None else np.asarray(subset, dtype=np.int64)

    def scan_loader(self) -> Any:
        """The loader scans read training samples through (unshuffled reads of the user's loader)."""
        return self.require_train_loader()

    def loader_over(self, indices: Any, *, shuffle: bool = False) -> DataLoader:
        """A plain loader over root-dataset `indices` (None: the training set), with the train loader's knobs."""
        root_loader = self.require_train_loader()
        if not isinstance(root_loader, DataLoader):
            raise CommandError("this needs a torch DataLoader as train loader", ErrorCode.FAILED)
        picked = self.training_indices() if indices is None else np.asarray(indices, dtype=np.int64)
        dataset = Subset(self.train_root_dataset(), picked.tolist())
        try:
            return clone_loader(root_loader, dataset=dataset, shuffle=shuffle)
        except ValueError as exc:
            raise CommandError(f"cannot build a loader over the selected samples: {exc}", ErrorCode.FAILED) from exc

    # ---- re-pointing (the one path) ----------------------------------------------------------
    def subset_loader(self, indices: Any | None, *, batch_size: int | None = None, sampler: Any = None) -> Any:
        """A clone of the user's train loader over `Subset(root dataset, indices)` (None: the training set).

        The clone keeps batch size (unless `batch_size`), collate_fn, drop_last, workers,
        pin_memory and the kind of sampler (unless `sampler`, which then orders the subset's
        positions). Every index must be in the training set.
        """
        root_loader = self.require_train_loader()
        if indices is None and batch_size is None and sampler is None:
            return root_loader
        if not isinstance(root_loader, DataLoader):
            raise CommandError(f"the train loader is a {type(root_loader).__name__}, not a DataLoader; "
                               "it cannot be narrowed to a subset", ErrorCode.FAILED)
        if indices is None:
            dataset = root_loader.dataset
        else:
            picked = self.check_training_indices(indices, "subset_indices").tolist()
            dataset = Subset(self.train_root_dataset(), picked)
        knobs: dict[str, Any] = {} if batch_size is None else {"batch_size": batch_size}
        if sampler is not None:
            knobs["sampler"] = sampler
        try:
            return clone_loader(root_loader, dataset=dataset, **knobs)
        except ValueError as exc:
            raise CommandError(f"cannot narrow the train loader: {exc}", ErrorCode.FAILED) from exc

    def install_train_loader(self, loader: Any, subset: list[int] | None, sampling: SamplingPlan | None = None) -> Any:
        """Train on `loader` from the next epoch iterator on (policy applied; the framework is told).

        `sampling` is the plan `loader` was built for; without one the run draws as the loader does.
        """
        data = self.data
        data.loader = self.apply_data_policy(loader)
        data.subset = None if subset is None else [int(i) for i in subset]
        data.sampling = sampling
        data.epoch_start = None
        data.drawing = None
        data.generation += 1
        self.framework.refresh_train_loader(data.loader)
        return data.loader

    def rebind_train_loader(self, indices: Any | None, *, batch_size: int | None = None) -> Any:
        """Train on `Subset(root dataset, indices)` (None: the whole training set): the one re-pointing path."""
        loader = self.subset_loader(indices, batch_size=batch_size)
        subset = None if indices is None else self.check_training_indices(indices, "subset_indices").tolist()
        return self.install_train_loader(loader, subset)

    # ---- the sampling plan (weights and dropped samples) ------------------------------------
    @property
    def sampling_plan(self) -> SamplingPlan | None:
        """The run's weights and dropped samples (None: the loader draws as the user built it)."""
        return self.data.sampling

    def run_sample_indices(self) -> np.ndarray:
        """The current run's samples (its subset, or the training set) as ascending root indices."""
        subset = self.data.subset
        return np.unique(self.training_indices() if subset is None else np.asarray(subset, dtype=np.int64))

    def plan_loader(self, plan: SamplingPlan) -> Any:
        """The train loader that draws as `plan` says: the kept samples, weighted when it has weights."""
        kept = plan.kept()
        sampler = None
        if plan.weights is not None:
            sampler = WeightedEpochSampler(plan.kept_weights(), num_samples=plan.draws(), replacement=plan.replacement,
                                           seed=self.base_seed)
        return self.subset_loader(kept.tolist(), sampler=sampler)

    def install_sampling_plan(self, plan: SamplingPlan | None) -> Any:
        """Train with `plan` (None: the run's samples as the loader draws them) from the next epoch iterator."""
        data = self.data
        loader = self.subset_loader(data.subset) if plan is None else self.plan_loader(plan)
        return self.install_train_loader(loader, data.subset, sampling=plan)

    def defer_sampling_plan(self, plan: SamplingPlan | None) -> Any:
        """Train with `plan` from the next epoch on; the epoch in progress keeps drawing as it began."""
        data = self.data
        drawing = data.drawing or EpochDraw(data.sampling, data.managed_sampler, data.epoch_start)
        loader = self.install_sampling_plan(plan)
        data.drawing = drawing
        return loader

    # ---- position ----------------------------------------------------------------------------
    def data_state(self) -> dict[str, Any]:
        """What a checkpoint needs to reposition the data (see the module docstring).

        While a data edit waits for the next epoch, the fields describe the epoch in progress and
        `next_epoch` holds the plan that follows it.
        """
        data = self.data
        drawing = data.drawing
        sampling, sampler = (drawing.sampling, drawing.sampler) if drawing else (data.sampling, data.managed_sampler)
        state = {
            "policy": data.policy,
            "epoch_start": drawing.epoch_start if drawing else data.epoch_start,
            "sampler": sampler.state_dict() if sampler is not None else None,
            "sampling": sampling.state() if sampling is not None else None,
        }
        if drawing is not None:
            state["next_epoch"] = {"sampling": data.sampling.state() if data.sampling is not None else None}
        return state

    def apply_next_epoch_plan(self, data_state: dict[str, Any]) -> None:
        """After a checkpoint's epoch is positioned: defer the plan it had waiting for the next epoch."""
        waiting = data_state.get("next_epoch")
        if waiting is not None:
            saved = waiting.get("sampling")
            self.defer_sampling_plan(SamplingPlan.from_state(saved) if saved is not None else None)

    def schedule_resume(self, data_state: dict[str, Any], rng: dict[str, Any] | None) -> None:
        """Remember how to reposition the loader; applied when the loop next opens an epoch.

        The checkpoint's sampling plan (or its absence) is installed first: the epoch is replayed
        from the loader the saved run drew from.
        """
        saved = data_state.get("sampling")
        if saved is not None or self.data.sampling is not None:
            self.install_sampling_plan(SamplingPlan.from_state(saved) if saved is not None else None)
        self.data.resume = {"data": data_state, "rng": rng}
        self.data.generation += 1
        self.request_reposition()

    def note_epoch_start(self, epoch: int, start: dict[str, Any] | None = None, *, loader: Any = None) -> None:
        """A loop we do not drive is about to open `epoch`'s iterator: remember the RNG it starts from.

        The RNG state, and the train loader's own generator (`loader`, default the user's train
        loader); with `start` (a recorded epoch start, e.g. from a checkpoint) that record is kept.
        """
        if start is None:
            gen = getattr(loader if loader is not None else self.data.root_loader, "generator", None)
            start = {"epoch": int(epoch), "rng": capture_rng_state(),
                     "generator": gen.get_state() if isinstance(gen, torch.Generator) else None}
        self.data.epoch_start = start
        self.data.drawing = None

    def discard_resume(self) -> None:
        """The framework repositioned its own loop: the native repositioning plan is not needed
        (a plan the checkpoint had waiting for the next epoch still is)."""
        resume, self.data.resume = self.data.resume, None
        if resume is not None:
            self.apply_next_epoch_plan(resume.get("data") or {})

    def forget_epoch_start(self) -> None:
        """A command moved the run: the old epoch's start state no longer describes it."""
        self.data.epoch_start = None

    def open_epoch_iterator(self, loader: Any, epoch: int, skip_batches: int) -> Iterator[Any]:
        """An iterator over `loader` for `epoch`, positioned after `skip_batches` consumed batches."""
        data = self.data
        resume, data.resume = data.resume, None
        # The checkpoint's RNG is put back after the iterator is positioned, unless it had to be
        # restored before creating the iterator (the checkpoint predates this epoch's iterator).
        restore_after = resume.get("rng") if resume is not None else None
        forward_epoch(loader, 0 if data.policy == "fixed_order" else epoch)
        sampler = data.managed_sampler
        if sampler is not None:
            sampler.set_epoch(0 if data.policy == "fixed_order" else epoch)
            if loader.generator is not None:
                loader.generator.manual_seed(self.base_seed * 1_000_003 + epoch)
            if skip_batches:
                sampler.skip(min(skip_batches * loader.batch_size, sampler.num_samples))
            data.epoch_start = None
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
            data.epoch_start = {
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
        data.drawing = None  # a new epoch draws from the loader installed now
        if resume is not None:
            self.apply_next_epoch_plan(resume.get("data") or {})
        return iterator
