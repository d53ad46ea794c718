"""Tests for deterministic data order: the epoch-seeded sampler, worker seeding, loader cloning."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    TensorDataset,
)

from onthefly.sampler_utils import (
    EpochSeededRandomSampler,
    SeededWorkerInit,
    clone_loader,
    forward_epoch,
    loader_is_shuffled,
    make_worker_init_fn,
    seed_worker,
)

# ---------------------------------------------------------------- helpers (module level: picklable)

WORKER_MARK = {"value": -1}


class NoisyDataset(Dataset):
    """Each item mixes its index with torch, numpy and python randomness drawn in the worker."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor(
            [
                float(index),
                torch.rand(()).item(),
                float(np.random.rand()),
                random.random(),
                float(WORKER_MARK["value"]),
            ],
            dtype=torch.float64,
        )


class CountingStream(IterableDataset):
    def __iter__(self):
        return iter(range(7))


def mark_worker(worker_id: int) -> None:
    WORKER_MARK["value"] = 100 + worker_id


def collate_sum(items: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([item[0] for item in items]).sum(dim=0, keepdim=True)


def chunks_of_two(n: int) -> list[list[int]]:
    return [list(range(i, min(i + 2, n))) for i in range(0, n, 2)]


def batches(loader: DataLoader) -> list[torch.Tensor]:
    return [batch.clone() for batch in loader]


def rng_snapshot() -> tuple:
    return (random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state())


def same_rng(left: tuple, right: tuple) -> bool:
    return left[0] == right[0] and left[1] == right[1] and torch.equal(left[2], right[2])


# ---------------------------------------------------------------- EpochSeededRandomSampler


def test_order_is_reproducible_per_epoch_and_differs_between_epochs() -> None:
    sampler = EpochSeededRandomSampler(50, seed=7)
    epoch0 = list(sampler)
    assert list(sampler) == epoch0
    assert list(EpochSeededRandomSampler(range(50), seed=7)) == epoch0
    expected = torch.randperm(50, generator=torch.Generator().manual_seed(7)).tolist()
    assert epoch0 == expected
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0 and sorted(epoch1) == list(range(50))
    assert epoch1 == torch.randperm(50, generator=torch.Generator().manual_seed(8)).tolist()
    assert list(EpochSeededRandomSampler(50, seed=8)) != epoch0


def test_unshuffled_order_is_sequential() -> None:
    sampler = EpochSeededRandomSampler(6, seed=3, shuffle=False)
    sampler.set_epoch(4)
    assert list(sampler) == [0, 1, 2, 3, 4, 5]


def test_skip_resumes_exactly_once() -> None:
    sampler = EpochSeededRandomSampler(20, seed=1)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.skip(8)
    assert len(sampler) == 12 and sampler.pending_skip == 8
    assert list(sampler) == full[8:]
    assert sampler.pending_skip == 0 and len(sampler) == 20
    assert list(sampler) == full
    sampler.skip(20)
    assert list(sampler) == []


def test_skip_through_a_dataloader_continues_the_same_batches() -> None:
    data = TensorDataset(torch.arange(24))
    sampler = EpochSeededRandomSampler(data, seed=5)
    sampler.set_epoch(1)
    uninterrupted = [b[0].tolist() for b in DataLoader(data, batch_size=4, sampler=sampler)]
    resumed_sampler = EpochSeededRandomSampler(data, seed=5)
    resumed_sampler.set_epoch(1)
    resumed_sampler.skip(3 * 4)
    loader = DataLoader(data, batch_size=4, sampler=resumed_sampler)
    assert len(loader) == 3
    assert [b[0].tolist() for b in loader] == uninterrupted[3:]


def test_state_round_trips_into_a_new_sampler() -> None:
    sampler = EpochSeededRandomSampler(30, seed=11)
    sampler.set_epoch(5)
    sampler.skip(7)
    state = sampler.state_dict()
    assert state == {"seed": 11, "epoch": 5, "shuffle": True, "num_samples": 30, "skip": 7}
    other = EpochSeededRandomSampler(30, seed=0, shuffle=False)
    other.load_state_dict(dict(state))
    assert list(other) == list(sampler)
    assert other.state_dict()["skip"] == 0


def test_load_state_dict_rejects_bad_states() -> None:
    sampler = EpochSeededRandomSampler(30)
    good = EpochSeededRandomSampler(30).state_dict()
    with pytest.raises(ValueError, match="taken over 31 samples, this data source has 30"):
        sampler.load_state_dict({**good, "num_samples": 31})
    with pytest.raises(ValueError, match="must have keys"):
        sampler.load_state_dict({"seed": 1})
    with pytest.raises(ValueError, match="'epoch' must be an int >= 0"):
        sampler.load_state_dict({**good, "epoch": -1})
    with pytest.raises(ValueError, match="'shuffle' must be a bool"):
        sampler.load_state_dict({**good, "shuffle": 1})
    assert sampler.state_dict() == good


def test_sampler_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match="int or a sized dataset"):
        EpochSeededRandomSampler(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="data_source_or_len must be an int >= 0"):
        EpochSeededRandomSampler(-3)
    sampler = EpochSeededRandomSampler(5)
    with pytest.raises(ValueError, match="cannot skip 6 samples of an epoch of 5"):
        sampler.skip(6)
    with pytest.raises(ValueError, match="epoch must be an int >= 0"):
        sampler.set_epoch(True)  # type: ignore[arg-type]


