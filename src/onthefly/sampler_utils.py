"""Deterministic data order: an epoch-seeded sampler, worker seeding, and DataLoader cloning.

The order of epoch `e` depends only on `(seed, e)`, so it survives pause/resume and a restart in
a fresh process; `skip()` resumes mid-epoch at an exact position. `clone_loader` rebuilds a
DataLoader with a new sampler or dataset without dropping any of the user's knobs.
"""

from __future__ import annotations

import abc
import inspect
import random
from collections.abc import Callable, Iterator, Sized
from typing import Any, Final

import numpy as np
import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
    default_collate,
    default_convert,
)

__all__ = [
    "KEEP",
    "EpochSeededRandomSampler",
    "SeededWorkerInit",
    "clone_loader",
    "forward_epoch",
    "loader_is_shuffled",
    "make_worker_init_fn",
    "sampler_is_shuffled",
    "seed_worker",
]


class KeepType:
    """Type of `KEEP`: "use the original loader's value" for `clone_loader` arguments."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP: Final = KeepType()

DATALOADER_PARAMS = frozenset(inspect.signature(DataLoader.__init__).parameters)


def check_non_negative_int(name: str, value: Any) -> int:
    """Return `value` if it is an int >= 0 (bool excluded), else raise naming `name`."""
    if type(value) is not int or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


class SkippableEpochSampler(Sampler[int], abc.ABC):
    """A sampler whose epoch is the index tensor `order()`; `skip(n)` (set by a subclass in `_skip`)
    makes the next iterator start `n` positions in, once."""

    _skip = 0
    num_samples: int

    @abc.abstractmethod
    def order(self, epoch: int | None = None) -> torch.Tensor:
        """The epoch's sample indices in the order they are drawn (the current epoch by default)."""

    def __iter__(self) -> Iterator[int]:
        # Computed eagerly so the pending skip is consumed by this iterator, not a later one.
        start, self._skip = self._skip, 0
        return iter(self.order()[start:].tolist())

    def __len__(self) -> int:
        return self.num_samples - self._skip


