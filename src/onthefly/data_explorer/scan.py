"""Scanning a dataset for analysis: which samples, in which order, paired with which root index;
and the guards that keep a scan from disturbing training (RNG state, train/eval flags, grads).
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    Subset,
)
from torch.utils.data._utils.collate import default_collate

from .batches import batch_size_of, move_to_device

DEFAULT_BATCH_SIZE = 256


# ---------------------------------------------------------------------------------------------
# datasets and indices


def root_dataset(ds: Any) -> Any:
    """The dataset under any chain of `Subset`s (a DataLoader's dataset for a DataLoader)."""
    if isinstance(ds, DataLoader):
        ds = ds.dataset
    while isinstance(ds, Subset):
        ds = ds.dataset
    return ds


def _root_map(ds: Any) -> np.ndarray | None:
    """Root index of each position of `ds` through nested Subsets; None when `ds` is the root."""
    mapping: np.ndarray | None = None
    while isinstance(ds, Subset):
        level = np.asarray(ds.indices, dtype=np.int64)
        mapping = level if mapping is None else level[mapping]
        ds = ds.dataset
    return mapping


def _batches_automatically(loader: DataLoader) -> bool:
    """True when the loader groups samples into batches itself (what DataLoader calls auto-collation)."""
    return loader.batch_sampler is not None


def _is_default_sampling(loader: DataLoader) -> bool:
    """True when the loader visits every sample of its dataset once (shuffled or not)."""
    if not _batches_automatically(loader):
        sampler = loader.sampler
    elif type(loader.batch_sampler) is BatchSampler:
        sampler = loader.batch_sampler.sampler
    else:
        return False
    if type(sampler) is SequentialSampler:
        return True
    return (
        type(sampler) is RandomSampler
        and not sampler.replacement
        and sampler.num_samples == len(sampler.data_source)
    )


def _sampler_positions(loader: DataLoader) -> np.ndarray:
    """The distinct dataset positions a custom sampler yields, in first-seen order.

    Iterating a sampler may draw random numbers: run under `rng_guard`. A sampler's own
    `generator` is saved and restored here.
    """
    source: Any
    if _batches_automatically(loader) and type(loader.batch_sampler) is not BatchSampler:
        source = loader.batch_sampler
        flat = True
    else:
        source = loader.batch_sampler.sampler if _batches_automatically(loader) else loader.sampler
        flat = False
    generators = [
        g for g in (getattr(source, "generator", None), getattr(getattr(source, "sampler", None), "generator", None))
        if isinstance(g, torch.Generator)
    ]
    states = [g.get_state() for g in generators]
    try:
        if flat:
            raw = np.fromiter((int(i) for batch in source for i in batch), dtype=np.int64)
        else:
            raw = np.fromiter((int(i) for i in source), dtype=np.int64)
    finally:
        for g, s in zip(generators, states):
            g.set_state(s)
    _, first = np.unique(raw, return_index=True)
    return raw[np.sort(first)]


def _check_positions(positions: Any, n: int | None, what: str) -> np.ndarray:
    arr = np.asarray(positions)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D sequence of integers, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{what} must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < 0:
        raise ValueError(f"{what} contains a negative index ({int(arr.min())})")
    if n is not None and arr.size and arr.max() >= n:
        raise IndexError(f"{what} contains index {int(arr.max())}, but the dataset has {n} samples")
    return arr


def _sized_len(ds: Any) -> int | None:
    try:
        return len(ds)
    except TypeError:
        return None


@dataclass
class ScanPlan:
    """What a scan reads: `dataset` at `positions` (None: all, in order), and how to name them.

    `root_map[p]` is the root-dataset index of position `p` of `dataset` (None: identity).
    `total` is the exact number of samples (None for iterable-style datasets, which are indexed
    by their position in the stream); `length_hint` is what progress reports count towards.
    """

    dataset: Any
    positions: np.ndarray | None
    root_map: np.ndarray | None
    total: int | None
    batch_size: int
    collate_fn: Callable[[list[Any]], Any]
    source: str
    worker_init_fn: Callable[[int], None] | None = None
    length_hint: int | None = None

    def __post_init__(self) -> None:
        if self.length_hint is None:
            self.length_hint = self.total

    def root_indices(self) -> np.ndarray:
        """Root-dataset index of every sample the scan visits, in visiting order."""
        if self.total is None:
            raise TypeError("an iterable-style dataset has no indices before it is read")
        pos = self.positions if self.positions is not None else np.arange(self.total, dtype=np.int64)
        return self.root_map[pos] if self.root_map is not None else pos.astype(np.int64, copy=True)

    def roots_of(self, offset: int, n: int) -> np.ndarray:
        """Root indices of the scan's samples `offset .. offset+n`."""
        if self.positions is not None:
            pos = self.positions[offset : offset + n]
        else:
            pos = np.arange(offset, offset + n, dtype=np.int64)
        return self.root_map[pos] if self.root_map is not None else pos


def plan_scan(
    data: Dataset | DataLoader, indices: Any = None, batch_size: int | None = None
) -> ScanPlan:
    """Decide what a scan of `data` reads and how each sample maps to the root dataset.

    - `indices` given: those root-dataset indices, in the order given;
    - a DataLoader with a custom sampler / batch sampler: the distinct positions it yields
      (iterate under `rng_guard`);
    - otherwise: every sample of the (loader's) dataset, in order (shuffling is ignored).
    Batch size and collate function come from the loader when not given; `drop_last` never applies.
    """
    loader = data if isinstance(data, DataLoader) else None
    ds = loader.dataset if loader is not None else data
    if batch_size is None:
        batch_size = (loader.batch_size if loader is not None else None) or DEFAULT_BATCH_SIZE
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    collate = default_collate
    worker_init_fn = None
    if loader is not None:
        collate = loader.collate_fn if _batches_automatically(loader) else default_collate
        worker_init_fn = loader.worker_init_fn

    if isinstance(ds, IterableDataset):
        if indices is not None:
            raise ValueError("indices cannot be used with an iterable-style dataset (it has no random access)")
        return ScanPlan(
            ds, None, None, None, batch_size, collate, "iterable", worker_init_fn, length_hint=_sized_len(ds)
        )

    if indices is not None:
        root = root_dataset(ds)
        positions = _check_positions(indices, _sized_len(root), "indices")
        return ScanPlan(root, positions, None, len(positions), batch_size, collate, "indices", worker_init_fn)

    n = _sized_len(ds)
    if n is None:
        raise TypeError(f"dataset {type(ds).__name__} has no len(); pass indices or an IterableDataset")
    root_map = _root_map(ds)
    if loader is not None and not _is_default_sampling(loader):
        positions = _check_positions(_sampler_positions(loader), n, "sampler indices")
        return ScanPlan(ds, positions, root_map, len(positions), batch_size, collate, "sampler", worker_init_fn)
    source = "loader" if loader is not None else "dataset"
    return ScanPlan(ds, None, root_map, n, batch_size, collate, source, worker_init_fn)


def dataset_indices_of(loader_or_dataset: Dataset | DataLoader) -> np.ndarray:
    """The root-dataset index of every sample a scan of this loader/dataset visits, in order.

    Through nested `Subset`s and custom samplers; a shuffling loader is read in dataset order.
    """
    with rng_guard():
        return plan_scan(loader_or_dataset).root_indices()


class _PositionSampler(Sampler[int]):
    """Yields the planned positions as Python ints, converting a chunk at a time."""

    def __init__(self, positions: np.ndarray) -> None:
        self.positions = positions

    def __len__(self) -> int:
        return len(self.positions)

    def __iter__(self) -> Iterator[int]:
        for start in range(0, len(self.positions), 65536):
            yield from self.positions[start : start + 65536].tolist()


def iter_plan(plan: ScanPlan, *, num_workers: int = 0) -> Iterator[tuple[Any, np.ndarray]]:
    """Yield `(batch, root_indices)` for a plan, with an unshuffled loader and no `drop_last`.

    Worker seeds come from the global torch RNG: run under `rng_guard(seed)` for repeatable
    workers and an untouched caller RNG.
    """
    sampler = _PositionSampler(plan.positions) if plan.positions is not None else None
    loader = DataLoader(
        plan.dataset,
        batch_size=plan.batch_size,
        shuffle=False,
        sampler=sampler,
        drop_last=False,
        collate_fn=plan.collate_fn,
        num_workers=num_workers,
        worker_init_fn=plan.worker_init_fn if num_workers else None,
    )
    offset = 0
    for batch in loader:
        n = batch_size_of(batch)
        if plan.total is None:
            roots = np.arange(offset, offset + n, dtype=np.int64)
        else:
            expected = min(plan.batch_size, plan.total - offset)
            if n != expected:
                raise ValueError(
                    f"the collate function produced a batch of {n} samples where {expected} were "
                    f"loaded (samples {offset}..{offset + expected - 1}); per-sample results "
                    "could not be paired with dataset indices"
                )
            roots = plan.roots_of(offset, n)
        yield batch, roots
        offset += n


# ---------------------------------------------------------------------------------------------
# guards


@contextlib.contextmanager
def rng_guard(seed: int | None = None) -> Iterator[None]:
    """Save Python, NumPy and torch (CPU, and CUDA when initialised) RNG states; restore on exit.

    With `seed`, the generators are seeded inside the block, so what runs there is repeatable
    and the caller's random streams continue as if the block never ran. CUDA is only touched
    when already initialised (seeding it lazily would change its state later).
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        if seed is not None:
            random.seed(seed)
            np.random.seed(seed % (2**32))
            torch.random.default_generator.manual_seed(seed)
            if cuda_states is not None:
                torch.cuda.manual_seed_all(seed)
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def _tracks_running_stats(module: nn.Module) -> bool:
    return bool(getattr(module, "track_running_stats", False)) and getattr(module, "running_mean", None) is not None


@contextlib.contextmanager
def analysis_mode(model: Any, *, mirror_train_semantics: bool = False) -> Iterator[None]:
    """Put a model in analysis mode for the block and restore every module's training flag.

    Default: `eval()`. With `mirror_train_semantics`: `train()` (dropout active) but modules
    with running statistics (BatchNorm and kin) in `eval()`, so their statistics stay frozen.
    """
    if not isinstance(model, nn.Module):
        yield
        return
    flags = [(m, m.training) for m in model.modules()]
    try:
        if mirror_train_semantics:
            model.train()
            for m in model.modules():
                if _tracks_running_stats(m):
                    m.eval()
        else:
            model.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def model_device(model: Any) -> torch.device:
    """Where a model's parameters (or buffers) live; CPU for a model without any."""
    if isinstance(model, nn.Module):
        for t in model.parameters():
            return t.device
        for t in model.buffers():
            return t.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# the scan loop


class ScanCancelled(RuntimeError):
    """A scan stopped because its `cancel` callback returned True."""


class ResultSink:
    """Collects per-sample values (scalars or rows) and their root indices for a scan.

    Device tensors are gathered and copied to the host every `flush_rows` samples (not every
    batch), into preallocated arrays when `materialize` and the size is known, else into
    `ChunkedArraySpool`s so memory stays bounded.
    """

    def __init__(
        self, total: int | None, *, materialize: bool, spool_dir: Any = None, flush_rows: int = 65536
    ) -> None:
        self.total = total
        self.materialize = materialize
        self.spool_dir = spool_dir
        self.flush_rows = flush_rows
        self.rows = 0
        self.non_finite = 0
        self.width: int | None = None
        self._pending: list[torch.Tensor] = []
        self._pending_roots: list[np.ndarray] = []
        self._pending_rows = 0
        self._values: Any = None
        self._indices: Any = None
        self.elapsed_s = 0.0

    def add(self, values: torch.Tensor, roots: np.ndarray) -> None:
        if values.shape[0] != len(roots):
            raise ValueError(f"got {values.shape[0]} values for a batch of {len(roots)} samples")
        self._pending.append(values.detach())
        self._pending_roots.append(roots)
        self._pending_rows += len(roots)
        if self._pending_rows >= self.flush_rows:
            self.flush()

    def _open(self, sample: np.ndarray) -> None:
        from .spool import ChunkedArraySpool

        self.width = None if sample.ndim == 1 else int(np.prod(sample.shape[1:]))
        row = () if self.width is None else (self.width,)
        if self.materialize and self.total is not None:
            self._values = np.empty((self.total, *row), dtype=np.float32)
            self._indices = np.empty(self.total, dtype=np.int64)
        else:
            self._values = ChunkedArraySpool("float32", width=self.width, dir=self.spool_dir)
            self._indices = ChunkedArraySpool("int64", dir=self.spool_dir)

    def flush(self) -> None:
        if not self._pending:
            return
        values = torch.cat([v.reshape(v.shape[0], -1) if v.dim() > 1 else v for v in self._pending])
        host = values.float().cpu().numpy()
        roots = np.concatenate(self._pending_roots)
        self._pending, self._pending_roots, self._pending_rows = [], [], 0
        if self._values is None:
            self._open(host)
        elif (None if host.ndim == 1 else host.shape[1]) != self.width:
            raise ValueError(f"per-sample rows changed width from {self.width} to {host.shape[1:]}")
        self.non_finite += int(np.count_nonzero(~np.isfinite(host)))
        if isinstance(self._values, np.ndarray):
            self._values[self.rows : self.rows + len(host)] = host
            self._indices[self.rows : self.rows + len(roots)] = roots
        else:
            self._values.extend(host)
            self._indices.extend(roots)
        self.rows += len(host)

    def result(self, empty_width: int | None = None) -> tuple[Any, Any]:
        """(values, indices): arrays when materialised, else spools (the caller owns them)."""
        self.flush()
        if self._values is None:
            row = () if empty_width is None else (empty_width,)
            self._open(np.empty((0, *row), dtype=np.float32))
        if self.materialize and not isinstance(self._values, np.ndarray):
            return self._values.finish(), self._indices.finish()
        if isinstance(self._values, np.ndarray) and self.rows != len(self._values):
            raise RuntimeError(f"scan produced {self.rows} values for {len(self._values)} planned samples")
        return self._values, self._indices

    def discard(self) -> None:
        """Drop everything (removes spool files); used when the scan fails."""
        self._pending, self._pending_roots = [], []
        for spool in (self._values, self._indices):
            if spool is not None and not isinstance(spool, np.ndarray):
                spool.close()


def autocast_context(device: torch.device, amp: bool, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast on `device` when `amp` (float16 on CUDA, bfloat16 elsewhere, unless `amp_dtype`)."""
    if not amp:
        return contextlib.nullcontext()
    dtype = amp_dtype or (torch.float16 if device.type == "cuda" else torch.bfloat16)
    return torch.autocast(device_type=device.type, dtype=dtype)


def run_scan(
    model: Any,
    data: Dataset | DataLoader,
    batch_fn: Callable[[Any], torch.Tensor],
    *,
    materialize: bool = True,
    spool_dir: Any = None,
    indices: Any = None,
    batch_size: int | None = None,
    mirror_train_semantics: bool = False,
    seed: int = 1337,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    amp: bool = False,
    amp_dtype: torch.dtype | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    progress_interval_s: float = 0.5,
    cancel: Callable[[], bool] | None = None,
) -> tuple[ResultSink, ScanPlan, torch.device]:
    """Run `batch_fn(batch_on_device) -> (B, ...) tensor` over a scan plan into a `ResultSink`.

    Everything a scan promises happens here: RNG saved, seeded and restored; each module's
    training flag restored; inference mode (no graph, no grads kept); AMP when asked; progress
    at most every `progress_interval_s` seconds and once at the end; `cancel` checked per batch.
    """
    dev = torch.device(device) if device is not None else model_device(model)
    with rng_guard(seed):
        plan = plan_scan(data, indices, batch_size)
        out = ResultSink(plan.total, materialize=materialize, spool_dir=spool_dir)
        started = last = time.monotonic()
        done = 0
        try:
            with analysis_mode(model, mirror_train_semantics=mirror_train_semantics), torch.inference_mode():
                for batch, roots in iter_plan(plan, num_workers=num_workers):
                    if cancel is not None and cancel():
                        raise ScanCancelled(f"scan cancelled after {done} samples")
                    batch = move_to_device(batch, dev)
                    with autocast_context(dev, amp, amp_dtype):
                        values = batch_fn(batch)
                    out.add(values, roots)
                    done += len(roots)
                    if progress is not None and time.monotonic() - last >= progress_interval_s:
                        last = time.monotonic()
                        progress(done, plan.length_hint)
            out.flush()
        except BaseException:
            out.discard()
            raise
    if progress is not None:
        progress(done, plan.length_hint if plan.length_hint is not None else done)
    out.elapsed_s = time.monotonic() - started
    return out, plan, dev