def test_iterating_does_not_touch_global_rng() -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    before = rng_snapshot()
    sampler = EpochSeededRandomSampler(100, seed=4)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        sampler.skip(epoch)
        list(sampler)
    # A DataLoader without a generator draws its worker base seed from the global RNG itself,
    # so give it one: what is checked here is that the sampler draws nothing.
    small = TensorDataset(torch.arange(10))
    own = torch.Generator().manual_seed(0)
    list(DataLoader(small, batch_size=3, sampler=EpochSeededRandomSampler(small), generator=own))
    assert same_rng(before, rng_snapshot())


def test_sampler_follows_a_growing_data_source() -> None:
    data = list(range(5))
    sampler = EpochSeededRandomSampler(data, seed=0)
    data.extend([5, 6])
    assert sampler.num_samples == 7 and sorted(sampler) == list(range(7))


# ---------------------------------------------------------------- worker seeding


def test_seeded_workers_are_reproducible_and_chain_the_user_fn() -> None:
    data = NoisyDataset(12)

    def run(base_seed: int, generator_seed: int) -> torch.Tensor:
        loader = DataLoader(
            data,
            batch_size=3,
            sampler=EpochSeededRandomSampler(data, seed=2),
            num_workers=2,
            generator=torch.Generator().manual_seed(generator_seed),
            worker_init_fn=make_worker_init_fn(base_seed, mark_worker),
        )
        return torch.cat(batches(loader))

    first = run(5, 9)
    assert torch.equal(first, run(5, 9))
    assert not torch.equal(first[:, 1:4], run(6, 9)[:, 1:4])
    assert not torch.equal(first[:, 1:4], run(5, 10)[:, 1:4])
    assert set(first[:, 4].tolist()) == {100.0, 101.0}  # the user's worker_init_fn ran
    # numpy and python draws differ between the two workers.
    by_worker = {mark: first[first[:, 4] == mark][:, 2] for mark in (100.0, 101.0)}
    assert not torch.equal(by_worker[100.0][:2], by_worker[101.0][:2])


def test_seed_worker_seeds_python_and_numpy_from_torch() -> None:
    torch.manual_seed(1234)
    seed_worker(0)
    drawn = (random.random(), float(np.random.rand()))
    random.seed(1234)
    np.random.seed(1234)
    assert drawn == (random.random(), float(np.random.rand()))


