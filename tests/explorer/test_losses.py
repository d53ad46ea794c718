"""compute_per_sample_losses: every sample scored, paired with its true index, nothing disturbed."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, Sampler, Subset

from onthefly.data_explorer import (
    ONE_BY_ONE,
    REDUCTION_NONE,
    VMAP,
    ChunkedArraySpool,
    PerSampleResult,
    ScanCancelled,
    analysis_mode,
    compute_per_sample_losses,
    dataset_indices_of,
    root_dataset,
    select_by_loss_range,
)

from .conftest import MLP, PairDataset, reference_losses


def _check_pairing(result: PerSampleResult, model: nn.Module, root: PairDataset) -> None:
    ref = reference_losses(model, root.x, root.y).numpy()
    np.testing.assert_allclose(result.losses, ref[result.indices], atol=1e-6, rtol=0)


def test_every_sample_scored_including_last_partial_batch(model: MLP, data: PairDataset) -> None:
    result = compute_per_sample_losses(model, data, nn.CrossEntropyLoss(), batch_size=16)
    assert len(result) == 103 and result.losses.dtype == np.float32 and result.indices.dtype == np.int64
    np.testing.assert_array_equal(result.indices, np.arange(103))
    _check_pairing(result, model, data)
    assert result.meta["samples"] == 103
    assert result.meta["per_sample_method"] == REDUCTION_NONE
    assert result.meta["mode"] == "eval" and result.meta["source"] == "dataset"
    assert result.meta["non_finite"] == 0


def test_shuffled_drop_last_loader_is_read_whole_and_in_order(model: MLP, data: PairDataset) -> None:
    loader = DataLoader(data, batch_size=10, shuffle=True, drop_last=True)
    result = compute_per_sample_losses(model, loader, F.cross_entropy)
    np.testing.assert_array_equal(np.sort(result.indices), np.arange(103))
    _check_pairing(result, model, data)
    assert result.meta["batch_size"] == 10 and result.meta["source"] == "loader"


def test_subset_of_subset_pairs_with_root_indices(model: MLP, data: PairDataset) -> None:
    outer = Subset(data, list(range(100, 0, -2)))  # 50 samples: 100, 98, ..., 2
    inner = Subset(outer, [3, 0, 7, 49])  # -> 94, 100, 86, 2
    assert root_dataset(DataLoader(inner)) is data
    result = compute_per_sample_losses(model, DataLoader(inner, batch_size=3, shuffle=True), nn.CrossEntropyLoss())
    np.testing.assert_array_equal(result.indices, [94, 100, 86, 2])
    _check_pairing(result, model, data)
    np.testing.assert_array_equal(dataset_indices_of(inner), [94, 100, 86, 2])


class FixedOrderSampler(Sampler[int]):
    """A custom sampler: a fixed selection with a repeat, as a curriculum might yield."""

    def __init__(self, order: list[int]) -> None:
        self.order = order

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def test_custom_sampler_positions_are_paired(model: MLP, data: PairDataset) -> None:
    loader = DataLoader(data, batch_size=2, sampler=FixedOrderSampler([7, 3, 3, 50, 102]))
    result = compute_per_sample_losses(model, loader, nn.CrossEntropyLoss())
    np.testing.assert_array_equal(result.indices, [7, 3, 50, 102])
    _check_pairing(result, model, data)
    assert result.meta["source"] == "sampler"


def test_custom_sampler_over_subset_and_batch_sampler(model: MLP, data: PairDataset) -> None:
    sub = Subset(data, list(range(20, 40)))
    loader = DataLoader(sub, batch_sampler=[[5, 1], [19]])  # any iterable of index lists
    result = compute_per_sample_losses(model, loader, nn.CrossEntropyLoss())
    np.testing.assert_array_equal(result.indices, [25, 21, 39])
    _check_pairing(result, model, data)
    wrapped = DataLoader(sub, batch_sampler=BatchSampler(FixedOrderSampler([0, 2]), 1, False))
    np.testing.assert_array_equal(dataset_indices_of(wrapped), [20, 22])


def test_seeded_random_sampler_generator_is_not_advanced(model: MLP, data: PairDataset) -> None:
    g = torch.Generator().manual_seed(5)
    loader = DataLoader(data, batch_size=8, sampler=torch.utils.data.RandomSampler(data, num_samples=30, generator=g))
    before = g.get_state()
    result = compute_per_sample_losses(model, loader, nn.CrossEntropyLoss())
    assert torch.equal(g.get_state(), before)
    assert len(result) == len(set(result.indices.tolist())) and len(result) <= 30
    _check_pairing(result, model, data)


def test_explicit_root_indices(model: MLP, data: PairDataset) -> None:
    sub = Subset(data, [1, 2, 3])
    result = compute_per_sample_losses(model, sub, nn.CrossEntropyLoss(), indices=[99, 0, 42])
    np.testing.assert_array_equal(result.indices, [99, 0, 42])
    _check_pairing(result, model, data)
    with pytest.raises(IndexError, match="103 samples"):
        compute_per_sample_losses(model, data, nn.CrossEntropyLoss(), indices=[103])
    with pytest.raises(ValueError, match="negative"):
        compute_per_sample_losses(model, data, nn.CrossEntropyLoss(), indices=[-1])
    with pytest.raises(TypeError, match="integers"):
        compute_per_sample_losses(model, data, nn.CrossEntropyLoss(), indices=[0.5])


def test_empty_indices_give_empty_result(model: MLP, data: PairDataset) -> None:
    result = compute_per_sample_losses(model, data, nn.CrossEntropyLoss(), indices=[])
    assert len(result) == 0 and result.losses.shape == (0,) and result.indices.shape == (0,)


class Stream(IterableDataset):
    def __init__(self, data: PairDataset) -> None:
        self.data = data

    def __iter__(self):
        return (self.data[i] for i in range(len(self.data)))


def test_iterable_dataset_indexed_by_stream_position(model: MLP, data: PairDataset) -> None:
    result = compute_per_sample_losses(model, Stream(data), nn.CrossEntropyLoss(), batch_size=32)
    np.testing.assert_array_equal(result.indices, np.arange(103))
    _check_pairing(result, model, data)
    with pytest.raises(ValueError, match="iterable-style"):
        compute_per_sample_losses(model, Stream(data), nn.CrossEntropyLoss(), indices=[1])


def test_training_flags_restored_and_no_gradients(data: PairDataset) -> None:
    torch.manual_seed(0)
    model = MLP(dropout=0.5, batchnorm=True)
    model.train()
    model.body[1].eval()  # a user's deliberate per-module choice must survive too
    compute_per_sample_losses(model, data, nn.CrossEntropyLoss())
    assert model.training and model.head.training and not model.body[1].training
    compute_per_sample_losses(model, data, nn.CrossEntropyLoss(), mirror_train_semantics=True)
    assert model.training and not model.body[1].training
    assert all(p.grad is None for p in model.parameters())


def test_global_rng_untouched(model: MLP, data: PairDataset) -> None:
    def draw() -> tuple:
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    expected = draw()
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    loader = DataLoader(data, batch_size=9, shuffle=True)
    compute_per_sample_losses(model, loader, nn.CrossEntropyLoss(), mirror_train_semantics=True)
    assert draw() == expected


def test_mirror_train_semantics_dropout_seeded_bn_frozen(data: PairDataset) -> None:
    torch.manual_seed(0)
    model = MLP(dropout=0.5, batchnorm=True)
    model.train()
    model(data.x[:50])  # give BatchNorm non-trivial running statistics
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    a = compute_per_sample_losses(model, data, nn.CrossEntropyLoss(), mirror_train_semantics=True)
    b = compute_per_sample_losses(model, data, nn.CrossEntropyLoss(), mirror_train_semantics=True)
    c = compute_per_sample_losses(model, data, nn.CrossEntropyLoss(), mirror_train_semantics=True, seed=7)
    ev = compute_per_sample_losses(model, data, nn.CrossEntropyLoss())
    np.testing.assert_array_equal(a.losses, b.losses)  # seeded dropout: repeatable
    assert not np.allclose(a.losses, c.losses)  # another seed, another dropout mask
    assert not np.allclose(a.losses, ev.losses)  # dropout really was active
    for k, v in model.state_dict().items():
        assert torch.equal(v, stats[k]), f"{k} changed"
    assert a.meta["mode"] == "train_mirror"
    _check_pairing(ev, model, data)


def test_analysis_mode_restores_on_error(model: MLP) -> None:
    model.train()
    with pytest.raises(RuntimeError):
        with analysis_mode(model):
            assert not model.training
            raise RuntimeError("boom")
    assert model.training


def test_scalar_only_losses_report_their_method(model: MLP, data: PairDataset) -> None:
    def scalar(out, y):
        return F.cross_entropy(out, y)

    def host(out, y):
        return F.cross_entropy(out, y).item()

    r1 = compute_per_sample_losses(model, data, scalar, batch_size=25)
    r2 = compute_per_sample_losses(model, data, host, batch_size=25)
    assert r1.meta["per_sample_method"] == VMAP and r2.meta["per_sample_method"] == ONE_BY_ONE
    _check_pairing(r1, model, data)
    _check_pairing(r2, model, data)


def test_progress_and_cancel(model: MLP, data: PairDataset, tmp_path: Path) -> None:
    seen: list[tuple[int, int | None]] = []
    compute_per_sample_losses(
        model, data, nn.CrossEntropyLoss(), batch_size=20, progress=lambda d, t: seen.append((d, t)), progress_interval_s=0.0
    )
    assert seen == [(20, 103), (40, 103), (60, 103), (80, 103), (100, 103), (103, 103), (103, 103)]
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(ScanCancelled, match="after 40 samples"):
        compute_per_sample_losses(
            model, data, nn.CrossEntropyLoss(), batch_size=20, materialize=False, cancel=cancel, spool_dir=str(tmp_path)
        )
    assert list(tmp_path.iterdir()) == []  # spool files removed on the way out


def test_materialize_false_spools_match(model: MLP, data: PairDataset, tmp_path: Path) -> None:
    full = compute_per_sample_losses(model, data, nn.CrossEntropyLoss(), batch_size=16)
    with compute_per_sample_losses(
        model, data, nn.CrossEntropyLoss(), batch_size=16, materialize=False, spool_dir=str(tmp_path)
    ) as spooled:
        assert isinstance(spooled.losses, ChunkedArraySpool) and isinstance(spooled.indices, ChunkedArraySpool)
        losses, indices = spooled.to_numpy()
        np.testing.assert_array_equal(losses, full.losses)
        np.testing.assert_array_equal(indices, full.indices)
        assert len(list(tmp_path.iterdir())) == 2
        del losses, indices
    assert list(tmp_path.iterdir()) == []


def test_amp_on_cpu_is_close(model: MLP, data: PairDataset) -> None:
    result = compute_per_sample_losses(model, data, nn.CrossEntropyLoss(), amp=True)
    assert result.meta["amp"] is True and result.losses.dtype == np.float32
    ref = reference_losses(model, data.x, data.y).numpy()
    np.testing.assert_allclose(result.losses, ref, atol=0.1)


def test_nan_losses_are_counted(model: MLP, data: PairDataset) -> None:
    def nan_on_odd(out, y):
        per = F.cross_entropy(out, y, reduction="none")
        return torch.where(y % 2 == 1, torch.full_like(per, float("nan")), per)

    result = compute_per_sample_losses(model, data, nan_on_odd)
    assert result.meta["non_finite"] == int((data.y % 2 == 1).sum())


def test_select_by_loss_range() -> None:
    losses = np.array([0.1, 0.5, np.nan, 0.9, 0.5], dtype=np.float32)
    idx = np.array([10, 11, 12, 13, 14])
    np.testing.assert_array_equal(select_by_loss_range(losses, idx, 0.5, 0.9), [11, 13, 14])
    np.testing.assert_array_equal(select_by_loss_range(losses, idx, None, 0.2), [10])
    np.testing.assert_array_equal(select_by_loss_range(losses, idx), [10, 11, 13, 14])
    with pytest.raises(ValueError, match="greater"):
        select_by_loss_range(losses, idx, 1.0, 0.0)
    with pytest.raises(ValueError, match="length"):
        select_by_loss_range(losses, idx[:2])
