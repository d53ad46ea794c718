"""ChunkedArraySpool: typed, chunked, disk-backed, and always cleaned up."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from onthefly.data_explorer import ChunkedArraySpool


def test_append_extend_and_read_back(tmp_path: Path) -> None:
    spool = ChunkedArraySpool("float32", chunk_size=4, dir=tmp_path)
    spool.append(1.5)
    spool.extend([2.0, 3.0])
    spool.extend(np.arange(10, dtype=np.float64))  # crosses chunks, written partly unbuffered
    spool.extend(torch.tensor([7.0]))
    assert len(spool) == 14
    expected = np.array([1.5, 2.0, 3.0, *range(10), 7.0], dtype=np.float32)
    assert list(spool.iter_values()) == expected.tolist()
    assert [len(c) for c in spool.iter_chunks(rows=5)] == [5, 5, 4]
    mapped = spool.to_numpy()
    assert isinstance(mapped, np.memmap) and mapped.dtype == np.float32
    np.testing.assert_array_equal(mapped, expected)
    assert os.path.getsize(spool.path) == 14 * 4
    del mapped
    out = spool.finish()
    np.testing.assert_array_equal(out, expected)
    assert not isinstance(out, np.memmap)
    assert spool.closed and list(tmp_path.iterdir()) == []


def test_int64_rows_with_width(tmp_path: Path) -> None:
    with ChunkedArraySpool(np.int64, width=3, chunk_size=2, dir=tmp_path) as spool:
        spool.append([1, 2, 3])
        spool.extend(np.arange(12).reshape(4, 3))
        assert len(spool) == 5
        arr = spool.to_numpy()
        assert arr.shape == (5, 3) and arr.dtype == np.int64
        np.testing.assert_array_equal(arr[0], [1, 2, 3])
        np.testing.assert_array_equal(arr[1:], np.arange(12).reshape(4, 3))
        rows = list(spool.iter_values())
        np.testing.assert_array_equal(rows[4], [9, 10, 11])
        del arr
    assert list(tmp_path.iterdir()) == []


def test_empty_spool(tmp_path: Path) -> None:
    with ChunkedArraySpool("int64", dir=tmp_path) as spool:
        assert spool.to_numpy().shape == (0,)
        assert list(spool.iter_values()) == []
        assert spool.finish().shape == (0,)


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="float32 or int64"):
        ChunkedArraySpool("float16", dir=tmp_path)
    with pytest.raises(ValueError, match="width"):
        ChunkedArraySpool("float32", width=0, dir=tmp_path)
    with ChunkedArraySpool("float32", width=2, dir=tmp_path) as spool:
        with pytest.raises(ValueError, match="shape"):
            spool.append(1.0)
        with pytest.raises(ValueError, match="shape"):
            spool.extend(np.ones((3, 4)))
    with pytest.raises(ValueError, match="closed"):
        spool.append([1.0, 2.0])
    assert list(tmp_path.iterdir()) == []


def test_file_removed_on_error_and_on_garbage_collection(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with ChunkedArraySpool("float32", chunk_size=2, dir=tmp_path) as spool:
            spool.extend([1.0, 2.0, 3.0])
            assert len(list(tmp_path.iterdir())) == 1
            raise RuntimeError("scan failed")
    assert list(tmp_path.iterdir()) == []
    abandoned = ChunkedArraySpool("float32", dir=tmp_path)
    abandoned.append(1.0)
    del abandoned
    gc.collect()
    assert list(tmp_path.iterdir()) == []