def test_make_worker_init_fn_validates_and_accepts_negative_seeds() -> None:
    with pytest.raises(ValueError, match="base_seed must be an int"):
        make_worker_init_fn("1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="user_fn must be callable"):
        make_worker_init_fn(1, 5)  # type: ignore[arg-type]
    init = make_worker_init_fn(-1)
    assert isinstance(init, SeededWorkerInit)
    state = torch.get_rng_state()
    try:
        # In a worker torch.initial_seed() is fixed by the DataLoader; emulate that here.
        torch.manual_seed(5)
        init(0)
        first = (torch.rand(2), random.random(), float(np.random.rand()))
        torch.manual_seed(5)
        init(0)
        second = (torch.rand(2), random.random(), float(np.random.rand()))
        assert torch.equal(first[0], second[0]) and first[1:] == second[1:]
        torch.manual_seed(5)
        init(1)
        assert not torch.equal(torch.rand(2), first[0])
    finally:
        torch.set_rng_state(state)


# ---------------------------------------------------------------- clone_loader


def knobbed_loader(data: Dataset) -> DataLoader:
    return DataLoader(
        data,
        batch_size=3,
        shuffle=True,
        num_workers=2,
        collate_fn=collate_sum,
        pin_memory=False,
        drop_last=True,
        timeout=20.0,
        worker_init_fn=mark_worker,
        multiprocessing_context="spawn",
        generator=torch.Generator().manual_seed(3),
        prefetch_factor=3,
        persistent_workers=True,
        in_order=False,
    )


def test_clone_loader_keeps_every_knob() -> None:
    data = NoisyDataset(10)
    original = knobbed_loader(data)
    sampler = EpochSeededRandomSampler(data, seed=1)
    clone = clone_loader(original, sampler=sampler)
    assert clone.sampler is sampler
    assert clone.dataset is data
    for knob in (
        "batch_size",
        "collate_fn",
        "drop_last",
        "num_workers",
        "pin_memory",
        "timeout",
        "worker_init_fn",
        "prefetch_factor",
        "persistent_workers",
        "generator",
        "multiprocessing_context",
        "pin_memory_device",
        "in_order",
    ):
        assert getattr(clone, knob) == getattr(original, knob), knob
    assert clone.batch_sampler.sampler is sampler and clone.batch_sampler.drop_last is True


def test_clone_loader_overrides_and_default_collate() -> None:
    data = TensorDataset(torch.arange(8))
    original = DataLoader(data, batch_size=None)
    clone = clone_loader(original, batch_size=4, generator=None, worker_init_fn=seed_worker)
    assert clone.batch_size == 4 and clone.worker_init_fn is seed_worker
    # The default collate of the new batching mode is used, so batches are stacked.
    assert [b[0].tolist() for b in clone] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_clone_with_two_workers_matches_a_fresh_run() -> None:
    data = NoisyDataset(16)

    def build_fresh() -> DataLoader:
        sampler = EpochSeededRandomSampler(data, seed=21)
        sampler.set_epoch(1)
        return DataLoader(
            data,
            batch_size=4,
            sampler=sampler,
            num_workers=2,
            generator=torch.Generator().manual_seed(77),
            worker_init_fn=make_worker_init_fn(3),
        )

    fresh = batches(build_fresh())
    original = DataLoader(data, batch_size=4, shuffle=False, num_workers=2)
    sampler = EpochSeededRandomSampler(data, seed=21)
    sampler.set_epoch(1)
    clone = clone_loader(
        original,
        sampler=sampler,
        generator=torch.Generator().manual_seed(77),
        worker_init_fn=make_worker_init_fn(3),
    )
    cloned = batches(clone)
    assert len(cloned) == len(fresh) == 4
    assert all(torch.equal(a, b) for a, b in zip(cloned, fresh))
    assert sorted(torch.cat(cloned)[:, 0].tolist()) == [float(i) for i in range(16)]


def test_clone_with_new_generator_reshuffles_like_a_fresh_loader() -> None:
    data = TensorDataset(torch.arange(20))
    original = DataLoader(data, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(1))
    clone = clone_loader(original, generator=torch.Generator().manual_seed(42))
    fresh = DataLoader(data, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(42))
    assert [b[0].tolist() for b in clone] == [b[0].tolist() for b in fresh]


def test_clone_with_new_dataset_rebuilds_the_same_kind_of_sampler() -> None:
    data = TensorDataset(torch.arange(20))
    subset = Subset(data, list(range(0, 20, 2)))

    random_clone = clone_loader(DataLoader(data, batch_size=2, shuffle=True), dataset=subset)
    assert isinstance(random_clone.sampler, RandomSampler)
    assert random_clone.sampler.data_source is subset
    assert sorted(t for b in random_clone for t in b[0].tolist()) == list(range(0, 20, 2))

    seq_clone = clone_loader(DataLoader(data, batch_size=4), dataset=subset)
    assert isinstance(seq_clone.sampler, SequentialSampler)
    assert [b[0].tolist() for b in seq_clone] == [[0, 2, 4, 6], [8, 10, 12, 14], [16, 18]]

    ours = EpochSeededRandomSampler(data, seed=9)
    ours.set_epoch(3)
    our_clone = clone_loader(DataLoader(data, batch_size=4, sampler=ours), dataset=subset)
    assert isinstance(our_clone.sampler, EpochSeededRandomSampler)
    assert (our_clone.sampler.seed, our_clone.sampler.epoch, our_clone.sampler.num_samples) == (9, 3, 10)

    dist = DistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=4)
    dist.set_epoch(2)
    dist_clone = clone_loader(DataLoader(data, batch_size=4, sampler=dist), dataset=subset)
    new = dist_clone.sampler
    assert isinstance(new, DistributedSampler) and new.dataset is subset
    assert (new.num_replicas, new.rank, new.shuffle, new.seed, new.epoch) == (2, 1, True, 4, 2)
    assert len(new) == 5