class EpochSeededRandomSampler(SkippableEpochSampler):
    """Yields a permutation that depends only on `seed + epoch`, never on the global RNG.

    `skip(n)` makes the next iterator start after the first `n` positions of the current epoch's
    order (resume mid-epoch: pass batches_done * batch_size); it applies once, then resets.
    """

    def __init__(
        self, data_source_or_len: Sized | int, *, seed: int = 0, shuffle: bool = True
    ) -> None:
        if type(data_source_or_len) is int:
            check_non_negative_int("data_source_or_len", data_source_or_len)
            self._data_source: Sized | None = None
            self._fixed_len = data_source_or_len
        elif isinstance(data_source_or_len, Sized):
            self._data_source = data_source_or_len
            self._fixed_len = 0
        else:
            raise TypeError(
                "data_source_or_len must be an int or a sized dataset, got "
                f"{type(data_source_or_len).__name__}"
            )
        if type(seed) is not int:
            raise ValueError(f"seed must be an int, got {seed!r}")
        if type(shuffle) is not bool:
            raise ValueError(f"shuffle must be a bool, got {shuffle!r}")
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self._skip = 0

    @property
    def num_samples(self) -> int:
        """Size of one epoch (the data source's current length)."""
        if self._data_source is None:
            return self._fixed_len
        return len(self._data_source)

    @property
    def pending_skip(self) -> int:
        """Positions the next iterator will skip (0 when no skip is pending)."""
        return self._skip

    def set_epoch(self, epoch: int) -> None:
        """Select the order of `epoch`; call before iterating each epoch."""
        self.epoch = check_non_negative_int("epoch", epoch)

    def skip(self, n_samples: int) -> None:
        """Make the next iterator start after the first `n_samples` positions of this epoch."""
        check_non_negative_int("n_samples", n_samples)
        if n_samples > self.num_samples:
            raise ValueError(
                f"cannot skip {n_samples} samples of an epoch of {self.num_samples}"
            )
        self._skip = n_samples

    def order(self, epoch: int | None = None) -> torch.Tensor:
        """The full index order of `epoch` (default: the current one), as an int64 tensor."""
        chosen = self.epoch if epoch is None else check_non_negative_int("epoch", epoch)
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator()
        generator.manual_seed(self.seed + chosen)
        return torch.randperm(self.num_samples, generator=generator)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to reproduce the next iterator in another process."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "shuffle": self.shuffle,
            "num_samples": self.num_samples,
            "skip": self._skip,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output; refuses a state taken over data of another size."""
        expected = {"seed", "epoch", "shuffle", "num_samples", "skip"}
        if not isinstance(state, dict) or set(state) != expected:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"sampler state must have keys {sorted(expected)}, got {got}")
        if state["num_samples"] != self.num_samples:
            raise ValueError(
                f"sampler state was taken over {state['num_samples']} samples, "
                f"this data source has {self.num_samples}"
            )
        if type(state["seed"]) is not int:
            raise ValueError(f"sampler state 'seed' must be an int, got {state['seed']!r}")
        if type(state["shuffle"]) is not bool:
            raise ValueError(f"sampler state 'shuffle' must be a bool, got {state['shuffle']!r}")
        epoch = check_non_negative_int("sampler state 'epoch'", state["epoch"])
        skip = check_non_negative_int("sampler state 'skip'", state["skip"])
        if skip > self.num_samples:
            raise ValueError(f"sampler state 'skip' {skip} exceeds {self.num_samples} samples")
        self.seed = state["seed"]
        self.shuffle = state["shuffle"]
        self.epoch = epoch
        self._skip = skip

    def __repr__(self) -> str:
        return (
            f"EpochSeededRandomSampler(num_samples={self.num_samples}, seed={self.seed}, "
            f"shuffle={self.shuffle}, epoch={self.epoch}, skip={self._skip})"
        )


# --------------------------------------------------------------------------------------------
# Worker seeding
# --------------------------------------------------------------------------------------------


def seed_worker(worker_id: int) -> None:
    """`worker_init_fn` that seeds Python's and numpy's RNGs from the worker's torch seed.

    DataLoader seeds each worker's torch RNG from the loader's generator; this makes `random`
    and `np.random` inside datasets follow it instead of repeating across workers.
    """
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


class SeededWorkerInit:
    """A picklable `worker_init_fn`: seeds torch, random and numpy per worker, then the user's fn.

    The seeds mix `base_seed`, the worker id and the worker's torch seed (which DataLoader draws
    from the loader's generator for every new iterator), so they are reproducible for a fixed
    generator seed and still differ between workers and epochs.
    """

    def __init__(self, base_seed: int, user_fn: Callable[[int], Any] | None = None) -> None:
        if type(base_seed) is not int:
            raise ValueError(f"base_seed must be an int, got {base_seed!r}")
        self.base_seed = base_seed
        if user_fn is not None and not callable(user_fn):
            raise TypeError(f"user_fn must be callable, got {type(user_fn).__name__}")
        self.user_fn = user_fn

    def __call__(self, worker_id: int) -> None:
        # SeedSequence takes non-negative entropy only; a negative base seed wraps around.
        entropy = [self.base_seed % 2**64, worker_id, torch.initial_seed()]
        sequence = np.random.SeedSequence(entropy)
        words = [int(word) for word in sequence.generate_state(4, dtype=np.uint32)]
        torch.manual_seed((words[0] << 32) | words[1])
        random.seed(words[2])
        np.random.seed(words[3])
        if self.user_fn is not None:
            self.user_fn(worker_id)

    def __repr__(self) -> str:
        return f"SeededWorkerInit(base_seed={self.base_seed}, user_fn={self.user_fn!r})"


def make_worker_init_fn(
    base_seed: int, user_fn: Callable[[int], Any] | None = None
) -> SeededWorkerInit:
    """Return a deterministic per-worker `worker_init_fn` that chains the user's own."""
    return SeededWorkerInit(base_seed, user_fn)


