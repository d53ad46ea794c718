"""Subset tables: `export_subset_table` writes chosen samples (id, label, loss, cluster, user
columns) as Parquet, Feather, CSV or JSON, atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch

from ..fileio import atomic_write
from .batches import TARGET_KEYS
from .scan import root_dataset

FORMATS = ("parquet", "feather", "csv", "json")
_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".feather": "feather", ".arrow": "feather", ".csv": "csv", ".json": "json"}
_RESERVED = ("sample_id", "label", "loss", "cluster")
EXPLORER_EXTRA = "pip install 'onthefly[explorer]'"

Adapter = Callable[[int, Any], Mapping[str, Any]]


@dataclass
class ExportResult:
    """Where the table went, how many rows and which columns it has."""

    path: str
    rows: int
    format: str
    columns: list[str]


def format_for(path: str | os.PathLike[str], format: str | None = None) -> str:
    """The table format to write: `format` if given, else from the file suffix."""
    if format is not None:
        fmt = format.lower()
        if fmt not in FORMATS:
            raise ValueError(f"unknown export format {format!r}; expected one of {', '.join(FORMATS)}")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIXES:
        raise ValueError(
            f"cannot tell the export format from {str(path)!r}; pass format= one of {', '.join(FORMATS)}"
        )
    return _SUFFIXES[suffix]


def plain_value(value: Any) -> Any:
    """A JSON/Arrow-friendly Python value: tensors and NumPy values become numbers or lists."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.dim() == 0 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return [plain_value(v) for v in value]
    return value


def _fast_labels(root: Any) -> Any:
    """A dataset-wide label array (`targets`/`labels` attribute, as torchvision has), or None."""
    for name in ("targets", "labels"):
        labels = getattr(root, name, None)
        if labels is None or isinstance(labels, (str, bytes)):
            continue
        try:
            if len(labels) == len(root):
                return labels
        except TypeError:
            continue
    return None


def label_of_item(item: Any) -> Any:
    """The label in a dataset item: element 1 of a tuple/list, or a target-named field; else None."""
    if isinstance(item, (list, tuple)) and len(item) >= 2:
        return plain_value(item[1])
    if isinstance(item, Mapping):
        for key in TARGET_KEYS:
            if key in item:
                return plain_value(item[key])
    return None


def _as_array(values: Any) -> np.ndarray:
    """An array from a sequence, tensor, spool (`to_numpy`) or pandas Series."""
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    if not isinstance(values, np.ndarray) and hasattr(values, "to_numpy"):
        return np.asarray(values.to_numpy())
    return np.asarray(values)


def _aligned(values: Any, indices: np.ndarray, name: str, cast: Callable[[Any], Any]) -> list[Any] | None:
    if values is None:
        return None
    if isinstance(values, Mapping):
        return [cast(values[i]) if i in values else None for i in indices.tolist()]
    arr = _as_array(values).reshape(-1)
    if len(arr) != len(indices):
        raise ValueError(f"{name} has {len(arr)} values for {len(indices)} indices; pass one per index or a mapping")
    return [cast(v) for v in arr.tolist()]