def test_clone_shuffle_override() -> None:
    data = TensorDataset(torch.arange(6))
    flat = clone_loader(DataLoader(data, batch_size=6, shuffle=True), shuffle=False)
    assert isinstance(flat.sampler, SequentialSampler)
    assert next(iter(flat))[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert loader_is_shuffled(clone_loader(DataLoader(data, batch_size=2), shuffle=True))


def test_clone_keeps_a_custom_batch_sampler_unless_replaced() -> None:
    data = TensorDataset(torch.arange(6))
    custom = chunks_of_two(6)
    original = DataLoader(data, batch_sampler=custom)
    kept = clone_loader(original)
    assert kept.batch_sampler is custom
    assert [b[0].tolist() for b in kept] == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="custom batch_sampler .*pass batch_sampler="):
        clone_loader(original, sampler=SequentialSampler(data))
    with pytest.raises(ValueError, match="batch_size= cannot be combined"):
        clone_loader(original, batch_size=3)
    replaced = clone_loader(original, batch_sampler=[[5, 4, 3]])
    assert [b[0].tolist() for b in replaced] == [[5, 4, 3]]
    with pytest.raises(ValueError, match="cannot be combined with sampler= or shuffle="):
        clone_loader(original, batch_sampler=[[0]], shuffle=True)


def test_clone_rejects_what_it_cannot_rebuild() -> None:
    data = TensorDataset(torch.arange(6))
    custom_sampler = [5, 4, 3, 2, 1, 0]
    with pytest.raises(ValueError, match="cannot rebuild a list for another dataset"):
        clone_loader(DataLoader(data, sampler=custom_sampler), dataset=Subset(data, [0, 1]))
    with pytest.raises(TypeError, match="needs a DataLoader"):
        clone_loader([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="IterableDataset takes no sampler"):
        clone_loader(DataLoader(CountingStream(), batch_size=2), shuffle=True)


def test_clone_iterable_dataset_keeps_batching() -> None:
    clone = clone_loader(DataLoader(CountingStream(), batch_size=3, drop_last=True))
    assert [b.tolist() for b in clone] == [[0, 1, 2], [3, 4, 5]]


# ---------------------------------------------------------------- loader_is_shuffled / forward_epoch


def test_loader_is_shuffled() -> None:
    data = TensorDataset(torch.arange(6))
    assert loader_is_shuffled(DataLoader(data, shuffle=True))
    assert not loader_is_shuffled(DataLoader(data))
    assert loader_is_shuffled(DataLoader(data, sampler=EpochSeededRandomSampler(data)))
    assert not loader_is_shuffled(
        DataLoader(data, sampler=EpochSeededRandomSampler(data, shuffle=False))
    )
    assert not loader_is_shuffled(
        DataLoader(data, sampler=DistributedSampler(data, num_replicas=2, rank=0, shuffle=False))
    )
    wrapped = BatchSampler(RandomSampler(data), batch_size=2, drop_last=False)
    assert loader_is_shuffled(DataLoader(data, batch_sampler=wrapped))


def test_forward_epoch_hits_distributed_and_wrapped_samplers() -> None:
    data = TensorDataset(torch.arange(8))
    dist = DistributedSampler(data, num_replicas=2, rank=0, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=2, sampler=dist)
    forward_epoch(loader, 3)
    assert dist.epoch == 3
    reference = DistributedSampler(data, num_replicas=2, rank=0, shuffle=True, seed=0)
    reference.set_epoch(3)
    assert [t for b in loader for t in b[0].tolist()] == list(reference)

    ours = EpochSeededRandomSampler(data, seed=2)
    wrapped = DataLoader(data, batch_sampler=BatchSampler(ours, batch_size=2, drop_last=False))
    forward_epoch(wrapped, 4)
    assert ours.epoch == 4
    with pytest.raises(ValueError, match="epoch must be an int >= 0"):
        forward_epoch(loader, -1)

