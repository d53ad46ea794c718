"""Per-sample losses over a dataset: `compute_per_sample_losses` and its `PerSampleResult`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .batches import batch_size_of
from .calling import CallCache, cache_for
from .loss_calls import compute_batch_loss
from .scan import run_scan
from .spool import ChunkedArraySpool, close_spools, spooled_as_arrays


@dataclass
class PerSampleResult:
    """Per-sample losses and the root-dataset index of each, plus how they were obtained.

    `losses` (float32) and `indices` (int64) are NumPy arrays, or `ChunkedArraySpool`s when the
    scan ran with `materialize=False` (call `close()` when done with them). `meta` holds
    `samples`, `per_sample_method` (`reduction_none`, `already_per_sample`, `vmap` or
    `one_by_one`), `mode`, `seed`, `amp`, `batch_size`, `device`, `source`, `non_finite`,
    `elapsed_s`.
    """

    losses: np.ndarray | ChunkedArraySpool
    indices: np.ndarray | ChunkedArraySpool
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.losses)

    def to_numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """(losses, indices) as arrays (memory-mapped for spools: valid until `close`)."""
        return spooled_as_arrays(self.losses, self.indices)  # type: ignore[return-value]

    def close(self) -> None:
        """Remove spool files (no-op for in-memory results)."""
        close_spools(self.losses, self.indices)

    def __enter__(self) -> PerSampleResult:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def compute_per_sample_losses(
    model: Any,
    dataset_or_loader: Dataset | DataLoader,
    loss_fn: Callable[..., Any],
    indices: Any = None,
    *,
    batch_size: int | None = None,
    mirror_train_semantics: bool = False,
    amp: bool = False,
    amp_dtype: torch.dtype | None = None,
    materialize: bool = True,
    progress: Callable[[int, int | None], None] | None = None,
    progress_interval_s: float = 0.5,
    cancel: Callable[[], bool] | None = None,
    device: torch.device | str | None = None,
    seed: int = 1337,
    num_workers: int = 0,
    cache: CallCache | None = None,
    spool_dir: str | None = None,
) -> PerSampleResult:
    """Score every sample with its own loss, paired with its index in the root dataset.

    Reads `dataset_or_loader` unshuffled and without `drop_last` (the last partial batch is
    scored), at `indices` of the root dataset when given, or at the positions a custom sampler
    yields. The model runs in eval mode (or train mode with BatchNorm statistics frozen under
    `mirror_train_semantics`), under `torch.inference_mode()`, with RNGs seeded by `seed` and
    restored afterwards; every module's training flag is restored. `progress(done, total)` is
    called at most every `progress_interval_s` seconds and once at the end; `cancel()` returning
    True stops the scan with `ScanCancelled`. With `materialize=False` the results stay on disk.
    """
    call_cache = cache_for(model, cache)
    methods: Counter[str] = Counter()

    guarded_sizes: set[int] = set()

    def batch_losses(batch: Any) -> torch.Tensor:
        # Shape/broadcast warnings depend on the batch's shape, not its values: guard each new
        # batch size once (typically the first batch and the last, partial one), not every batch.
        size = batch_size_of(batch)
        guard = size not in guarded_sizes
        per = compute_batch_loss(model, batch, loss_fn, per_sample=True, cache=call_cache, warning_guard=guard)
        guarded_sizes.add(size)
        methods[call_cache.per_sample_method or ""] += 1
        return per

    sink, plan, dev = run_scan(
        model,
        dataset_or_loader,
        batch_losses,
        materialize=materialize,
        spool_dir=spool_dir,
        indices=indices,
        batch_size=batch_size,
        mirror_train_semantics=mirror_train_semantics,
        seed=seed,
        device=device,
        num_workers=num_workers,
        amp=amp,
        amp_dtype=amp_dtype,
        progress=progress,
        progress_interval_s=progress_interval_s,
        cancel=cancel,
    )
    losses, idx = sink.result()
    meta = {
        "samples": sink.rows,
        "per_sample_method": methods.most_common(1)[0][0] if methods else None,
        "per_sample_methods": sorted(methods),
        "mode": "train_mirror" if mirror_train_semantics else "eval",
        "seed": seed,
        "amp": bool(amp),
        "batch_size": plan.batch_size,
        "device": str(dev),
        "source": plan.source,
        "non_finite": sink.non_finite,
        "materialized": isinstance(losses, np.ndarray),
        "elapsed_s": sink.elapsed_s,
    }
    return PerSampleResult(losses, idx, meta)


def select_by_loss_range(
    losses: Any, indices: Any, min_loss: float | None = None, max_loss: float | None = None
) -> np.ndarray:
    """The indices whose loss lies in `[min_loss, max_loss]` (a missing bound is open; NaN never matches).

    `losses` and `indices` are aligned arrays (or spools), e.g. from a `PerSampleResult`.
    """
    loss = np.asarray(losses.to_numpy() if isinstance(losses, ChunkedArraySpool) else losses).reshape(-1)
    idx = np.asarray(indices.to_numpy() if isinstance(indices, ChunkedArraySpool) else indices).reshape(-1)
    if len(loss) != len(idx):
        raise ValueError(f"losses ({len(loss)}) and indices ({len(idx)}) differ in length")
    lo = -np.inf if min_loss is None else float(min_loss)
    hi = np.inf if max_loss is None else float(max_loss)
    if lo > hi:
        raise ValueError(f"min_loss ({lo}) is greater than max_loss ({hi})")
    return idx[(loss >= lo) & (loss <= hi)].astype(np.int64)
