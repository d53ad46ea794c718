"""Typed payloads of the session's commands (validated by the CommandRouter in one place).

Field names follow the wire protocol; aliases cover the camelCase spellings the extension uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


def alias(*names: str, default: Any = None) -> Any:
    return field(default=default, metadata={"aliases": names})


@dataclass
class Empty:
    """No payload fields (extra keys are ignored)."""


@dataclass
class Pause:
    reason: str = "manual"


@dataclass
class EnforceVersion:
    message: str = "Current onthefly version is outdated."
    required: Optional[str] = None
    reported: Optional[str] = None


@dataclass
class SetHparams:
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    momentum: Optional[float] = None
    betas: Optional[list[float]] = None
    eps: Optional[float] = None
    dampening: Optional[float] = None
    grad_clip_norm: Optional[float] = None
    param_group: Optional[int] = None


@dataclass
class ResetSession:
    reason: str = "manual"
    run_name: Optional[str] = None
    dedupe: bool = True


@dataclass
class EventsSince:
    event_seq: int = 0
    limit: int = 1000


@dataclass
class CleanDisk:
    scope: str = "all"


@dataclass
class LoadCkpt:
    path: str = alias("ckpt", "ckpt_path", default="")


@dataclass
class ListCheckpoints:
    run_id: Optional[str] = alias("runId")


@dataclass
class TestNow:
    label: str = "final"


@dataclass
class TestRequest:
    label: str = "manual"
    source: str = "manual"


# ---- reports and subsets (mixins/features.py) -------------------------------------------------
@dataclass
class GenerateReport:
    owner_run_id: Optional[str] = alias("runId", "run_id")
    subset_indices: Optional[list[int]] = None
    subset_on: str = "val"
    reqId: Any = None
    batch_size: Optional[int] = None


@dataclass
class Region:
    minLoss: Optional[float] = alias("min_loss")
    maxLoss: Optional[float] = alias("max_loss")


@dataclass
class ExportSubset:
    run_id: Optional[str] = alias("runId")
    format: str = "parquet"
    subset_indices: Optional[list[int]] = None
    out_path: Optional[str] = None
    region: Optional[Region] = None
    subset_on: Optional[str] = None


@dataclass
class SelectedRegion:
    run_id: Optional[str] = alias("runId")
    min_loss: Optional[float] = alias("minLoss")
    max_loss: Optional[float] = alias("maxLoss")
    subset_on: Optional[str] = None


@dataclass
class ProposeSubsets:
    run_id: Optional[str] = alias("runId")
    k: int = 5
    top_k: Optional[int] = None
    subset_on: str = "train"
    with_indices: bool = True


# ---- runs: fork, merge, switch (mixins/fork_merge.py, mixins/run_management.py) ---------------
@dataclass
class Selection:
    kind: str = "indices"
    ids: Optional[list[int]] = None
    metric: str = "per_sample_loss"
    from_: Optional[float] = alias("from", default=None)
    to: Optional[float] = None
    k: int = 5
    target_clusters: Optional[list[int]] = None
    feature: str = "loss"
    minLoss: Optional[float] = alias("min_loss")
    maxLoss: Optional[float] = alias("max_loss")


@dataclass
class ForkHparams:
    lr: Optional[float] = None
    lr_mul: Optional[float] = None
    wd_mul: Optional[float] = None
    batch_size: Optional[int] = None
    patience: Optional[int] = None
    max_steps: Optional[int] = None
    epochs: Optional[int] = None


@dataclass
class Fork:
    mode: str = "manual"
    allow_when_paused: Optional[bool] = None
    parent_run_id: Optional[str] = alias("owner_run_id", "runId")
    parent_ckpt_path: Optional[str] = None
    run_name: Optional[str] = None
    hparams: Optional[ForkHparams] = None
    selection: Optional[Selection] = None
    region: Optional[Region] = None


@dataclass
class Merge:
    parents: Optional[list[str]] = None
    strategy: str = "swa"
    paths: Optional[list[str]] = None
    new_name: Optional[str] = None
    weights: Optional[list[float]] = None
    fisher_batches: int = 16
    density: float = 0.2
    scale: float = 1.0
    distill_steps: int = 100


@dataclass
class SwitchRun:
    run_id: Optional[str] = alias("runId")
    fork_counter_init: Optional[int] = None
    merge_counter_init: Optional[int] = None
    init_ckpt: Optional[str] = alias("ckpt")
    init_step: Optional[int] = None


@dataclass
class CounterSeeds:
    fork_counter_init: int = 0
    merge_counter_init: int = 0


@dataclass
class PrepareExport:
    dir: Optional[str] = None
    owners: Optional[list[str]] = None
    latest_only: bool = False
    archive: bool = False
