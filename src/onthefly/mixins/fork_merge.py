"""Fork specialists on selected samples, merge runs back, switch between runs, export sessions.

A fork becomes a new run that trains on a `Subset` of the root training dataset, starting from its
parent's weights; the parent's own state (optimizer included) stays in the parent's checkpoint. A
merge combines runs' checkpoints with a strategy from `onthefly.merging` into a new run with
several parents. See docs/runs.md.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from ..checkpoints import CheckpointError, load_checkpoint
from ..control.errors import CommandError, ErrorCode
from ..control.router import CommandRouter
from ..session.schemas import CounterSeeds, Fork, ForkHparams, Merge, PrepareExport, Selection, SwitchRun

SELECTION_KINDS = ("indices", "quantile", "kmeans", "region")


def quantile_bounds(losses: np.ndarray, q_from: float, q_to: float) -> tuple[float, float]:
    """Linear-interpolated percentiles of the finite losses (q clamped to [0, 1])."""
    finite = losses[np.isfinite(losses)]
    if finite.size == 0:
        raise CommandError("every per-sample loss is NaN or infinite; nothing to select", ErrorCode.FAILED)
    lo, hi = (min(max(float(q), 0.0), 1.0) for q in (q_from, q_to))
    return float(np.quantile(finite, lo)), float(np.quantile(finite, hi))


def robust_scale(features: np.ndarray) -> np.ndarray:
    """Per column (x - Q1) / (Q3 - Q1); a single column is replaced by its rank in [0, 1]."""
    if features.shape[1] == 1:
        ranks = np.argsort(np.argsort(features[:, 0], kind="stable"), kind="stable").astype(np.float64)
        return (ranks / max(len(ranks) - 1, 1))[:, None]
    q1, q3 = np.percentile(features, 25, axis=0), np.percentile(features, 75, axis=0)
    return (features - q1) / (q3 - q1 + 1e-12)


class ForkMergeMixin:
    """fork, merge, switch_run, attach_context, set_counter_seeds, prepare_export, spill_all."""

    def _init_fork_merge(self) -> None:
        self._budget: dict[str, Any] | None = None

    def _register_fork_merge_commands(self, router: CommandRouter) -> None:
        router.register("fork", self.cmd_fork, schema=Fork, mutating=True,
                        description="train a child run on selected samples")
        router.register("merge", self.cmd_merge, schema=Merge, mutating=True,
                        description="merge runs' checkpoints into a new run")
        router.register("switch_run", self.cmd_switch_run, schema=SwitchRun, mutating=True,
                        description="make another run current (loads its checkpoint)")
        router.register("attach_context", self.cmd_attach_context, schema=SwitchRun, mutating=True,
                        description="bind the session to a run the dashboard knows")
        router.register("set_counter_seeds", self.cmd_set_counter_seeds, schema=CounterSeeds, mutating=False,
                        description="seed the fork/merge name counters")
        router.register("prepare_export", self.cmd_prepare_export, schema=PrepareExport, mutating=True,
                        description="checkpoint and write a session bundle")
        router.register("spill_all", self.cmd_spill_all, schema=PrepareExport, mutating=True,
                        description="copy every run's checkpoints into a folder")

    # ---- the training subset ---------------------------------------------------------------
    def rebind_train_loader(self, indices: list[int] | None, *, batch_size: int | None = None) -> None:
        """Train on `Subset(root, indices)` (None = the whole dataset), keeping the loader's knobs."""
        from ..sampler_utils import clone_loader

        root_loader = self.train_root_loader
        if indices is None:
            loader = root_loader
        else:
            if not isinstance(root_loader, DataLoader):
                raise CommandError("training on a subset needs a torch DataLoader", ErrorCode.FAILED)
            dataset = Subset(self.train_root_dataset(), list(indices))
            kwargs: dict[str, Any] = {"dataset": dataset}
            if batch_size is not None:
                kwargs["batch_size"] = batch_size
            loader = clone_loader(root_loader, **kwargs)
        self.train_loader = self.prepare_train_loader(loader)
        self.on_dataset_changed(indices)
        self.refresh_train_loader()

    def refresh_train_loader(self) -> None:
        """Hook: a framework session tells its framework that the train loader changed."""

    def model_with_weights(self, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
        model = self.model_factory() if self.model_factory is not None else copy.deepcopy(self.model)
        model.load_state_dict(state_dict, strict=True)
        return model.to(self.resolve_device())

    def loader_over(self, indices: list[int] | None, *, shuffle: bool = False) -> DataLoader:
        """A plain deterministic loader over the root dataset (or a subset of it)."""
        from ..sampler_utils import clone_loader

        root = self.train_root_dataset()
        dataset = root if indices is None else Subset(root, list(indices))
        return clone_loader(self.train_root_loader, dataset=dataset, shuffle=shuffle)

    # ---- fork --------------------------------------------------------------------------------
    def cmd_fork(self, p: Fork) -> dict[str, Any]:
        allow = p.allow_when_paused if p.allow_when_paused is not None else p.mode == "manual"
        if not allow and self.gate.paused:
            self.log(f"Fork skipped: mode {p.mode!r} does not run while paused", level="warn")
            return {"new_run": None, "subset_indices": [], "skipped": "paused"}
        request = {"action": "fork", "payload": dataclasses.asdict(p)}
        return self.console.pause_window(request, lambda: self.do_fork(p))

    def checkpoint_current_run(self) -> str | None:
        """Before the session leaves the current run, put its latest state on disk (waits for it)."""
        if self.model is None:
            return None
        path, written = self.save_checkpoint()
        written.result(timeout=600)
        return path

    def do_fork(self, p: Fork) -> dict[str, Any]:
        current = self.cfg.run_name
        parent = p.parent_run_id or current
        if parent != current and parent not in self.known_runs():
            raise CommandError(f"payload.parent_run_id: unknown run {parent!r}", ErrorCode.NOT_FOUND)
        child = self.child_name(p.run_name, "fork")
        hp = p.hparams or ForkHparams()
        self.validate_fork_hparams(hp)
        current_ckpt = self.checkpoint_current_run()
        init_from = current_ckpt if (parent == current and not p.parent_ckpt_path) else \
            self.load_parent_state(parent, p.parent_ckpt_path)
        indices, selection_meta = self.select_samples(p.selection, p.region)
        if indices.size == 0:
            raise CommandError("the selection matched no samples; nothing to fork on", ErrorCode.BAD_PAYLOAD)
        applied = self.apply_child_hparams(hp)
        meta = {
            "kind": "fork", "from": parent, "at_step": self.state.step, "init_from": init_from,
            "region": dataclasses.asdict(p.region) if p.region else None, "subset_count": int(indices.size),
            "mode": p.mode, "selection": selection_meta,
        }
        self.start_new_run(child, parents=[parent], meta=meta, hparams={**dataclasses.asdict(hp), **applied})
        subset = indices.tolist()
        self.update_run_manifest(child, subset_indices=subset, init_from=init_from)
        self.state.epoch = 0
        self.state.batch_in_epoch = 0
        self.rebind_train_loader(subset, batch_size=hp.batch_size)
        self.request_reposition()
        budget = hp.max_steps if hp.max_steps is not None else None
        if hp.epochs is not None:
            budget = (budget or 0) + hp.epochs * len(self.train_loader)
        self._budget = None if budget is None else {
            "until_step": self.state.step + budget, "parent": parent, "parent_ckpt": init_from,
            "indices": subset, "steps": budget,
        }
        self.log(f"[fork] {child} from {parent} on {len(subset)} samples")
        return {"new_run": child, "subset_indices": subset, "parent": parent, "subset_count": len(subset),
                "init_from": init_from, "hparams": applied, "budget_steps": budget}

    def child_name(self, requested: str | None, kind: str) -> str:
        if requested is None:
            return self.next_run_name(kind)
        from ..session.storage import safe_component

        name = safe_component(requested)
        if name in self.known_runs() or name == self.cfg.run_name:
            raise CommandError(f"a run named {name!r} exists already; choose another name", ErrorCode.BAD_PAYLOAD)
        return name

    @staticmethod
    def validate_fork_hparams(hp: ForkHparams) -> None:
        for name in ("lr", "lr_mul", "wd_mul"):
            value = getattr(hp, name)
            if value is not None and not value > 0:
                raise CommandError(f"payload.hparams.{name} must be > 0, got {value}", ErrorCode.BAD_PAYLOAD)
        for name in ("batch_size", "max_steps", "epochs", "patience"):
            value = getattr(hp, name)
            if value is not None and value < 1:
                raise CommandError(f"payload.hparams.{name} must be >= 1, got {value}", ErrorCode.BAD_PAYLOAD)

    def load_parent_state(self, parent: str, ckpt_path: str | None) -> str | None:
        """Put the parent's weights in the live model; make sure the parent's own state is on disk."""
        if ckpt_path:
            path = self.storage.resolve_wire_path(ckpt_path, field="parent_ckpt_path", must_exist=True)
        elif parent != self.cfg.run_name:
            latest = self.ring(parent).latest()
            if latest is None:
                raise CommandError(f"no checkpoint found for parent run {parent!r}", ErrorCode.NOT_FOUND)
            path = latest.path
        else:
            return self.checkpoint_current_run()
        try:
            self.load_checkpoint_into_state(path)
        except CheckpointError as exc:
            raise CommandError(str(exc), ErrorCode.FAILED) from exc
        return str(path)

    def apply_child_hparams(self, hp: ForkHparams) -> dict[str, Any]:
        """Set the child's lr / weight decay on the optimizer (the parent's values live in its checkpoint)."""
        applied: dict[str, Any] = {}
        if self.optimizer is None:
            return applied
        for group in self.optimizer.param_groups:
            if hp.lr is not None:
                group["lr"] = hp.lr
            elif hp.lr_mul is not None:
                group["lr"] = group["lr"] * hp.lr_mul
            if hp.wd_mul is not None and "weight_decay" in group:
                group["weight_decay"] = group["weight_decay"] * hp.wd_mul
        groups = self.optimizer.param_groups
        applied["lr"] = [g["lr"] for g in groups]
        if any("weight_decay" in g for g in groups):
            applied["weight_decay"] = [g.get("weight_decay") for g in groups]
        if hp.batch_size is not None:
            applied["batch_size"] = hp.batch_size
        self.mark_state_changed()
        return applied

    # ---- selection ---------------------------------------------------------------------------
    def select_samples(self, selection: Selection | None, region: Any) -> tuple[np.ndarray, dict[str, Any]]:
        """Root-dataset indices chosen by `selection` (or a loss `region`), sorted, unique."""
        root = self.train_root_dataset()
        n = len(root)
        if selection is None and region is None:
            raise CommandError("fork needs a selection or a region", ErrorCode.BAD_PAYLOAD)
        if selection is not None and selection.kind not in SELECTION_KINDS:
            raise CommandError(f"payload.selection.kind: expected one of {SELECTION_KINDS}, got {selection.kind!r}",
                               ErrorCode.BAD_PAYLOAD)
        if selection is not None and selection.kind == "indices":
            ids = np.unique(np.asarray(selection.ids or [], dtype=np.int64))
            bad = ids[(ids < 0) | (ids >= n)]
            if bad.size:
                raise CommandError(f"payload.selection.ids: {bad[:5].tolist()} out of range for a dataset of {n}",
                                   ErrorCode.BAD_PAYLOAD)
            return ids, {"kind": "indices", "count": int(ids.size)}
        with self.per_sample_losses(self.model, self.loader_over(None)) as scored:
            losses, indices = (np.array(a) for a in scored.to_numpy())
        losses = losses.astype(np.float64)
        if selection is not None and selection.kind == "quantile":
            q_from = 0.85 if selection.from_ is None else selection.from_
            q_to = 1.0 if selection.to is None else selection.to
            lo, hi = quantile_bounds(losses, q_from, q_to)
            chosen = indices[(losses >= lo) & (losses <= hi)]
            return np.unique(chosen), {"kind": "quantile", "from": q_from, "to": q_to, "lo": lo, "hi": hi,
                                       "metric": "per_sample_loss"}
        if selection is not None and selection.kind == "kmeans":
            return self.select_by_kmeans(selection, losses, indices)
        source = selection if (selection is not None and selection.kind == "region") else region
        lo = -np.inf if getattr(source, "minLoss", None) is None else float(source.minLoss)
        hi = np.inf if getattr(source, "maxLoss", None) is None else float(source.maxLoss)
        chosen = indices[(losses >= lo) & (losses <= hi)]
        return np.unique(chosen), {"kind": "region", "minLoss": getattr(source, "minLoss", None),
                                   "maxLoss": getattr(source, "maxLoss", None)}

    def select_by_kmeans(self, sel: Selection, losses: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, dict]:
        from ..data_explorer import cluster_embeddings, compute_embeddings, select_hard_clusters

        wanted = [f.strip() for f in sel.feature.split("|") if f.strip()]
        unknown = sorted(set(wanted) - {"loss", "margin", "embed"})
        if unknown or not wanted:
            raise CommandError(f"payload.selection.feature: unknown feature(s) {unknown or wanted}; "
                               "use loss, margin, embed joined by '|'", ErrorCode.BAD_PAYLOAD)
        columns: list[np.ndarray] = []
        finite = np.where(np.isfinite(losses), losses, np.nanmax(np.where(np.isfinite(losses), losses, np.nan)))
        if "loss" in wanted:
            columns.append(finite[:, None])
        if "margin" in wanted or "embed" in wanted:
            emb = compute_embeddings(self.model, self.loader_over(None), embedding_hook=self.embedding_hook,
                                     max_dims=256, device=self.resolve_device(), seed=1337)
            vectors, emb_idx = (np.asarray(a) for a in emb.to_numpy())
            if not np.array_equal(emb_idx, indices):
                raise CommandError("loss and embedding scans visited different samples", ErrorCode.FAILED)
            if "margin" in wanted:
                columns.append(self.margins(indices)[:, None])
            if "embed" in wanted:
                columns.append(vectors.astype(np.float64))
        features = robust_scale(np.concatenate(columns, axis=1))
        k = min(sel.k, len(indices))
        labels = cluster_embeddings(features.astype(np.float32), k=k, seed=0)
        ranked = select_hard_clusters(labels, finite, indices)
        targets = sel.target_clusters
        if not targets:
            targets = [ranked[0].cluster]  # the hardest cluster
        chosen = np.unique(np.concatenate([c.indices for c in ranked if c.cluster in set(targets)] or [np.array([], np.int64)]))
        meta = {"kind": "kmeans", "k": k, "feature": sel.feature, "target_clusters": list(targets),
                "clusters": [{"cluster": c.cluster, "size": c.size, "mean_loss": c.mean_loss} for c in ranked]}
        return chosen, meta

    def margins(self, indices: np.ndarray) -> np.ndarray:
        """Top-1 minus top-2 output per sample (|output| for one output), in scan order."""
        from ..data_explorer import call_model, ensure_tensor_output, move_to_device

        out: list[np.ndarray] = []
        model, device = self.model, self.resolve_device()
        was = model.training
        model.eval()
        try:
            with torch.inference_mode():
                for batch in self.loader_over(None):
                    logits = ensure_tensor_output(call_model(model, move_to_device(batch, device))).float()
                    logits = logits.reshape(logits.shape[0], -1)
                    if logits.shape[1] == 1:
                        out.append(logits[:, 0].abs().cpu().numpy())
                    else:
                        top = logits.topk(2, dim=1).values
                        out.append((top[:, 0] - top[:, 1]).clamp_min(0).cpu().numpy())
        finally:
            model.train(was)
        result = np.concatenate(out) if out else np.zeros(0)
        if len(result) != len(indices):
            raise CommandError("margin scan length differs from the loss scan", ErrorCode.FAILED)
        return result.astype(np.float64)

    # ---- fork budget -------------------------------------------------------------------------
    def check_fork_budget(self) -> None:
        """Called after each step while a budgeted fork trains; pauses and reports when it is spent."""
        budget = self._budget
        if budget is None or self.state.step < budget["until_step"]:
            return
        self._budget = None
        child_loss = self.region_loss(self.model, budget["indices"])
        parent_loss = None
        if budget["parent_ckpt"]:
            parent_model = self.model_with_weights(load_checkpoint(budget["parent_ckpt"])["model"])
            parent_loss = self.region_loss(parent_model, budget["indices"])
        result = {"run_id": self.cfg.run_name, "parent": budget["parent"], "steps": budget["steps"],
                  "region_loss": child_loss, "parent_region_loss": parent_loss,
                  "improved": None if parent_loss is None else child_loss < parent_loss}
        self.emit("fork_budget_reached", **result)
        self.log(f"[fork] budget of {budget['steps']} steps reached: region loss {child_loss:.4f}"
                 + (f" (parent {parent_loss:.4f})" if parent_loss is not None else ""))
        self.console.pause({"action": "fork_budget", "reason": "budget_reached"})

    def region_loss(self, model: torch.nn.Module, indices: list[int]) -> float:
        with self.per_sample_losses(model, self.loader_over(indices)) as scored:
            losses, _ = scored.to_numpy()
            return float(np.nanmean(np.asarray(losses, dtype=np.float64)))

    # ---- merge -------------------------------------------------------------------------------
    def cmd_merge(self, p: Merge) -> dict[str, Any]:
        from ..merging import MergeError, resolve_strategy

        try:
            strategy = resolve_strategy(p.strategy)
        except MergeError as exc:
            raise CommandError(f"payload.strategy: {exc}", ErrorCode.BAD_PAYLOAD) from exc
        if not p.parents and not p.paths:
            raise CommandError("merge requires either 'parents' or explicit 'paths'", ErrorCode.BAD_PAYLOAD)
        request = {"action": "merge", "parents": p.parents, "strategy": strategy, "paths": p.paths,
                   "new_name": p.new_name}
        return self.console.pause_window(request, lambda: self.do_merge(p, strategy))

    def do_merge(self, p: Merge, strategy: str) -> dict[str, Any]:
        from ..merging import MergeError, merge_state_dicts

        self.checkpoint_current_run()
        parents, paths = self.merge_inputs(p)
        child = self.child_name(p.new_name, "merge")
        state_dicts = [load_checkpoint(path)["model"] for path in paths]
        kwargs: dict[str, Any] = {}
        try:
            if strategy in ("swa", "adapter") and p.weights is not None:
                kwargs["weights"] = p.weights
            elif strategy == "fisher":
                from ..merging import estimate_fisher

                kwargs["fishers"] = [
                    estimate_fisher(self.model_with_weights(sd), self.loader_over(self.run_subset_indices(r)),
                                    self.loss_fn, max_batches=p.fisher_batches, forward=self.fisher_forward)
                    for r, sd in zip(parents, state_dicts)
                ]
            elif strategy in ("task_arithmetic", "ties"):
                kwargs["base"] = self.common_ancestor_state(parents)
                kwargs["scale"] = p.scale
                if strategy == "ties":
                    kwargs["density"] = p.density
            elif strategy == "distill":
                union = sorted({i for r in parents for i in (self.run_subset_indices(r) or range(len(self.train_root_dataset())))})
                kwargs.update(model_factory=lambda: self.model_with_weights(state_dicts[0]),
                              loader=self.loader_over(union, shuffle=True), steps=p.distill_steps)
            merged = merge_state_dicts(strategy, state_dicts, **kwargs)
        except MergeError as exc:
            raise CommandError(f"merge failed: {exc}", ErrorCode.BAD_PAYLOAD) from exc
        with torch.no_grad():
            self.model.load_state_dict(merged, strict=True)
        self.mark_state_changed()
        meta = {"kind": "merge", "strategy": strategy, "parents": parents, "paths": [str(x) for x in paths]}
        self.start_new_run(child, parents=parents, meta=meta,
                           hparams={"merge": {"strategy": strategy, "parents": parents, "paths": meta["paths"]}})
        self.state.epoch = 0
        self.state.batch_in_epoch = 0
        self.rebind_train_loader(None)
        self.request_reposition()
        ckpt_path, written = self.save_checkpoint()
        written.result(timeout=600)
        self.log(f"[merge] {child} = {strategy}({', '.join(parents)})")
        return {"new_run": child, "parents": parents, "strategy": strategy, "paths": meta["paths"], "ckpt": ckpt_path}

    def fisher_forward(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        from ..data_explorer import compute_batch_loss, move_to_device

        return compute_batch_loss(model, move_to_device(batch, self.resolve_device()), self.loss_fn, per_sample=False)

    def merge_inputs(self, p: Merge) -> tuple[list[str], list[Path]]:
        """(parent run names, their checkpoint paths)."""
        if p.paths:
            paths = [self.storage.resolve_wire_path(x, field="paths", must_exist=True) for x in p.paths]
            parents = list(p.parents) if p.parents and len(p.parents) == len(paths) else [x.stem for x in paths]
            return parents, paths
        parents = list(dict.fromkeys(p.parents or []))
        if len(parents) < 2:
            raise CommandError("merge needs at least two distinct parents", ErrorCode.BAD_PAYLOAD)
        paths = []
        for run in parents:
            if run == self.cfg.run_name:
                paths.append(Path(self.checkpoint_current_run()))
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

    # ---- switching runs ------------------------------------------------------------------------
    def cmd_set_counter_seeds(self, p: CounterSeeds) -> dict[str, Any]:
        self.counters["fork"] = max(self.counters.get("fork", 0), p.fork_counter_init)
        self.counters["merge"] = max(self.counters.get("merge", 0), p.merge_counter_init)
        self.log(f"[runs] counters seeded: fork={self.counters['fork']} merge={self.counters['merge']}")
        return {"ok": True, "fork_counter_seed": self.counters["fork"], "merge_counter_seed": self.counters["merge"]}

    def cmd_switch_run(self, p: SwitchRun) -> dict[str, Any]:
        if not p.run_id:
            raise CommandError("payload.run_id: required", ErrorCode.BAD_PAYLOAD)
        return self.bind_to_run(p)

    def cmd_attach_context(self, p: SwitchRun) -> dict[str, Any]:
        return self.bind_to_run(p)

    def bind_to_run(self, p: SwitchRun) -> dict[str, Any]:
        """Pause, make `run_id` current, load its checkpoint (given, else its latest), restore its subset."""
        run_id = p.run_id or self.cfg.run_name
        self.console.pause({"action": "switch_run", "run_id": run_id}, checkpoint=run_id != self.cfg.run_name)
        if p.fork_counter_init is not None or p.merge_counter_init is not None:
            self.cmd_set_counter_seeds(CounterSeeds(p.fork_counter_init or 0, p.merge_counter_init or 0))
        ckpt = None
        if p.init_ckpt:
            ckpt = self.storage.resolve_wire_path(p.init_ckpt, field="init_ckpt", must_exist=True)
        elif run_id != self.cfg.run_name and run_id not in self.known_runs():
            raise CommandError(f"unknown run {run_id!r} and no init_ckpt given", ErrorCode.NOT_FOUND)
        ckpt = self.adopt_run(run_id, ckpt, init_step=p.init_step)
        return {"ok": True, "run_id": run_id, "paused": True, "ckpt_loaded": ckpt is not None,
                "ckpt_path": str(ckpt) if ckpt else None, "step": self.state.step,
                "fork_counter_seed": self.counters["fork"], "merge_counter_seed": self.counters["merge"]}

    def adopt_run(self, run_id: str, ckpt: Path | None = None, *, init_step: int | None = None) -> Path | None:
        """Make `run_id` the current run and load `ckpt` (default: its latest, when switching runs)."""
        if run_id != self.cfg.run_name:
            self.checkpoint_current_run()
            if ckpt is None:
                latest = self.ring(run_id).latest() if run_id in self.known_runs() else None
                ckpt = latest.path if latest else None
            self.update_run_manifest(self.cfg.run_name, last_step=self.state.step)
            self.run_gen += 1
            self.cfg.run_name = run_id
            self._update_event_context()
            self._last_saved = None
            if self.read_manifest(run_id) is None:
                self.start_new_run(run_id, parents=[], meta={"kind": "attached"}, transition=False, emit_new_run=False)
            self.rebind_train_loader(self.manifest_subset(run_id))
        if ckpt is not None:
            try:
                self.load_checkpoint_into_state(ckpt)
            except CheckpointError as exc:
                raise CommandError(str(exc), ErrorCode.FAILED) from exc
            self.emit("checkpoint_loaded", path=str(ckpt), step=self.state.step)
        if init_step is not None:
            self.state.step = int(init_step)
        self.request_reposition()
        self.log(f"[runs] bound to run {run_id!r}" + (f" from {ckpt}" if ckpt else ""))
        return ckpt

    def resume_from_bundle(self, bundle: str | Path, run_id: str | None = None) -> dict[str, Any]:
        """Import a session bundle (every checksum verified) and continue one of its runs here.

        The bundle's runs (manifests and checkpoints) are copied into this session; `run_id`
        defaults to the run created last. Training then continues bit-exactly from its latest
        checkpoint, on the run's own subset of the data.
        """
        from ..session_bundle import import_session

        self.flush_manifests()
        info = import_session(bundle, dest_root=self.storage.root)
        source_runs = info.folder / "runs"
        manifests = {}
        for folder in sorted(p for p in source_runs.iterdir() if p.is_dir()):
            target = self.storage.folder / "runs" / folder.name
            if target.exists():
                raise CommandError(f"run {folder.name!r} exists in this session already; cannot import it",
                                   ErrorCode.FAILED)
            shutil.copytree(folder, target)
            manifest = self.read_manifest(folder.name) or {}
            manifests[folder.name] = manifest
        if not manifests:
            raise CommandError(f"{bundle}: the bundle holds no runs", ErrorCode.NOT_FOUND)
        if run_id is None:
            run_id = max(manifests, key=lambda r: manifests[r].get("created", 0.0))
        if run_id not in manifests:
            raise CommandError(f"{bundle}: no run {run_id!r} in the bundle (runs: {sorted(manifests)})",
                               ErrorCode.NOT_FOUND)
        latest = self.ring(run_id).latest()
        if latest is None:
            raise CommandError(f"{bundle}: run {run_id!r} has no checkpoint to resume from", ErrorCode.NOT_FOUND)
        self.adopt_run(run_id, latest.path)
        self.log(f"[resume] imported {len(manifests)} run(s) from {bundle}; continuing {run_id!r} "
                 f"at step {self.state.step}")
        return {"run_id": run_id, "step": self.state.step, "runs": sorted(manifests),
                "imported_folder": str(info.folder)}

    # ---- export ------------------------------------------------------------------------------
    def export_folder(self, requested: str | None, default_name: str) -> Path:
        if requested:
            return self.storage.resolve_wire_path(requested, field="dir")
        return self.storage.exports / default_name

    def cmd_prepare_export(self, p: PrepareExport) -> dict[str, Any]:
        from ..session_bundle import export_session

        ckpt = {"path": None, "run": self.cfg.run_name, "step": self.state.step}
        if self.model is not None:
            path, written = self.save_checkpoint()
            written.result(timeout=600)
            ckpt["path"] = path
        self.bus.flush(timeout=10)
        self.flush_manifests()
        name = f"bundle-{self.session_id}-step{self.state.step}" + (".tar.gz" if p.archive else "")
        out = self.export_folder(p.dir, name)
        if p.dir and not out.name.endswith((".tar", ".tar.gz", ".tgz")):
            out = out / name  # `dir` is a folder to put the bundle in
        bundle = export_session(self.storage.folder, out, latest_only=p.latest_only)
        self.emit("artifact_created", run_id=self.cfg.run_name, path=str(bundle), kind="session_bundle")
        return {"ckpt": ckpt, "snapshots": [], "bundle": str(bundle)}

    def cmd_spill_all(self, p: PrepareExport) -> list[dict[str, Any]]:
        out = self.export_folder(p.dir, f"spill-{self.session_id}")
        out.mkdir(parents=True, exist_ok=True)
        copied = []
        for run_id in self.known_runs():
            infos = self.ring(run_id).list()
            for info in infos[-1:] if p.latest_only else infos:
                target = out / f"{run_id}__step{info.step}.pt"
                shutil.copy2(info.path, target)
                copied.append({"run": run_id, "step": info.step, "path": str(target)})
        return copied