def _finite_or_none(v: Any) -> float | None:
    if v is None:
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def export_subset_table(
    dataset: Any,
    indices: Any,
    out_path: str | os.PathLike[str],
    *,
    format: str | None = None,
    losses: Any = None,
    clusters: Any = None,
    adapter: Adapter | None = None,
    include_labels: bool = True,
) -> ExportResult:
    """Write one row per index: `sample_id`, `label` (when the dataset yields one), `loss` and
    `cluster` (when given), and the columns `adapter(index, item)` returns.

    `indices` are root-dataset indices (as `PerSampleResult.indices`), kept in the order given.
    `losses`/`clusters` are aligned with `indices` or map index -> value. Non-finite losses are
    written as nulls. The format comes from `format` or the suffix (parquet, feather, csv, json).
    """
    fmt = format_for(out_path, format)
    root = root_dataset(dataset)
    idx = _as_array(indices)
    if idx.ndim != 1:
        raise ValueError(f"indices must be 1-D, got shape {idx.shape}")
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"indices must be integers, got dtype {idx.dtype}")
    idx = idx.astype(np.int64, copy=False)
    try:
        n = len(root)
    except TypeError:
        n = None
    if idx.size and (idx.min() < 0 or (n is not None and idx.max() >= n)):
        bad = int(idx.min()) if idx.min() < 0 else int(idx.max())
        raise IndexError(f"index {bad} is outside the dataset of {n} samples")

    columns: dict[str, list[Any]] = {"sample_id": idx.tolist()}
    fast = _fast_labels(root) if include_labels else None
    need_items = adapter is not None or (include_labels and fast is None)
    labels: list[Any] = []
    added_rows: list[Mapping[str, Any]] = []
    for i in columns["sample_id"]:
        item = root[i] if need_items else None
        if include_labels:
            labels.append(plain_value(fast[i]) if fast is not None else label_of_item(item))
        if adapter is not None:
            added = adapter(i, item)
            if not isinstance(added, Mapping):
                raise TypeError(f"adapter returned {type(added).__name__} for index {i}; expected a mapping of columns")
            added_rows.append(added)
    extra_names = list(dict.fromkeys(k for added in added_rows for k in added))
    clash = [k for k in extra_names if k in _RESERVED]
    if clash:
        raise ValueError(f"adapter columns {clash} clash with built-in columns ({', '.join(_RESERVED)})")
    extra = {k: [plain_value(added.get(k)) for added in added_rows] for k in extra_names}
    if include_labels and any(v is not None for v in labels):
        columns["label"] = labels
    loss_col = _aligned(losses, idx, "losses", _finite_or_none)
    if loss_col is not None:
        columns["loss"] = loss_col
    cluster_col = _aligned(clusters, idx, "clusters", lambda v: None if v is None else int(v))
    if cluster_col is not None:
        columns["cluster"] = cluster_col
    columns.update(extra)

    writer = {"parquet": _write_parquet, "feather": _write_feather, "csv": _write_csv, "json": _write_json}[fmt]
    atomic_write(out_path, lambda f: writer(columns, f))
    return ExportResult(str(Path(out_path).resolve()), len(idx), fmt, list(columns))


def _arrow_table(columns: dict[str, list[Any]]) -> Any:
    try:
        import pyarrow as pa
    except ImportError as exc:
        raise ImportError(f"Parquet and Feather export need pyarrow: {EXPLORER_EXTRA}") from exc
    arrays = {}
    for name, values in columns.items():
        try:
            arrays[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise ValueError(f"column {name!r} mixes value types that a table cannot hold: {exc}") from exc
    return pa.table(arrays)


def _write_parquet(columns: dict[str, list[Any]], f: BinaryIO) -> None:
    table = _arrow_table(columns)
    import pyarrow.parquet as pq

    pq.write_table(table, f)


def _write_feather(columns: dict[str, list[Any]], f: BinaryIO) -> None:
    table = _arrow_table(columns)
    import pyarrow.feather as pf

    pf.write_feather(table, f)


def _cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return value


def _write_csv(columns: dict[str, list[Any]], f: BinaryIO) -> None:
    text = io.TextIOWrapper(f, encoding="utf-8", newline="")
    w = csv.writer(text)
    names = list(columns)
    w.writerow(names)
    for row in zip(*(columns[c] for c in names)):
        w.writerow([_cell(v) for v in row])
    text.flush()
    text.detach()  # leave `f` open for the caller's fsync


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _write_json(columns: dict[str, list[Any]], f: BinaryIO) -> None:
    names = list(columns)
    records = [{c: _json_safe(v) for c, v in zip(names, row)} for row in zip(*(columns[c] for c in names))]
    f.write(json.dumps(records, allow_nan=False).encode("utf-8"))
