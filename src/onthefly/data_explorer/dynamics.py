"""Training dynamics on disk: `DynamicsRecorder` scores every training sample at fixed points of
training (each epoch end, or every N steps) and appends one record per point to a folder.

One record holds, for every sample, its loss and, for classification, the probability of its
labelled class (`p_true`), the predicted class and its probability, the margin and correctness.
Columns are flat record-major files (`loss.bin` float32, `p_true.bin`/`p_pred.bin`/`margin.bin`
float16, `pred.bin` int16/int32, `correct.bin` uint8): about 12 bytes per sample per record,
written and read through memory maps, so a million samples × hundreds of records stay on disk.
A record is committed by rewriting `dynamics.json` atomically after its column blocks are
fsynced; bytes past the committed records (a crash mid-record) are ignored and overwritten.
The views (cartography, forgetting, AUM, the mislabel score) are in `cartography`.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..fileio import atomic_write
from .batches import batch_size_of, split_batch
from .calling import CallCache, cache_for, call_model, ensure_tensor_output, targets_for
from .classification import OUTPUT_KINDS, TaskSpec, classification_stats, infer_task
from .errors import DynamicsError
from .loss_calls import compute_batch_loss
from .scan import dataset_indices_of, run_scan

FORMAT = "onthefly.dynamics"
VERSION = 1
MANIFEST = "dynamics.json"
CLASS_COLUMNS = ("p_true", "p_pred", "pred", "margin", "correct")
COLUMNS = ("loss", *CLASS_COLUMNS)
# The row a scan produces per sample, before the optional probability vector.
_ROW = ("loss", "p_true", "p_pred", "pred", "margin", "correct", "label")


@dataclass(frozen=True)
class DynamicsRecord:
    """One committed record: its number (0, 1, ...), the training step and epoch it was taken at,
    an optional tag, how many samples it scored and what it cost."""

    number: int
    step: int
    epoch: int | None
    tag: str | None
    samples: int
    elapsed_s: float
    non_finite: int
    extra_forward_batches: int
    per_sample_method: str | None
    created: float

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DynamicsRecord:
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class DynamicsSchedule:
    """When to record: after every `every_epochs`-th epoch and/or every `every_steps` steps.

    `due(...)` is a pure check the training loop calls at each boundary; a point already
    recorded (`last_step`) is never due twice.
    """

    every_epochs: int | None = 1
    every_steps: int | None = None

    def __post_init__(self) -> None:
        for name in ("every_epochs", "every_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"DynamicsSchedule.{name} must be a positive int or None, got {value!r}")
        if self.every_epochs is None and self.every_steps is None:
            raise ValueError("DynamicsSchedule needs every_epochs or every_steps")

    def due(self, *, step: int, epoch: int, epoch_end: bool, last_step: int | None = None) -> bool:
        """True when a record should be taken now. `epoch` is the 0-based epoch that is running
        (at an epoch end: the one that just finished); `step` counts optimizer steps done."""
        if last_step is not None and step == last_step:
            return False
        if epoch_end and self.every_epochs is not None and (epoch + 1) % self.every_epochs == 0:
            return True
        return not epoch_end and self.every_steps is not None and step > 0 and step % self.every_steps == 0


def _column_dtype(name: str, num_classes: int | None) -> np.dtype:
    if name == "loss":
        return np.dtype(np.float32)
    if name == "pred":
        return np.dtype(np.int16 if (num_classes or 0) <= np.iinfo(np.int16).max else np.int32)
    if name == "correct":
        return np.dtype(np.uint8)
    return np.dtype(np.float16)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


class _BlockWriter:
    """Writes one record's block of one column: sequentially through a file handle when the
    scan visited samples in index order, else scattered through a memory map of the block."""

    def __init__(self, path: Path, dtype: np.dtype, number: int, n: int, sequential: bool) -> None:
        self.dtype = dtype
        self._file = open(path, "r+b" if path.exists() else "w+b")
        self._file.truncate((number + 1) * n * dtype.itemsize)  # drops any uncommitted tail first
        self._map: np.memmap | None = None
        if sequential:
            self._file.seek(number * n * dtype.itemsize)
        else:
            self._map = np.memmap(path, dtype=dtype, mode="r+", offset=number * n * dtype.itemsize, shape=(n,))

    def put(self, pos: Any, values: np.ndarray) -> None:
        if self._map is None:
            self._file.write(np.ascontiguousarray(values, dtype=self.dtype).tobytes())
        else:
            self._map[pos] = values.astype(self.dtype)

    def close(self) -> None:
        if self._map is not None:
            self._map.flush()
            self._map = None
        self._file.flush()
        self._file.close()


class DynamicsRecorder:
    """Per-sample training dynamics, recorded into `folder` and reloaded from it.

    `DynamicsRecorder(folder)` opens what is there (or starts empty). `record(model, data,
    loss_fn, step=...)` scores every sample of `data` once, the way `compute_per_sample_losses`
    does (its own unshuffled loader, no `drop_last`, eval mode, RNG seeded and restored, no
    grad), in one forward pass per batch: the model's outputs are taken from the same call that
    computes the loss. Results are indexed by root-dataset index; every record must visit the
    same samples (record a fork's subset in its own folder).
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        output_kind: str = "auto",
    ) -> None:
        if output_kind not in OUTPUT_KINDS:
            raise ValueError(f"output_kind must be one of {OUTPUT_KINDS}, got {output_kind!r}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.output_kind = output_kind
        self._lock = threading.Lock()
        self._records: list[DynamicsRecord] = []
        self._indices: np.ndarray | None = None
        self._labels: np.ndarray | None = None
        self._task: TaskSpec | None = None
        self._dtypes: dict[str, np.dtype] = {}
        self._load()

    # ---- the folder ------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.folder / MANIFEST

    def _load(self) -> None:
        path = self.manifest_path
        if not path.is_file():
            return
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DynamicsError(f"{path}: cannot read the dynamics manifest: {exc}") from exc
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise DynamicsError(f"{path}: not an {FORMAT} v{VERSION} manifest "
                                f"(format={manifest.get('format')!r}, version={manifest.get('version')!r})")
        task = TaskSpec.from_dict(manifest["task"])
        if self.output_kind != "auto" and task.is_classification and task.output_kind != self.output_kind:
            raise DynamicsError(f"{path}: recorded with output_kind={task.output_kind!r}, "
                                f"opened with output_kind={self.output_kind!r}")
        self._task = task
        self._dtypes = {k: np.dtype(v) for k, v in manifest["columns"].items()}
        self._records = [DynamicsRecord.from_dict(r) for r in manifest["records"]]
        self._indices = np.load(self.folder / "indices.npy", allow_pickle=False)
        if len(self._indices) != manifest["samples"]:
            raise DynamicsError(f"{self.folder / 'indices.npy'}: {len(self._indices)} indices, "
                                f"the manifest says {manifest['samples']} samples")
        labels = self.folder / "labels.npy"
        self._labels = np.load(labels, allow_pickle=False) if task.is_classification else None
        if self._labels is not None and len(self._labels) != len(self._indices):
            raise DynamicsError(f"{labels}: {len(self._labels)} labels for {len(self._indices)} samples")
        need = len(self._records) * len(self._indices)
        for name, dtype in self._dtypes.items():
            f = self._column_path(name)
            size = f.stat().st_size if f.is_file() else -1
            if size < need * dtype.itemsize:
                raise DynamicsError(f"{f}: holds {max(size, 0)} bytes, {len(self._records)} committed "
                                    f"records need {need * dtype.itemsize}")

    def _column_path(self, name: str) -> Path:
        return self.folder / f"{name}.bin"

    def _commit(self, records: list[DynamicsRecord]) -> None:
        assert self._task is not None and self._indices is not None
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "samples": len(self._indices),
            "task": self._task.to_dict(),
            "columns": {k: v.name for k, v in self._dtypes.items()},
            "records": [asdict(r) for r in records],
        }
        data = json.dumps(manifest, indent=1).encode()
        atomic_write(self.manifest_path, lambda f: f.write(data))

    # ---- what is recorded --------------------------------------------------------------------
    @property
    def records(self) -> list[DynamicsRecord]:
        """The committed records, oldest first."""
        with self._lock:
            return list(self._records)

    @property
    def num_records(self) -> int:
        with self._lock:
            return len(self._records)

    @property
    def last_step(self) -> int | None:
        """The step of the latest record (None before the first)."""
        with self._lock:
            return self._records[-1].step if self._records else None

    @property
    def indices(self) -> np.ndarray:
        """Root-dataset index of each sample, ascending: position `i` of every column is sample `indices[i]`."""
        if self._indices is None:
            raise DynamicsError(f"{self.folder}: nothing recorded yet")
        return self._indices

    @property
    def labels(self) -> np.ndarray | None:
        """The label of each sample (aligned with `indices`) for classification; None otherwise."""
        return self._labels

    @property
    def task(self) -> TaskSpec | None:
        """What the first record found: classification (and how outputs were read) or loss only."""
        return self._task

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self._dtypes)

    def history(self, column: str, records: Any = None) -> np.ndarray:
        """(R, N) values of `column` for the committed records (a read-only memory map; `records`
        selects rows: a slice, a list of record numbers, or None for all)."""
        with self._lock:
            count = len(self._records)
        if column not in self._dtypes:
            raise KeyError(f"no column {column!r} was recorded (columns: {list(self._dtypes) or 'none yet'})")
        n = len(self.indices)
        if count == 0:
            return np.empty((0, n), dtype=self._dtypes[column])
        mm = np.memmap(self._column_path(column), dtype=self._dtypes[column], mode="r", shape=(count, n))
        return mm if records is None else mm[records]

    def values(self, column: str, record: int = -1) -> np.ndarray:
        """One record's values of `column` (N,), as an in-memory array."""
        hist = self.history(column)
        if not len(hist):
            raise DynamicsError(f"{self.folder}: nothing recorded yet")
        return np.array(hist[record])

    def disk_bytes(self) -> int:
        """Bytes the committed records take on disk."""
        n = 0 if self._indices is None else len(self._indices)
        per_record = sum(d.itemsize for d in self._dtypes.values()) * n
        return self.num_records * per_record

    def summary(self, records: Any = None) -> Any:
        """The per-sample views over the records (`cartography.DynamicsSummary`)."""
        from .cartography import summarize_dynamics

        return summarize_dynamics(self, records)

    # ---- recording ---------------------------------------------------------------------------
    def record(
        self,
        model: Any,
        data: Dataset | DataLoader,
        loss_fn: Callable[..., Any],
        *,
        step: int,
        epoch: int | None = None,
        tag: str | None = None,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        amp: bool = False,
        amp_dtype: torch.dtype | None = None,
        seed: int = 1337,
        num_workers: int = 0,
        mirror_train_semantics: bool = False,
        cache: CallCache | None = None,
        progress: Callable[[int, int | None], None] | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> DynamicsRecord:
        """Score every sample of `data` once and append the result as the next record.

        Call at a batch boundary (never inside a step): the model's train/eval flags and every
        RNG are restored afterwards, so training continues exactly as without the record.
        Raises `DynamicsError` when the samples or labels differ from the first record's.
        """
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        with self._lock:
            return self._record(model, data, loss_fn, step=step, epoch=epoch, tag=tag, batch_size=batch_size,
                                device=device, amp=amp, amp_dtype=amp_dtype, seed=seed, num_workers=num_workers,
                                mirror=mirror_train_semantics, cache=cache, progress=progress, cancel=cancel)

    def _check_planned_samples(self, data: Any) -> None:
        """Refuse, before scanning, a record that would visit other samples than the first one."""
        if self._indices is None:
            return
        try:
            planned = dataset_indices_of(data)
        except TypeError:
            return  # an iterable-style dataset: checked once read
        same = len(planned) == len(self._indices) and (
            np.array_equal(planned, self._indices) or np.array_equal(np.sort(planned), self._indices))
        if not same:
            raise DynamicsError(
                f"this record would visit {len(planned)} samples, not the {len(self._indices)} of the "
                f"first record in {self.folder}; record another subset in another folder"
            )

    def _record(self, model: Any, data: Any, loss_fn: Callable[..., Any], *, step: int, epoch: int | None,
                tag: str | None, batch_size: int | None, device: Any, amp: bool, amp_dtype: Any, seed: int,
                num_workers: int, mirror: bool, cache: CallCache | None,
                progress: Any, cancel: Any) -> DynamicsRecord:
        self._check_planned_samples(data)
        call_cache = cache_for(model, cache)
        task = self._task
        extra = {"forward": 0, "method": None}
        guarded_sizes: set[int] = set()

        def batch_rows(batch: Any) -> torch.Tensor:
            nonlocal task
            n = batch_size_of(batch)
            # Shape warnings depend on the batch size only: guard each new size once (as scans do).
            per, outputs = _loss_and_outputs(model, batch, loss_fn, call_cache, guard=n not in guarded_sizes)
            guarded_sizes.add(n)
            per = per.reshape(n).float()
            extra["method"] = call_cache.per_sample_method
            if task is None or task.is_classification:
                if outputs is None:
                    outputs = call_model(model, batch, call_cache)  # the loss did not show us the outputs
                    extra["forward"] += 1
                out = ensure_tensor_output(outputs)
                targets = targets_for(call_cache.inputs, split_batch(batch))
                if task is None:
                    task = infer_task(out, targets, loss_fn=loss_fn, output_kind=self.output_kind)
            if not task.is_classification:
                return per.reshape(n, 1)
            stats = classification_stats(out, targets, task)
            cols = [per, stats["p_true"], stats["p_pred"], stats["pred"].float(), stats["margin"],
                    stats["correct"].float(), stats["labels"].float()]
            return torch.stack([c.to(per.device).float() for c in cols], dim=1)

        sink, _plan, _dev = run_scan(
            model, data, batch_rows, materialize=False, spool_dir=self.folder, batch_size=batch_size,
            mirror_train_semantics=mirror, seed=seed, device=device, num_workers=num_workers, amp=amp,
            amp_dtype=amp_dtype, progress=progress, cancel=cancel,
        )
        values, roots = sink.result()
        try:
            if task is None:
                raise DynamicsError("the data has no samples; nothing to record")
            return self._append(values, roots, task, step=step, epoch=epoch, tag=tag,
                                elapsed=sink.elapsed_s, non_finite=sink.non_finite,
                                extra_forward=extra["forward"], method=extra["method"])
        finally:
            values.close()
            roots.close()

    def _order(self, roots: Any, first: bool) -> tuple[np.ndarray, bool]:
        """(indices, in_order): the record's root indices, ascending, and whether the scan visited
        them in that order (then blocks are written sequentially, without a memory map)."""
        expected = self._indices
        in_order = True
        parts: list[np.ndarray] = []
        count = 0
        last = -1
        for chunk in roots.iter_chunks():
            c = np.asarray(chunk, dtype=np.int64)
            if first:
                parts.append(c)
                if in_order and c.size and (c[0] <= last or (c.size > 1 and bool(np.any(np.diff(c) <= 0)))):
                    in_order = False
            elif in_order and (count + c.size > len(expected) or not np.array_equal(c, expected[count:count + c.size])):
                in_order = False
            last = int(c[-1]) if c.size else last
            count += c.size
        if first:
            visited = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
            if in_order:
                return visited, True
            order = np.sort(visited)
            if order.size > 1 and bool(np.any(np.diff(order) == 0)):
                raise DynamicsError("the scan visited a sample twice; cannot index the record by sample")
            return order, False
        if in_order and count == len(expected):
            return expected, True
        if count != len(expected) or not np.array_equal(np.sort(roots.to_numpy()), expected):
            raise DynamicsError(f"this record visited {count} samples, not the {len(expected)} "
                                f"of the first record in {self.folder}")
        return expected, False

    def _append(self, values: Any, roots: Any, task: TaskSpec, *, step: int,
                epoch: int | None, tag: str | None, elapsed: float, non_finite: int, extra_forward: int,
                method: str | None) -> DynamicsRecord:
        first = not self._records
        indices, in_order = self._order(roots, first)
        n = len(indices)
        columns = COLUMNS if task.is_classification else ("loss",)
        dtypes = self._dtypes if not first else {c: _column_dtype(c, task.num_classes) for c in columns}
        number = len(self._records)
        labels = self._labels if not first else (np.empty(n, dtype=np.int64) if task.is_classification else None)
        writers = {name: _BlockWriter(self._column_path(name), dtype, number, n, in_order)
                   for name, dtype in dtypes.items()}
        mismatched = 0
        first_mismatch = None
        offset = 0
        try:
            for chunk, chunk_roots in zip(values.iter_chunks(), roots.iter_chunks()):
                pos: Any = (slice(offset, offset + len(chunk)) if in_order
                            else np.searchsorted(indices, chunk_roots))
                offset += len(chunk)
                writers["loss"].put(pos, chunk[:, 0])
                if not task.is_classification:
                    continue
                for j, name in enumerate(_ROW[1:6], start=1):
                    writers[name].put(pos, chunk[:, j])
                chunk_labels = chunk[:, 6].astype(np.int64)
                if first:
                    labels[pos] = chunk_labels
                else:
                    bad = labels[pos] != chunk_labels
                    if bad.any():
                        mismatched += int(bad.sum())
                        if first_mismatch is None:
                            first_mismatch = int(indices[pos][bad][0])
        finally:
            for writer in writers.values():
                writer.close()  # blocks past the committed records are ignored and overwritten later
        if mismatched:
            raise DynamicsError(
                f"{mismatched} sample(s) changed label since the first record (e.g. sample {first_mismatch}); "
                f"record relabelled data in a new folder"
            )
        for name in writers:
            _fsync(self._column_path(name))
        if first:
            self._indices, self._labels, self._task, self._dtypes = indices, labels, task, dict(dtypes)
            _save_npy(self.folder / "indices.npy", indices)
            if labels is not None:
                _save_npy(self.folder / "labels.npy", labels)
        record = DynamicsRecord(number, step, epoch, tag, n, round(elapsed, 6), non_finite, extra_forward,
                                method, time.time())
        self._commit([*self._records, record])
        self._records.append(record)
        return record

    def read_block(self, column: str, records: list[int], start: int, stop: int) -> np.ndarray:
        """Values of `column` for samples `start:stop` (positions in `indices`) of the given
        record numbers: a (len(records), stop - start) array read with plain file reads, so
        memory holds only this block (no memory map grows with the folder)."""
        dtype = self._dtypes[column]
        n = len(self.indices)
        if not 0 <= start <= stop <= n:
            raise IndexError(f"sample positions {start}:{stop} outside 0:{n}")
        out = np.empty((len(records), stop - start), dtype=dtype)
        with open(self._column_path(column), "rb") as f:
            for row, r in enumerate(records):
                f.seek((r * n + start) * dtype.itemsize)
                data = f.read((stop - start) * dtype.itemsize)
                if len(data) != (stop - start) * dtype.itemsize:
                    raise DynamicsError(f"{self._column_path(column)}: record {r} is shorter than {n} samples")
                out[row] = np.frombuffer(data, dtype=dtype)
        return out

    def __repr__(self) -> str:
        return f"DynamicsRecorder({str(self.folder)!r}, records={self.num_records})"


def _loss_and_outputs(
    model: Any, batch: Any, loss_fn: Callable[..., Any], cache: CallCache, *, guard: bool = True
) -> tuple[torch.Tensor, Any | None]:
    """Per-sample losses of a batch, and the model's outputs from the same forward pass.

    The outputs are those of the model's first top-level call with this batch's size (the
    loss's own call for `loss(outputs, targets)`; the batched call that precedes a vmap or
    one-by-one fallback). None when the model is not an `nn.Module` or never ran on the batch
    (a closure loss calling another model): the caller then runs the model itself.
    """
    n = batch_size_of(batch)
    captured: list[Any] = []
    handle = None
    if isinstance(model, nn.Module):
        def keep(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if not captured:
                captured.append(output)

        handle = model.register_forward_hook(keep)
    try:
        per = compute_batch_loss(model, batch, loss_fn, per_sample=True, cache=cache, warning_guard=guard)
    finally:
        if handle is not None:
            handle.remove()
    outputs = captured[0] if captured else None
    if outputs is not None:
        try:
            tensor = ensure_tensor_output(outputs)
        except TypeError:
            return per, None
        if tensor.dim() == 0 or tensor.shape[0] != n:
            return per, None
    return per, outputs

