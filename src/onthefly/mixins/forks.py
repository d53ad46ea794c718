"""Fork: a child run that starts from its parent's weights and trains on selected samples.

The parent's state (optimizer included) stays in the parent's checkpoint. Everything that can
fail (the parent's checkpoint, the selection, the subset loader) is checked before the child is
announced, so a failed fork leaves no run behind. A budget (`max_steps`, `epochs`, `patience`)
trains exactly that much and then hands control back: paused when a dashboard is connected to
decide what comes next, otherwise the training loop ends as completed. See docs/runs.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Optional

import numpy as np
import torch

from ..checkpoints import load_checkpoint
from ..control.constraints import Length, Range, SafeName
from ..control.errors import CommandError, ErrorCode
from . import selection as rules
from .command import command

SELECTION_KINDS = ("indices", "quantile", "kmeans", "region")


@dataclass
class Region:
    minLoss: Optional[float] = field(default=None, metadata={"aliases": ("min_loss",)})
    maxLoss: Optional[float] = field(default=None, metadata={"aliases": ("max_loss",)})


@dataclass
class Selection:
    kind: Literal["indices", "quantile", "kmeans", "region"] = "indices"
    ids: Optional[Annotated[list[Annotated[int, Range(ge=0)]], Length(max=50_000_000)]] = None
    #: What quantile and region selections rank: a loss scan, or a training-dynamics view.
    metric: Literal["per_sample_loss", "loss", "mean_loss", "loss_std", "confidence", "variability", "correctness",
                    "forgetting", "aum", "mislabel"] = "per_sample_loss"
    from_: Optional[float] = field(default=None, metadata={"aliases": ("from",)})
    to: Optional[float] = None
    k: Annotated[int, Range(ge=1, le=10_000)] = 5
    target_clusters: Optional[list[Annotated[int, Range(ge=0)]]] = None
    feature: str = "loss"
    minLoss: Optional[float] = field(default=None, metadata={"aliases": ("min_loss",)})
    maxLoss: Optional[float] = field(default=None, metadata={"aliases": ("max_loss",)})


PositiveFloat = Annotated[float, Range(gt=0, le=1e6)]
Count = Annotated[int, Range(ge=1, le=10**12)]


@dataclass
class ForkHparams:
    lr: Optional[PositiveFloat] = None
    lr_mul: Optional[PositiveFloat] = None
    wd_mul: Optional[PositiveFloat] = None
    batch_size: Optional[Count] = None
    patience: Optional[Count] = None
    max_steps: Optional[Count] = None
    epochs: Optional[Count] = None


@dataclass
class Fork:
    mode: str = "manual"
    allow_when_paused: Optional[bool] = None
    parent_run_id: Optional[Annotated[str, SafeName]] = field(default=None,
                                                              metadata={"aliases": ("owner_run_id", "runId")})
    parent_ckpt_path: Optional[str] = None
    run_name: Optional[Annotated[str, SafeName]] = None
    hparams: Optional[ForkHparams] = None
    selection: Optional[Selection] = None
    region: Optional[Region] = None


@dataclass
class ForkBudget:
    """A budgeted child's remaining training, and its early-stopping state."""

    until_step: int | None
    steps: int | None
    parent: str
    parent_ckpt: str | None
    indices: list[int]
    patience: int | None = None
    best_val: float | None = None
    bad_epochs: int = 0


@dataclass
class ForkState:
    budget: ForkBudget | None = None