# --------------------------------------------------------------------------------------------
# Loader inspection and cloning
# --------------------------------------------------------------------------------------------


def sampler_is_shuffled(sampler: Any) -> bool:
    """True when the sampler yields a random order."""
    if isinstance(sampler, (EpochSeededRandomSampler, DistributedSampler)):
        return bool(sampler.shuffle)
    if isinstance(sampler, (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)):
        return True
    return getattr(sampler, "shuffle", False) is True


def has_custom_batch_sampler(loader: DataLoader) -> bool:
    """True when the loader was built with `batch_sampler=` rather than batch_size/sampler."""
    return loader.batch_size is None and loader.batch_sampler is not None


def loader_is_shuffled(loader: DataLoader) -> bool:
    """True when the loader's (batch sampler's) sampler yields a random order."""
    sampler = loader.sampler
    if has_custom_batch_sampler(loader):
        sampler = getattr(loader.batch_sampler, "sampler", sampler)
    return sampler_is_shuffled(sampler)


def forward_epoch(loader: DataLoader, epoch: int) -> None:
    """Call `set_epoch(epoch)` on the loader's sampler, batch sampler and its inner sampler."""
    check_non_negative_int("epoch", epoch)
    batch_sampler = getattr(loader, "batch_sampler", None)
    candidates = [
        getattr(loader, "sampler", None),
        batch_sampler,
        getattr(batch_sampler, "sampler", None),
    ]
    seen: set[int] = set()
    for candidate in candidates:
        if candidate is None or id(candidate) in seen:
            continue
        seen.add(id(candidate))
        set_epoch = getattr(candidate, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)


def rebuild_sampler(
    sampler: Any, dataset: Dataset, *, shuffle: bool | None, generator: torch.Generator | None
) -> Sampler[int]:
    """A sampler of the same kind as `sampler` over `dataset` (random or not per `shuffle`)."""
    if isinstance(sampler, EpochSeededRandomSampler):
        rebuilt = EpochSeededRandomSampler(
            dataset, seed=sampler.seed, shuffle=sampler.shuffle if shuffle is None else shuffle
        )
        rebuilt.set_epoch(sampler.epoch)
        return rebuilt
    if isinstance(sampler, DistributedSampler):
        distributed = DistributedSampler(
            dataset,
            num_replicas=sampler.num_replicas,
            rank=sampler.rank,
            shuffle=sampler.shuffle if shuffle is None else shuffle,
            seed=sampler.seed,
            drop_last=sampler.drop_last,
        )
        distributed.set_epoch(sampler.epoch)
        return distributed
    if isinstance(sampler, (RandomSampler, SequentialSampler)):
        random_order = isinstance(sampler, RandomSampler) if shuffle is None else shuffle
        if not random_order:
            return SequentialSampler(dataset)
        replacement = sampler.replacement if isinstance(sampler, RandomSampler) else False
        return RandomSampler(dataset, replacement=replacement, generator=generator)
    raise ValueError(
        f"cannot rebuild a {type(sampler).__name__} for another dataset or shuffle setting; "
        "pass sampler= (or batch_sampler=) to clone_loader"
    )


