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