class ForkMixin:
    """Owns `self.forks` (a `ForkState`)."""

    def _init_forks(self) -> None:
        self.forks = ForkState()

    @command("fork", Fork, mutating=True, description="train a child run on selected samples")
    def cmd_fork(self, p: Fork) -> dict[str, Any]:
        allow = p.allow_when_paused if p.allow_when_paused is not None else p.mode == "manual"
        if not allow and self.gate.paused:
            self.log(f"Fork skipped: mode {p.mode!r} does not run while paused", level="warn")
            return {"new_run": None, "subset_indices": [], "skipped": "paused"}
        request = {"action": "fork", "payload": dataclasses.asdict(p)}
        return self.console.pause_window(request, lambda: self.do_fork(p))

    def do_fork(self, p: Fork) -> dict[str, Any]:
        current = self.cfg.run_name
        parent = p.parent_run_id or current
        if parent != current and parent not in self.known_runs():
            raise CommandError(f"payload.parent_run_id: unknown run {parent!r}", ErrorCode.NOT_FOUND)
        if p.run_name is not None:
            self.child_name(p.run_name, "fork")  # an existing name is refused before any work
        hp = p.hparams or ForkHparams()
        if hp.patience is not None and not self.has_validation():
            raise CommandError("payload.hparams.patience needs validation losses (a val_loader, or a framework "
                               "that validates); none is configured", ErrorCode.BAD_PAYLOAD)
        if p.selection is None and p.region is None:
            raise CommandError("fork needs a selection or a region", ErrorCode.BAD_PAYLOAD)

        # 1. Put the current run's latest state on disk: it is what the parent keeps.
        current_ckpt = self.save_checkpoint_now()
        # 2. The parent's weights (the live ones, or a checkpoint's), on a copy of the model.
        parent_path = self.parent_checkpoint(parent, p.parent_ckpt_path)
        parent_model = self.model if parent_path is None else \
            self.model_with_weights(load_checkpoint(parent_path)["model"])
        init_from = current_ckpt if parent_path is None else str(parent_path)
        # 3. The selection, and the loader over it: both must be valid before the child exists.
        indices, selection_meta = self.select_samples(parent, parent_model, p.selection, p.region,
                                                      reuse_report=parent_path is None)
        if indices.size == 0:
            raise CommandError("the selection matched no samples; nothing to fork on", ErrorCode.BAD_PAYLOAD)
        subset = indices.tolist()
        loader = self.subset_loader(subset, batch_size=hp.batch_size)
        budget_steps = hp.max_steps
        if hp.epochs is not None:
            budget_steps = (budget_steps or 0) + hp.epochs * len(loader)
        # 4. Commit: the live state becomes the parent's, the child is announced and trains next.
        if parent_path is not None:
            try:
                self.load_checkpoint_into_state(parent_path)
            except Exception:
                if current_ckpt is not None:
                    self.load_checkpoint_into_state(current_ckpt)
                raise
        applied = self.apply_child_hparams(hp)
        child = self.child_name(p.run_name, "fork")
        meta = {
            "kind": "fork", "from": parent, "at_step": self.state.step, "init_from": init_from,
            "region": dataclasses.asdict(p.region) if p.region else None, "subset_count": len(subset),
            "mode": p.mode, "selection": selection_meta,
        }
        self.start_new_run(child, parents=[parent], meta=meta, hparams={**dataclasses.asdict(hp), **applied})
        self.update_run_manifest(child, subset_indices=subset, init_from=init_from)
        self.state.epoch = 0
        self.state.batch_in_epoch = 0
        self.state.run_start_step = self.state.step
        self.install_train_loader(loader, subset)
        self.request_reposition()
        self.forks.budget = None
        if budget_steps is not None or hp.patience is not None:
            self.forks.budget = ForkBudget(
                until_step=None if budget_steps is None else self.state.step + budget_steps, steps=budget_steps,
                parent=parent, parent_ckpt=init_from, indices=subset, patience=hp.patience,
            )
        self.log(f"[fork] {child} from {parent} on {len(subset)} samples"
                 + (f", budget {budget_steps} steps" if budget_steps is not None else ""))
        return {"new_run": child, "subset_indices": subset, "parent": parent, "subset_count": len(subset),
                "init_from": init_from, "hparams": applied, "budget_steps": budget_steps}

    def parent_checkpoint(self, parent: str, requested: str | None) -> Any:
        """The checkpoint the child starts from; None means the current run's live state."""
        if requested:
            return self.wire_checkpoint(requested, "payload.parent_ckpt_path")
        if parent == self.cfg.run_name:
            return None
        latest = self.ring(parent).latest()
        if latest is None:
            raise CommandError(f"no checkpoint found for parent run {parent!r}", ErrorCode.NOT_FOUND)
        return latest.path

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
    def select_samples(self, run_id: str, model: torch.nn.Module, selection: Selection | None,
                       region: Region | None, *, reuse_report: bool) -> tuple[np.ndarray, dict[str, Any]]:
        """Root-dataset indices chosen by `selection` (or a loss `region`) among the training set."""
        if selection is not None and selection.kind == "indices":
            ids = self.check_training_indices(selection.ids or [], "payload.selection.ids")
            return ids, {"kind": "indices", "count": int(ids.size)}
        if selection is not None and selection.kind == "kmeans":
            losses, indices = self.training_losses(run_id, model, reuse_report=reuse_report)
            columns = self.kmeans_columns(model, rules.parse_features(selection.feature), losses, indices)
            return rules.by_kmeans(columns, losses, indices, k=selection.k,
                                   target_clusters=selection.target_clusters, feature=selection.feature)
        if selection is not None:
            metric = "loss" if selection.metric in ("per_sample_loss", "loss") else selection.metric
        else:  # a region of the report the dashboard shows: in that report's own units
            last = self.reports.get((run_id, "train"))
            metric = last.metric if last is not None else "loss"
        if selection is not None and selection.kind == "quantile":
            values, indices = self.training_values(run_id, model, metric, reuse_report, harder_is_higher=True)
            chosen, meta = rules.by_quantile(values, indices, selection.from_, selection.to)
            return chosen, {**meta, "metric": metric}
        values, indices = self.training_values(run_id, model, metric, reuse_report)
        source: Any = selection if selection is not None else region
        chosen, meta = rules.by_region(values, indices, source.minLoss, source.maxLoss)
        return chosen, {**meta, "metric": metric}

    def training_values(self, run_id: str, model: torch.nn.Module, metric: str, reuse_report: bool, *,
                        harder_is_higher: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Per-sample values over the training set: losses of `model`, or a training-dynamics view."""
        if metric == "loss":
            return self.training_losses(run_id, model, reuse_report=reuse_report)
        return self.dynamics_values(run_id, metric, harder_is_higher=harder_is_higher)

    def training_losses(self, run_id: str, model: torch.nn.Module, *, reuse_report: bool
                        ) -> tuple[np.ndarray, np.ndarray]:
        """Per-sample losses over the training set: the last report when it scored these weights."""
        if reuse_report:
            report = self.fresh_report(run_id, "train")
            if report is not None:
                return report.losses, report.indices
        with self.per_sample_losses(model, self.scan_loader()) as scored:
            losses, indices = (np.array(a) for a in scored.to_numpy())
        return losses.astype(np.float64), indices.astype(np.int64)

    def kmeans_columns(self, model: torch.nn.Module, wanted: list[str], losses: np.ndarray,
                       indices: np.ndarray) -> list[np.ndarray]:
        from ..data_explorer import compute_embeddings

        columns: list[np.ndarray] = []
        if "loss" in wanted:
            finite = np.where(np.isfinite(losses), losses, np.nan)
            columns.append(np.where(np.isnan(finite), np.nanmax(finite), finite)[:, None])
        if "margin" in wanted:
            columns.append(self.margins(model, indices)[:, None])
        if "embed" in wanted:
            emb = compute_embeddings(model, self.scan_loader(), embedding_hook=self.embedding_hook, max_dims=256,
                                     device=self.resolve_device(), seed=1337)
            vectors, emb_idx = (np.asarray(a) for a in emb.to_numpy())
            if not np.array_equal(emb_idx, indices):
                raise CommandError("loss and embedding scans visited different samples", ErrorCode.FAILED)
            columns.append(vectors.astype(np.float64))
        return columns

    def margins(self, model: torch.nn.Module, indices: np.ndarray) -> np.ndarray:
        """Top-1 minus top-2 output per sample (|output| for one output), in `indices` order."""
        from ..data_explorer import analysis_mode, call_model, ensure_tensor_output, move_to_device

        out: list[np.ndarray] = []
        device = self.resolve_device()
        with analysis_mode(model), torch.inference_mode():
            for batch in self.loader_over(indices):
                logits = ensure_tensor_output(call_model(model, move_to_device(batch, device))).float()
                logits = logits.reshape(logits.shape[0], -1)
                if logits.shape[1] == 1:
                    out.append(logits[:, 0].abs().cpu().numpy())
                else:
                    top = logits.topk(2, dim=1).values
                    out.append((top[:, 0] - top[:, 1]).clamp_min(0).cpu().numpy())
        result = np.concatenate(out) if out else np.zeros(0)
        if len(result) != len(indices):
            raise CommandError("margin scan length differs from the loss scan", ErrorCode.FAILED)
        return result.astype(np.float64)

    # ---- the budget --------------------------------------------------------------------------
    def check_fork_budget(self) -> None:
        """After each step of a budgeted child: hand control back once the budget is spent."""
        budget = self.forks.budget
        if budget is None or budget.until_step is None or self.state.step < budget.until_step:
            return
        self.end_fork_budget(f"budget of {budget.steps} steps reached", "budget_reached")

    def note_fork_validation(self, val_loss: float | None) -> None:
        """At an epoch end of a child with `patience`: stop once val loss stops improving."""
        budget = self.forks.budget
        if budget is None or budget.patience is None or val_loss is None:
            return
        if budget.best_val is None or val_loss < budget.best_val:
            budget.best_val, budget.bad_epochs = float(val_loss), 0
            return
        budget.bad_epochs += 1
        if budget.bad_epochs >= budget.patience:
            self.end_fork_budget(f"validation loss did not improve for {budget.patience} epoch(s) "
                                 f"(best {budget.best_val:.4g})", "patience")

    def end_fork_budget(self, why: str, reason: str) -> None:
        budget, self.forks.budget = self.forks.budget, None
        if budget is None:
            return
        child_loss = self.region_loss(self.model, budget.indices)
        parent_loss = None
        if budget.parent_ckpt:
            parent_model = self.model_with_weights(load_checkpoint(budget.parent_ckpt)["model"])
            parent_loss = self.region_loss(parent_model, budget.indices)
        result = {"run_id": self.cfg.run_name, "parent": budget.parent, "steps": budget.steps,
                  "trained_steps": self.state.step - self.state.run_start_step, "reason": reason,
                  "region_loss": child_loss, "parent_region_loss": parent_loss,
                  "improved": None if parent_loss is None else child_loss < parent_loss}
        self.emit("fork_budget_reached", **result)
        self.log(f"[fork] {why}: region loss {child_loss:.4f}"
                 + (f" (parent {parent_loss:.4f})" if parent_loss is not None else ""))
        if self.dashboard_connected():  # as every rank agrees, in a distributed run
            self.console.pause({"action": "fork_budget", "reason": reason})
        else:
            self.request_finish(f"fork {self.cfg.run_name}: {why}")

    def region_loss(self, model: torch.nn.Module, indices: list[int]) -> float:
        with self.per_sample_losses(model, self.scan_loader(), indices) as scored:
            losses, _ = scored.to_numpy()
            return float(np.nanmean(np.asarray(losses, dtype=np.float64)))