def clone_loader(
    loader: DataLoader,
    *,
    sampler: Sampler[Any] | None = None,
    batch_sampler: Sampler[list[int]] | None = None,
    dataset: Dataset | None = None,
    batch_size: int | None | KeepType = KEEP,
    generator: torch.Generator | None | KeepType = KEEP,
    worker_init_fn: Callable[[int], Any] | None | KeepType = KEEP,
    shuffle: bool | None = None,
) -> DataLoader:
    """Rebuild `loader` with a new sampler, batch sampler or dataset, keeping every other knob.

    Kept: batch_size, collate_fn, drop_last, num_workers, pin_memory, timeout, worker_init_fn,
    prefetch_factor, persistent_workers, generator, multiprocessing_context, pin_memory_device
    and in_order. A custom batch_sampler is kept unless replaced. With a new dataset (or a
    `shuffle` override) and no new sampler, a sampler of the same kind is built for it.
    """
    if not isinstance(loader, DataLoader):
        raise TypeError(f"clone_loader needs a DataLoader, got {type(loader).__name__}")
    if shuffle is not None and type(shuffle) is not bool:
        raise ValueError(f"shuffle must be a bool or None, got {shuffle!r}")
    if batch_sampler is not None and (sampler is not None or shuffle is not None):
        raise ValueError("batch_sampler= cannot be combined with sampler= or shuffle=")

    new_dataset = loader.dataset if dataset is None else dataset
    dataset_changed = new_dataset is not loader.dataset
    new_generator = loader.generator if generator is KEEP else generator
    kwargs = common_loader_kwargs(loader, worker_init_fn)
    kwargs["generator"] = new_generator

    if isinstance(new_dataset, IterableDataset):
        if sampler is not None or batch_sampler is not None or shuffle is not None:
            raise ValueError(
                "an IterableDataset takes no sampler, batch_sampler or shuffle; it orders itself"
            )
        kwargs["batch_size"] = loader.batch_size if batch_size is KEEP else batch_size
        kwargs["drop_last"] = loader.drop_last
        return DataLoader(new_dataset, **kwargs)

    if batch_sampler is not None or has_custom_batch_sampler(loader):
        if batch_sampler is None:
            if sampler is not None or shuffle is not None or dataset_changed:
                raise ValueError(
                    "the loader uses a custom batch_sampler "
                    f"({type(loader.batch_sampler).__name__}) that cannot be re-pointed at a new "
                    "sampler or dataset; pass batch_sampler= as well"
                )
            batch_sampler = loader.batch_sampler
        if batch_size is not KEEP:
            raise ValueError("batch_size= cannot be combined with a batch_sampler")
        return DataLoader(new_dataset, batch_sampler=batch_sampler, **kwargs)

    if sampler is None:
        generator_replaced = generator is not KEEP and new_generator is not loader.generator
        loader_made_random = (
            isinstance(loader.sampler, RandomSampler)
            and loader.sampler.generator is loader.generator
        )
        if dataset_changed or shuffle is not None or (generator_replaced and loader_made_random):
            sampler = rebuild_sampler(
                loader.sampler, new_dataset, shuffle=shuffle, generator=new_generator
            )
        else:
            sampler = loader.sampler
    kwargs["batch_size"] = loader.batch_size if batch_size is KEEP else batch_size
    kwargs["drop_last"] = loader.drop_last
    return DataLoader(new_dataset, sampler=sampler, **kwargs)


def common_loader_kwargs(
    loader: DataLoader, worker_init_fn: Callable[[int], Any] | None | KeepType
) -> dict[str, Any]:
    """The DataLoader arguments that do not depend on how batches are formed."""
    collate_fn = loader.collate_fn
    if collate_fn is default_collate or collate_fn is default_convert:
        # Let the new loader pick the default that matches its own batching mode.
        collate_fn = None
    kwargs: dict[str, Any] = {
        "num_workers": loader.num_workers,
        "collate_fn": collate_fn,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn if worker_init_fn is KEEP else worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
    }
    if loader.num_workers > 0:
        # DataLoader rejects these two without workers.
        kwargs["prefetch_factor"] = loader.prefetch_factor
        kwargs["persistent_workers"] = loader.persistent_workers
    if "pin_memory_device" in DATALOADER_PARAMS:
        kwargs["pin_memory_device"] = getattr(loader, "pin_memory_device", "")
    if "in_order" in DATALOADER_PARAMS and hasattr(loader, "in_order"):
        kwargs["in_order"] = loader.in_order
    return kwargs
