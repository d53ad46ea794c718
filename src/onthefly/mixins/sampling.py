"""Changing what a run trains on: sampling weights and dropped samples.

Commands: `set_data_weights` (per sample, per index list or per named source), `drop_samples`
and `restore_samples` (by root-dataset index, as reports name samples), `data_sampling`
(read-only: the plan in force).

The edits build a `SamplingPlan` over the run's samples and hand it to the one train-data path
(`DataMixin.install_sampling_plan`): the loader then draws `Subset(root dataset, kept)`, weighted
by a `WeightedEpochSampler` whose order depends only on (seed, epoch, weights), so a paused,
checkpointed or replayed run draws exactly the same batches. Where the runtime re-opens its epoch
iterator at a boundary (the native loop, an own loop iterating `session.batches()`) the edit
takes effect at once, for the rest of the epoch; otherwise (Lightning) from the next epoch.
Everything is checked before the plan changes, so a refused edit leaves the run as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Optional

import numpy as np
import torch
from torch.utils.data import ConcatDataset

from ..control.constraints import Length, Range
from ..control.errors import CommandError, ErrorCode
from ..sampler_utils import SkippableEpochSampler
from .command import command

#: torch.multinomial draws among at most 2**24 categories.
MAX_WEIGHTED_SAMPLES = 2**24
Indices = Annotated[list[Annotated[int, Range(ge=0)]], Length(max=50_000_000)]
Weight = Annotated[float, Range(ge=0, le=1e12)]


class WeightedEpochSampler(SkippableEpochSampler):
    """Draws `num_samples` positions by weight; the draw depends only on (seed, epoch, weights).

    `set_epoch` selects the epoch's draw and `skip(n)` makes the next iterator start after the
    first `n` positions of it (resume mid-epoch), as `EpochSeededRandomSampler` does.
    """

    def __init__(self, weights: torch.Tensor, *, num_samples: int, replacement: bool = True, seed: int = 0) -> None:
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.dim() != 1 or weights.numel() == 0:
            raise ValueError(f"weights must be a non-empty 1-D tensor, got shape {tuple(weights.shape)}")
        if not torch.isfinite(weights).all() or (weights < 0).any() or float(weights.sum()) <= 0:
            raise ValueError("weights must be finite, >= 0, and not all zero")
        nonzero = int((weights > 0).sum())
        if not replacement and num_samples > nonzero:
            raise ValueError(f"without replacement at most {nonzero} samples can be drawn, not {num_samples}")
        self.weights = weights
        self.num_samples = int(num_samples)
        self.replacement = bool(replacement)
        self.seed = int(seed)
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip(self, n_samples: int) -> None:
        """Make the next iterator start after the first `n_samples` positions of this epoch's draw."""
        self._skip = min(int(n_samples), self.num_samples)

    def order(self, epoch: int | None = None) -> torch.Tensor:
        generator = torch.Generator()
        generator.manual_seed((self.seed * 1_000_003 + 7919 + (self.epoch if epoch is None else int(epoch))) % 2**63)
        return torch.multinomial(self.weights, self.num_samples, self.replacement, generator=generator)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "num_samples": self.num_samples,
                "replacement": self.replacement, "skip": self._skip}


