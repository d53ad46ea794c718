"""Merge: a new run whose weights combine several runs' checkpoints (strategies in `onthefly.merging`).

The merged run has every parent as a parent, trains on the whole training set, and gets a
checkpoint at its first step. Data-driven strategies (fisher, distill) read each parent's own
training samples. See docs/merging.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import torch

from ..checkpoints import load_checkpoint
from ..control.constraints import Length, Range, SafeName
from ..control.errors import CommandError, ErrorCode
from .command import command

MergeStrategy = Literal["swa", "fisher", "adapter", "task_arithmetic", "ties", "distill",
                        "fisher_soup", "adapter_fuse", "distillation"]


@dataclass
class Merge:
    parents: Optional[Annotated[list[Annotated[str, SafeName]], Length(max=64)]] = None
    strategy: MergeStrategy = "swa"
    paths: Optional[Annotated[list[str], Length(max=64)]] = None
    new_name: Optional[Annotated[str, SafeName]] = None
    weights: Optional[list[Annotated[float, Range(ge=0, le=1e6)]]] = None
    fisher_batches: Annotated[int, Range(ge=1, le=100_000)] = 16
    density: Annotated[float, Range(gt=0, le=1)] = 0.2
    scale: Annotated[float, Range(ge=-1e3, le=1e3)] = 1.0
    distill_steps: Annotated[int, Range(ge=1, le=1_000_000)] = 100


class MergeMixin:
    """The `merge` command (no state of its own)."""

    @command("merge", Merge, mutating=True, description="merge runs' checkpoints into a new run")
    def cmd_merge(self, p: Merge) -> dict[str, Any]:
        from ..merging import resolve_strategy

        strategy = resolve_strategy(p.strategy)
        if not p.parents and not p.paths:
            raise CommandError("merge requires either 'parents' or explicit 'paths'", ErrorCode.BAD_PAYLOAD)
        if p.new_name is not None:
            self.child_name(p.new_name, "merge")  # an existing name is refused before any work
        request = {"action": "merge", "parents": p.parents, "strategy": strategy, "paths": p.paths,
                   "new_name": p.new_name}
        return self.console.pause_window(request, lambda: self.do_merge(p, strategy))

    def do_merge(self, p: Merge, strategy: str) -> dict[str, Any]:
        self.save_checkpoint_now()
        parents, paths = self.merge_inputs(p)
        state_dicts = [load_checkpoint(path)["model"] for path in paths]
        if p.weights is not None and len(p.weights) != len(state_dicts):
            raise CommandError(f"payload.weights: {len(p.weights)} weights for {len(state_dicts)} parents",
                               ErrorCode.BAD_PAYLOAD)
        ranks = self.ranks
        if ranks is None:
            self.load_merged(self.merge_weights(p, strategy, parents, state_dicts))
            return self.start_merged_run(p, strategy, parents, paths)
        # A distributed run merges once, on rank 0, and sends the result to the other ranks.
        error: Exception | None = None
        if ranks.leader:
            try:
                self.load_merged(self.merge_weights(p, strategy, parents, state_dicts))
            except Exception as exc:
                error = exc
        failure = ranks.broadcast(None if error is None else f"{type(error).__name__}: {error}",
                                  what="sharing the merge's outcome")
        if error is not None:
            raise error
        if failure is not None:
            raise CommandError(f"merge failed on rank 0: {failure}", ErrorCode.FAILED)
        ranks.broadcast_module(self.model)
        return self.start_merged_run(p, strategy, parents, paths)

    def load_merged(self, merged: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.model.load_state_dict(merged, strict=True)

    def merge_weights(self, p: Merge, strategy: str, parents: list[str],
                      state_dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The merged state dict of `parents` (their `state_dicts`) by `strategy`."""
        from ..merging import merge_state_dicts

        kwargs: dict[str, Any] = {}
        if strategy in ("swa", "adapter") and p.weights is not None:
            kwargs["weights"] = p.weights
        elif strategy == "fisher":
            from ..merging import estimate_fisher

            kwargs["fishers"] = [
                estimate_fisher(self.model_with_weights(sd), self.loader_over(self.run_training_indices(r)),
                                self.loss_fn, max_batches=p.fisher_batches, forward=self.fisher_forward)
                for r, sd in zip(parents, state_dicts)
            ]
        elif strategy in ("task_arithmetic", "ties"):
            kwargs["base"] = self.common_ancestor_state(parents)
            kwargs["scale"] = p.scale
            if strategy == "ties":
                kwargs["density"] = p.density
        elif strategy == "distill":
            union = sorted({int(i) for r in parents for i in self.run_training_indices(r)})
            kwargs.update(model_factory=lambda: self.model_with_weights(state_dicts[0]),
                          loader=self.loader_over(union, shuffle=True), steps=p.distill_steps)
        return merge_state_dicts(strategy, state_dicts, **kwargs)

    def start_merged_run(self, p: Merge, strategy: str, parents: list[str], paths: list[Any]) -> dict[str, Any]:
        """The live model holds the merge: record it as a new run on the whole training set."""
        child = self.child_name(p.new_name, "merge")
        self.mark_state_changed()
        meta = {"kind": "merge", "strategy": strategy, "parents": parents, "paths": [str(x) for x in paths],
                "at_step": self.state.step}
        self.start_new_run(child, parents=parents, meta=meta,
                           hparams={"merge": {"strategy": strategy, "parents": parents, "paths": meta["paths"]}})
        self.state.epoch = 0
        self.state.batch_in_epoch = 0
        self.state.run_start_step = self.state.step
        self.forks.budget = None
        self.rebind_train_loader(None)
        self.request_reposition()
        ckpt_path = self.save_checkpoint_now()
        self.log(f"[merge] {child} = {strategy}({', '.join(parents)})")
        return {"new_run": child, "parents": parents, "strategy": strategy, "paths": meta["paths"], "ckpt": ckpt_path}

    def fisher_forward(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        from ..data_explorer import compute_batch_loss, move_to_device

        return compute_batch_loss(model, move_to_device(batch, self.resolve_device()), self.loss_fn, per_sample=False)

    def merge_inputs(self, p: Merge) -> tuple[list[str], list[Path]]:
        """(parent run names, their checkpoint paths)."""
        if p.paths:
            paths = [self.wire_checkpoint(x, f"payload.paths[{i}]") for i, x in enumerate(p.paths)]
            parents = list(p.parents) if p.parents and len(p.parents) == len(paths) else [x.stem for x in paths]
            return parents, paths
        parents = list(dict.fromkeys(p.parents or []))
        if len(parents) < 2:
            raise CommandError("merge needs at least two distinct parents", ErrorCode.BAD_PAYLOAD)
        paths = []
        for run in parents:
            if run == self.cfg.run_name:
                paths.append(Path(self.save_checkpoint_now()))
                continue
            latest = self.ring(run).latest() if run in self.known_runs() else None
            if latest is None:
                raise CommandError(f"no checkpoint found for parent run: {run}", ErrorCode.NOT_FOUND)
            paths.append(latest.path)
        return parents, paths

    def lineage(self, run_id: str) -> list[str]:
        """The run and its first-parent ancestors, nearest first."""
        chain, seen = [], set()
        while run_id and run_id not in seen:
            chain.append(run_id)
            seen.add(run_id)
            parents = (self.read_manifest(run_id) or {}).get("parents") or []
            run_id = parents[0] if parents else None
        return chain

    def common_ancestor_state(self, parents: list[str]) -> dict[str, torch.Tensor]:
        """Weights of the point the parents diverged from (their fork's starting checkpoint)."""
        chains = [self.lineage(r) for r in parents]
        common = [r for r in chains[0] if all(r in c for c in chains[1:])]
        if not common:
            raise CommandError(f"runs {parents} share no ancestor; task_arithmetic/ties need one", ErrorCode.BAD_PAYLOAD)
        ancestor = common[0]
        for chain in chains:  # the checkpoint the first child of the ancestor was forked from
            position = chain.index(ancestor)
            if position > 0:
                init_from = (self.read_manifest(chain[position - 1]) or {}).get("init_from")
                if init_from and Path(init_from).is_file():
                    return load_checkpoint(init_from)["model"]
        latest = self.ring(ancestor).latest()
        if latest is None:
            raise CommandError(f"no checkpoint of the common ancestor {ancestor!r}", ErrorCode.NOT_FOUND)
        return load_checkpoint(latest.path)["model"]
