"""`ChunkedArraySpool`: a typed, append-only numeric array kept on disk, for scans too big for memory.

Values collect in a fixed in-memory chunk; a full chunk is written to a temporary file. Reading
back is streaming (`iter_chunks`, `iter_values`) or memory-mapped (`to_numpy`), so a scan over
ten million samples holds one chunk in memory, not ten million values.
"""

from __future__ import annotations

import logging
import os
import tempfile
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

_DTYPES = {"float32": np.dtype(np.float32), "int64": np.dtype(np.int64)}


def _remove_file(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        log.debug("spool file %s was already removed", path)


class ChunkedArraySpool:
    """An append-only float32 or int64 array (1-D, or rows of `width` values) spooled to disk.

    Use as a context manager, or call `close()`/`finish()`: the temporary file is removed then,
    on error inside the `with` block, and at garbage collection at the latest.
    """

    def __init__(
        self,
        dtype: str | np.dtype | type = "float32",
        *,
        width: int | None = None,
        chunk_size: int = 65536,
        dir: str | os.PathLike[str] | None = None,
    ) -> None:
        name = np.dtype(dtype).name
        if name not in _DTYPES:
            raise ValueError(f"ChunkedArraySpool dtype must be float32 or int64, got {name!r}")
        if width is not None and width < 1:
            raise ValueError(f"width must be a positive number of values per row, got {width}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.dtype = _DTYPES[name]
        self.width = width
        self._row_shape: tuple[int, ...] = () if width is None else (width,)
        self._buf = np.empty((chunk_size, *self._row_shape), dtype=self.dtype)
        self._fill = 0
        self._flushed = 0
        fd, self.path = tempfile.mkstemp(prefix="otf-spool-", suffix=".bin", dir=dir)
        self._file: Any = os.fdopen(fd, "wb")
        self._finalizer = weakref.finalize(self, _close_and_remove, self._file, self.path)
        self._closed = False

    # -- writing -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._flushed + self._fill

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this ChunkedArraySpool is closed (finish() or close() was called)")

    def append(self, value: Any) -> None:
        """Add one value (a row of `width` values when the spool has a width)."""
        self._check_open()
        row = np.asarray(value, dtype=self.dtype)
        if row.shape != self._row_shape:
            raise ValueError(f"append expects a value of shape {self._row_shape}, got {row.shape}")
        self._buf[self._fill] = row
        self._fill += 1
        if self._fill == len(self._buf):
            self._flush()

    def extend(self, values: Any) -> None:
        """Add many values: a sequence, NumPy array or tensor (shape (n,) or (n, width))."""
        self._check_open()
        if isinstance(values, torch.Tensor):
            values = values.detach().to("cpu").numpy()
        arr = np.asarray(values, dtype=self.dtype)
        if arr.ndim != 1 + len(self._row_shape) or arr.shape[1:] != self._row_shape:
            raise ValueError(f"extend expects an array of shape (n, *{self._row_shape}), got {arr.shape}")
        pos = 0
        while pos < len(arr):
            if self._fill == 0 and len(arr) - pos >= len(self._buf):
                # Whole chunks skip the buffer.
                n = (len(arr) - pos) // len(self._buf) * len(self._buf)
                self._write(arr[pos : pos + n])
                pos += n
                continue
            n = min(len(self._buf) - self._fill, len(arr) - pos)
            self._buf[self._fill : self._fill + n] = arr[pos : pos + n]
            self._fill += n
            pos += n
            if self._fill == len(self._buf):
                self._flush()

    def _write(self, arr: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(arr).tobytes())
        self._flushed += len(arr)

    def _flush(self) -> None:
        if self._fill:
            self._write(self._buf[: self._fill])
            self._fill = 0
        self._file.flush()

    # -- reading -----------------------------------------------------------------------------

    def iter_chunks(self, rows: int | None = None) -> Iterator[np.ndarray]:
        """Stream the values back in arrays of up to `rows` rows (default: the chunk size)."""
        self._check_open()
        self._flush()
        rows = rows or len(self._buf)
        row_bytes = self.dtype.itemsize * (self.width or 1)
        with open(self.path, "rb") as f:
            remaining = len(self)
            while remaining:
                n = min(rows, remaining)
                data = f.read(n * row_bytes)
                if len(data) != n * row_bytes:
                    raise OSError(f"spool file {self.path} is shorter than the {len(self)} rows written")
                yield np.frombuffer(data, dtype=self.dtype).reshape((n, *self._row_shape))
                remaining -= n

    def iter_values(self) -> Iterator[Any]:
        """Stream the values back one by one (Python numbers, or NumPy rows when `width` is set)."""
        for chunk in self.iter_chunks():
            if self.width is None:
                yield from chunk.tolist()
            else:
                yield from chunk

    def to_numpy(self) -> np.ndarray:
        """A read-only memory-mapped view of everything written so far (valid until `close`)."""
        self._check_open()
        self._flush()
        if len(self) == 0:
            return np.empty((0, *self._row_shape), dtype=self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(len(self), *self._row_shape))

    def finish(self) -> np.ndarray:
        """Everything written, as an in-memory array; then the spool is closed and its file removed."""
        try:
            out = np.array(self.to_numpy())
        finally:
            self.close()
        return out

    def close(self) -> None:
        """Remove the file. Safe to call twice; memory maps from `to_numpy` must not be used after."""
        if not self._closed:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> ChunkedArraySpool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.path
        return f"ChunkedArraySpool(dtype={self.dtype.name}, width={self.width}, rows={len(self)}, {state})"


def _close_and_remove(file: Any, path: str) -> None:
    file.close()
    _remove_file(path)


def spooled_as_arrays(*parts: "np.ndarray | ChunkedArraySpool") -> tuple[np.ndarray, ...]:
    """Each part as an array: spools as their memory-mapped view (valid until closed)."""
    return tuple(p.to_numpy() if isinstance(p, ChunkedArraySpool) else p for p in parts)


def close_spools(*parts: "np.ndarray | ChunkedArraySpool") -> None:
    """Remove the files of the parts that are spools (arrays need nothing)."""
    for part in parts:
        if isinstance(part, ChunkedArraySpool):
            part.close()