@dataclass
class SamplingPlan:
    """Weights and dropped samples over a run's samples (ascending root-dataset indices)."""

    indices: np.ndarray
    weights: np.ndarray | None = None  # one per index; None: the loader's own (unweighted) order
    dropped: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    replacement: bool = True
    num_samples: int | None = None  # draws per epoch with weights (None: as many as samples are kept)

    def __post_init__(self) -> None:
        self.indices = np.asarray(self.indices, dtype=np.int64)
        if self.dropped.size != self.indices.size:
            self.dropped = np.zeros(self.indices.size, dtype=bool)

    def kept(self) -> np.ndarray:
        return self.indices[~self.dropped]

    def kept_weights(self) -> torch.Tensor:
        assert self.weights is not None
        return torch.from_numpy(np.ascontiguousarray(self.weights[~self.dropped], dtype=np.float64))

    def draws(self) -> int:
        return int(self.num_samples) if self.num_samples is not None else int((~self.dropped).sum())

    @property
    def is_identity(self) -> bool:
        """True when the plan changes nothing (no weights, nothing dropped)."""
        return self.weights is None and not self.dropped.any()

    def copy(self) -> SamplingPlan:
        return SamplingPlan(self.indices.copy(), None if self.weights is None else self.weights.copy(),
                            self.dropped.copy(), self.replacement, self.num_samples)

    def state(self) -> dict[str, Any]:
        """The plan as checkpoints hold it (tensors and plain values: weights-only loading reads it)."""
        return {"indices": torch.from_numpy(self.indices.copy()),
                "weights": None if self.weights is None else torch.from_numpy(self.weights.astype(np.float64)),
                "dropped": torch.from_numpy(self.dropped.copy()),
                "replacement": bool(self.replacement), "num_samples": self.num_samples}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SamplingPlan:
        weights = state.get("weights")
        return cls(np.asarray(state["indices"], dtype=np.int64),
                   None if weights is None else np.asarray(weights, dtype=np.float64),
                   np.asarray(state["dropped"], dtype=bool), bool(state.get("replacement", True)),
                   state.get("num_samples"))

    def describe(self, *, with_lists: bool = True) -> dict[str, Any]:
        kept = int((~self.dropped).sum())
        out: dict[str, Any] = {"samples": int(self.indices.size), "kept": kept,
                               "dropped_count": int(self.dropped.sum()), "weighted": self.weights is not None,
                               "replacement": self.replacement, "draws_per_epoch": self.draws()}
        if with_lists:
            out["dropped"] = self.indices[self.dropped].tolist()
            if self.weights is not None:
                changed = self.weights != 1.0
                out["weights"] = {"indices": self.indices[changed].tolist(),
                                  "values": self.weights[changed].tolist(), "others": 1.0}
        return out


@dataclass
class SetDataWeights:
    """Sampling weights (>= 0) of the run's samples; unnamed samples keep theirs (1 at first)."""

    #: One weight per sample of the run, in ascending root-dataset index order (without `indices`).
    weights: Optional[Annotated[list[Weight], Length(max=50_000_000)]] = None
    #: Root-dataset indices: with `weights` one weight each, or all get `weight`.
    indices: Optional[Indices] = None
    weight: Optional[Weight] = None
    #: Weights of named sources (see `data_sampling` for the names).
    sources: Optional[dict[str, Weight]] = None
    #: Start from uniform weights (1 each) before applying the rest; alone: back to the loader's own order.
    reset: bool = False
    replacement: bool = True
    #: Draws per epoch (default: as many as samples are kept).
    num_samples: Optional[Annotated[int, Range(ge=1, le=10**9)]] = None


@dataclass
class DropSamples:
    indices: Indices
    reason: Annotated[str, Length(max=500)] = ""


@dataclass
class RestoreSamples:
    indices: Optional[Indices] = None
    all: bool = False


@dataclass
class NoPayload:
    """No payload fields (extra keys are ignored)."""


