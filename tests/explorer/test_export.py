"""export_subset_table: four formats, the right rows and columns, written atomically."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import Dataset, Subset

from onthefly.data_explorer import atomic_write, export_subset_table

from .conftest import PairDataset


def _read(path: str, fmt: str) -> pd.DataFrame:
    if fmt == "parquet":
        return pd.read_parquet(path)
    if fmt == "feather":
        return pd.read_feather(path)
    if fmt == "csv":
        return pd.read_csv(path)
    return pd.DataFrame(json.loads(Path(path).read_text()))


@pytest.mark.parametrize("fmt", ["parquet", "feather", "csv", "json"])
def test_every_format_reads_back(fmt: str, data: PairDataset, tmp_path: Path) -> None:
    idx = np.array([7, 2, 50])
    out = tmp_path / "sub" / f"hard.{fmt}"
    result = export_subset_table(
        Subset(data, [1, 2]),  # rows come from the root dataset
        idx,
        out,
        losses=np.array([0.25, float("nan"), 1.5]),
        clusters={7: 1, 2: 0},
        adapter=lambda i, item: {"x0": float(item[0][0]), "tag": f"s{i}"},
    )
    assert result.rows == 3 and result.format == fmt and Path(result.path) == out.resolve()
    assert result.columns == ["sample_id", "label", "loss", "cluster", "x0", "tag"]
    df = _read(str(out), fmt)
    assert list(df.columns) == result.columns
    assert df["sample_id"].tolist() == [7, 2, 50]
    assert df["label"].tolist() == data.y[idx].tolist()
    assert df["loss"].iloc[0] == 0.25 and pd.isna(df["loss"].iloc[1]) and df["loss"].iloc[2] == 1.5
    assert df["cluster"].iloc[0] == 1 and df["cluster"].iloc[1] == 0 and pd.isna(df["cluster"].iloc[2])
    np.testing.assert_allclose(df["x0"].to_numpy(), data.x[idx, 0].numpy(), rtol=1e-6)
    assert df["tag"].tolist() == ["s7", "s2", "s50"]
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temp file left


def test_format_from_suffix_and_unknown_format(data: PairDataset, tmp_path: Path) -> None:
    assert export_subset_table(data, [1], tmp_path / "a.pq").format == "parquet"
    assert export_subset_table(data, [1], tmp_path / "a.arrow").format == "feather"
    with pytest.raises(ValueError, match="cannot tell the export format"):
        export_subset_table(data, [1], tmp_path / "a.xlsx")
    with pytest.raises(ValueError, match="unknown export format 'xml'"):
        export_subset_table(data, [1], tmp_path / "a.csv", format="xml")


class LabelledImages(Dataset):
    """torchvision-style: a `targets` list, and items that are expensive to load."""

    targets = [3, 1, 4, 1, 5]

    def __len__(self) -> int:
        return 5

    def __getitem__(self, i: int):
        raise AssertionError("labels should come from .targets without loading items")


class DictItems(Dataset):
    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int):
        return {"input_ids": torch.arange(i + 1), "labels": torch.tensor([i, i + 1])}


class Unlabelled(Dataset):
    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int):
        return torch.ones(2) * i


def test_label_sources(tmp_path: Path) -> None:
    df = pd.read_parquet(export_subset_table(LabelledImages(), [4, 0], tmp_path / "a.parquet").path)
    assert df["label"].tolist() == [5, 3]
    df = pd.read_parquet(export_subset_table(DictItems(), [2], tmp_path / "b.parquet").path)
    assert df["label"].iloc[0].tolist() == [2, 3]  # list labels survive Parquet
    rows = json.loads(Path(export_subset_table(DictItems(), [1], tmp_path / "c.json").path).read_text())
    assert rows == [{"sample_id": 1, "label": [1, 2]}]
    result = export_subset_table(Unlabelled(), [0, 2], tmp_path / "d.csv")
    assert result.columns == ["sample_id"]
    assert pd.read_csv(result.path)["sample_id"].tolist() == [0, 2]


def test_bad_indices_and_columns(data: PairDataset, tmp_path: Path) -> None:
    with pytest.raises(IndexError, match="103"):
        export_subset_table(data, [103], tmp_path / "a.csv")
    with pytest.raises(ValueError, match="2 values for 1 indices"):
        export_subset_table(data, [1], tmp_path / "a.csv", losses=[0.1, 0.2])
    with pytest.raises(ValueError, match="clash"):
        export_subset_table(data, [1], tmp_path / "a.csv", adapter=lambda i, item: {"loss": 1})
    with pytest.raises(TypeError, match="mapping"):
        export_subset_table(data, [1], tmp_path / "a.csv", adapter=lambda i, item: 5)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path: Path) -> None:
    target = tmp_path / "t.bin"
    atomic_write(target, lambda f: f.write(b"old"))

    def failing(f) -> None:
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, failing)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["t.bin"]


def test_parquet_without_pyarrow_names_the_extra(data: PairDataset, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ImportError, match=r"pip install 'onthefly\[explorer\]'"):
        export_subset_table(data, [1], tmp_path / "a.parquet")
    assert list(tmp_path.iterdir()) == []
    # CSV and JSON need no extra
    assert export_subset_table(data, [1], tmp_path / "a.csv").rows == 1