class SamplingMixin:
    """Owns `self.data_sources`: named groups of root-dataset indices for `set_data_weights`."""

    def _init_sampling(self) -> None:
        self.data_sources: dict[str, np.ndarray] = {}

    def define_data_sources(self, sources: dict[str, Any]) -> None:
        """Name groups of root-dataset indices (e.g. {"web": [...], "books": [...]}) for `set_data_weights`."""
        named: dict[str, np.ndarray] = {}
        for name, indices in sources.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"a data source name must be a non-empty string, got {name!r}")
            named[name] = np.unique(np.asarray(list(indices), dtype=np.int64))
        self.data_sources = named

    def known_sources(self) -> dict[str, np.ndarray]:
        """The named sources: those defined, else the parts of a `ConcatDataset` root (`source0`, ...)."""
        if self.data_sources:
            return self.data_sources
        root = self.train_root_dataset() if self.train_root_loader is not None else None
        if not isinstance(root, ConcatDataset):
            return {}
        bounds = [0, *root.cumulative_sizes]
        return {getattr(part, "name", None) or f"source{i}": np.arange(bounds[i], bounds[i + 1], dtype=np.int64)
                for i, part in enumerate(root.datasets)}

    # ---- the plan ----------------------------------------------------------------------------
    def current_plan(self) -> SamplingPlan:
        """A copy of the run's plan to edit (a fresh one over the run's samples if there is none)."""
        plan = self.sampling_plan
        return plan.copy() if plan is not None else SamplingPlan(self.run_sample_indices())

    def positions_of(self, plan: SamplingPlan, indices: Any, field_name: str) -> np.ndarray:
        """Positions of `indices` in the plan's samples; `bad_payload` naming those the run does not train on."""
        ids = np.asarray(list(indices), dtype=np.int64)
        if plan.indices.size == 0:
            positions, outside = np.zeros(0, dtype=np.int64), ids
        else:
            positions = np.clip(np.searchsorted(plan.indices, ids), 0, plan.indices.size - 1)
            outside = ids[plan.indices[positions] != ids]
        if outside.size:
            raise CommandError(f"{field_name}: {np.unique(outside)[:5].tolist()} are not samples of run "
                               f"{self.cfg.run_name!r} ({plan.indices.size} samples)", ErrorCode.BAD_PAYLOAD)
        return positions

    def edit_plan(self, plan: SamplingPlan, what: str) -> dict[str, Any]:
        """Check that the runtime can take a new plan, then install it (at once where it can)."""
        timing = self.framework.data_edit_timing()
        if timing is None:
            raise CommandError(f"{what}: this loop iterates a train loader of its own, which onthefly cannot "
                               "change; iterate session.batches() (see docs/integrations.md)", ErrorCode.FAILED)
        kept = int((~plan.dropped).sum())
        if kept == 0:
            raise CommandError(f"{what}: this would leave run {self.cfg.run_name!r} no samples to train on",
                               ErrorCode.BAD_PAYLOAD)
        if plan.weights is not None:
            kept_weights = plan.weights[~plan.dropped]
            if float(kept_weights.sum()) <= 0:
                raise CommandError(f"{what}: every sample the run keeps has weight 0; nothing could be drawn",
                                   ErrorCode.BAD_PAYLOAD)
            if kept > MAX_WEIGHTED_SAMPLES:
                raise CommandError(f"{what}: weighted sampling supports at most {MAX_WEIGHTED_SAMPLES} samples, "
                                   f"the run keeps {kept}", ErrorCode.BAD_PAYLOAD)
            if not plan.replacement and plan.draws() > int((kept_weights > 0).sum()):
                raise CommandError(f"{what}: without replacement at most {int((kept_weights > 0).sum())} samples "
                                   f"with weight > 0 can be drawn per epoch, not {plan.draws()}", ErrorCode.BAD_PAYLOAD)
        if timing == "now":
            self.install_sampling_plan(None if plan.is_identity else plan)
            self.request_reposition()  # the loop re-opens this epoch's iterator on the new plan
        else:
            self.defer_sampling_plan(None if plan.is_identity else plan)
        self.mark_state_changed()
        return {"run_id": self.cfg.run_name, "takes_effect": timing, **plan.describe(with_lists=False)}

    # ---- commands ----------------------------------------------------------------------------
    @command("set_data_weights", SetDataWeights, mutating=True,
             description="sampling weights of samples, index lists or named sources (weighted draw, reproducible)")
    def cmd_set_data_weights(self, p: SetDataWeights) -> dict[str, Any]:
        if p.weights is None and p.indices is None and p.sources is None and not p.reset \
                and p.num_samples is None:
            raise CommandError("payload: give weights, indices with weight(s), sources or reset", ErrorCode.BAD_PAYLOAD)
        plan = self.current_plan()
        n = plan.indices.size
        weights = np.ones(n, dtype=np.float64) if p.reset or plan.weights is None else plan.weights.copy()
        if p.indices is not None:
            positions = self.positions_of(plan, p.indices, "payload.indices")
            if p.weights is not None:
                if len(p.weights) != len(p.indices):
                    raise CommandError(f"payload.weights: expected one weight per index ({len(p.indices)}), "
                                       f"got {len(p.weights)}", ErrorCode.BAD_PAYLOAD)
                weights[positions] = np.asarray(p.weights, dtype=np.float64)
            elif p.weight is not None:
                weights[positions] = float(p.weight)
            else:
                raise CommandError("payload.indices: give `weight` (one for all) or `weights` (one each)",
                                   ErrorCode.BAD_PAYLOAD)
        elif p.weights is not None:
            if len(p.weights) != n:
                raise CommandError(f"payload.weights: expected one weight per sample of run {self.cfg.run_name!r} "
                                   f"({n}, in ascending index order), got {len(p.weights)}", ErrorCode.BAD_PAYLOAD)
            weights = np.asarray(p.weights, dtype=np.float64)
        elif p.weight is not None:
            raise CommandError("payload.weight: needs `indices` (the samples it is for)", ErrorCode.BAD_PAYLOAD)
        if p.sources:
            known = self.known_sources()
            for name, value in p.sources.items():
                if name not in known:
                    raise CommandError(f"payload.sources.{name}: unknown source; known: {sorted(known) or 'none'}",
                                       ErrorCode.BAD_PAYLOAD)
                members = np.isin(plan.indices, known[name])
                weights[members] = float(value)
        only_reset = p.reset and p.weights is None and p.indices is None and not p.sources and p.num_samples is None
        plan.weights = None if only_reset else weights
        plan.replacement = p.replacement
        plan.num_samples = p.num_samples
        reply = self.edit_plan(plan, "set_data_weights")
        self.emit("data_weights_changed", **reply)
        return reply

    @command("drop_samples", DropSamples, mutating=True,
             description="stop training on samples (root-dataset indices, e.g. from a report selection)")
    def cmd_drop_samples(self, p: DropSamples) -> dict[str, Any]:
        plan = self.current_plan()
        positions = self.positions_of(plan, p.indices, "payload.indices")
        newly = int((~plan.dropped[positions]).sum()) if positions.size else 0
        plan.dropped[positions] = True
        reply = {**self.edit_plan(plan, "drop_samples"), "newly_dropped": newly}
        self.emit("samples_dropped", reason=p.reason, indices=sorted(set(int(i) for i in p.indices)), **reply)
        return reply

    @command("restore_samples", RestoreSamples, mutating=True,
             description="train on dropped samples again (by index, or all)")
    def cmd_restore_samples(self, p: RestoreSamples) -> dict[str, Any]:
        if p.indices is None and not p.all:
            raise CommandError("payload: give indices, or all: true", ErrorCode.BAD_PAYLOAD)
        plan = self.current_plan()
        if p.all:
            restored = int(plan.dropped.sum())
            plan.dropped[:] = False
        else:
            positions = self.positions_of(plan, p.indices, "payload.indices")
            restored = int(plan.dropped[positions].sum()) if positions.size else 0
            plan.dropped[positions] = False
        reply = {**self.edit_plan(plan, "restore_samples"), "restored": restored}
        self.emit("samples_restored", **reply)
        return reply

    @command("data_sampling", NoPayload, mutating=False,
             description="the run's sampling plan: dropped samples, weights, named sources, when edits take effect")
    def cmd_data_sampling(self, p: NoPayload) -> dict[str, Any]:
        plan = self.sampling_plan
        described = plan.describe() if plan is not None else {"samples": int(self.run_sample_indices().size),
                                                                "dropped": [], "weighted": False}
        return {"run_id": self.cfg.run_name, **described, "sources": sorted(self.known_sources()),
                "takes_effect": self.framework.data_edit_timing()}
