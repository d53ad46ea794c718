"""Per-sample scans for the dashboard: loss reports, region lookups, subset export, k-means proposals.

Every scan reads the training set (or the validation loader) through one function,
`per_sample_losses`: eval mode, RNGs seeded (1337) and restored, every sample scored, each loss
paired with its true dataset index. The fork selection uses the same scan — and reuses the last
report when it scored the very same weights — so a region picked on the report's chart selects
exactly the samples the user saw. Scans of the current run read a copy of the live model.

A report may also show a training-dynamics view instead of a fresh loss scan (`metric`, see
mixins/dynamics.py), and suggest a cut-off: which samples look mislabelled or hard, without
being told how many (`suggest_cutoff`).

Commands: `generate_report`, `get_selected_region_indices`, `export_subset`, `propose_subsets`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Optional

import numpy as np
import torch

from ..checkpoints import load_checkpoint
from ..control.constraints import Length, Range, SafeName
from ..control.errors import CommandError, ErrorCode
from .command import command

SCAN_SEED = 1337
Split = Literal["train", "val"]
ReportMetric = Literal["loss", "mean_loss", "loss_std", "confidence", "variability", "correctness", "forgetting",
                       "aum", "mislabel"]
ExportFormat = Literal["parquet", "feather", "csv", "json"]


@dataclass
class Report:
    """The last per-sample loss scan of a run on one split, and the weights it scored."""

    run_id: str
    subset_on: str
    losses: np.ndarray
    indices: np.ndarray
    step: int
    ckpt_path: str | None
    weights: tuple[int, int] | None  # (run generation, state version) of live weights; None for a checkpoint
    covers_training_set: bool
    metric: str = "loss"  # "loss" (a scan of these weights) or a training-dynamics view


RunId = Annotated[str, SafeName]
Indices = Annotated[list[Annotated[int, Range(ge=0)]], Length(max=50_000_000)]


@dataclass
class GenerateReport:
    owner_run_id: Optional[RunId] = field(default=None, metadata={"aliases": ("runId", "run_id")})
    subset_indices: Optional[Indices] = None
    subset_on: Split = "val"
    reqId: Any = None
    batch_size: Optional[Annotated[int, Range(ge=1, le=1_000_000)]] = None
    metric: ReportMetric = "loss"
    suggest_cutoff: bool = False


@dataclass
class Region:
    minLoss: Optional[float] = field(default=None, metadata={"aliases": ("min_loss",)})
    maxLoss: Optional[float] = field(default=None, metadata={"aliases": ("max_loss",)})


@dataclass
class ExportSubset:
    run_id: Optional[RunId] = field(default=None, metadata={"aliases": ("runId",)})
    format: ExportFormat = "parquet"
    subset_indices: Optional[Indices] = None
    out_path: Optional[str] = None
    region: Optional[Region] = None
    subset_on: Optional[Split] = None


@dataclass
class SelectedRegion:
    run_id: Optional[RunId] = field(default=None, metadata={"aliases": ("runId",)})
    min_loss: Optional[float] = field(default=None, metadata={"aliases": ("minLoss",)})
    max_loss: Optional[float] = field(default=None, metadata={"aliases": ("maxLoss",)})
    subset_on: Optional[Split] = None


@dataclass
class ProposeSubsets:
    run_id: Optional[RunId] = field(default=None, metadata={"aliases": ("runId",)})
    k: Annotated[int, Range(ge=1, le=10_000)] = 5
    top_k: Optional[Annotated[int, Range(ge=1, le=10_000)]] = None
    subset_on: Split = "train"
    with_indices: bool = True


class ReportsMixin:
    """Owns `self.reports`: the last report per (run, split)."""

    def _init_reports(self) -> None:
        self.reports: dict[tuple[str, str], Report] = {}

    # ---- the one scan ------------------------------------------------------------------------
    def per_sample_losses(self, model: torch.nn.Module, source: Any, indices: Any = None,
                          batch_size: int | None = None) -> Any:
        """Per-sample losses of `source` (eval mode, seeded, cancelled by a stop or a close)."""
        from ..data_explorer import compute_per_sample_losses

        if self.loss_fn is None:
            raise CommandError("a per-sample scan needs a loss_fn (pass loss_fn= to the session)",
                               ErrorCode.NOT_FOUND)
        distributed = self.ranks is not None

        def scan(chosen: Any) -> Any:
            return compute_per_sample_losses(
                model, source, self.loss_fn, chosen, batch_size=batch_size, seed=SCAN_SEED,
                amp=self.cfg.amp, device=self.resolve_device(),
                # A rank must not leave a sharded scan alone (the others would wait for its share).
                cancel=lambda: self.lifecycle.closed or (self.lifecycle.stop_requested and not distributed),
                progress=lambda done, total: self.emit("scan_progress", done=done, total=total),
            )

        if distributed:
            return self.sharded_scan(scan, source, indices)
        return scan(indices)

    def scan_source(self, subset_on: str) -> Any:
        """What a scan reads: the training set (the user's train loader) or the validation loader."""
        if subset_on == "train":
            return self.scan_loader()
        if self.val_loader is None:
            raise CommandError("no val loader is configured for this session", ErrorCode.NOT_FOUND)
        return self.val_loader

    def model_for_run(self, run_id: str) -> tuple[torch.nn.Module, str | None, int]:
        """A copy of the model with `run_id`'s weights: (model, checkpoint path, step)."""
        if self.model is None:
            raise CommandError("no model is bound to the session", ErrorCode.NOT_FOUND)
        if run_id == self.cfg.run_name:
            return copy.deepcopy(self.model), self.console.pause_ckpt, self.state.step
        latest = self.ring(run_id).latest() if run_id in self.known_runs() else None
        if latest is None:
            raise CommandError(f"no checkpoint found for run {run_id!r}", ErrorCode.NOT_FOUND)
        document = load_checkpoint(latest.path)
        return self.model_with_weights(document["model"]), str(latest.path), int(document.get("step", latest.step))

    def fresh_report(self, run_id: str, subset_on: str) -> Report | None:
        """The last report of the current run's live weights on the whole split, if nothing changed since."""
        report = self.reports.get((run_id, subset_on))
        if report is None or report.metric != "loss" or not report.covers_training_set or run_id != self.cfg.run_name:
            return None
        return report if report.weights == (self.run_gen, self.checkpoints.version) else None

    def last_report(self, run_id: str, subset_on: str | None) -> Report:
        for split in [subset_on] if subset_on else ["train", "val"]:
            report = self.reports.get((run_id, split))
            if report is not None:
                return report
        raise CommandError(f"no report for run {run_id!r}" + (f" on {subset_on}" if subset_on else "")
                           + "; send generate_report first", ErrorCode.NOT_FOUND)

    # ---- commands ----------------------------------------------------------------------------
    @command("generate_report", GenerateReport, mutating=True,
             description="per-sample loss distribution of a run's weights")
    def cmd_generate_report(self, p: GenerateReport) -> dict[str, Any]:
        run_id = p.owner_run_id or self.cfg.run_name
        source = self.scan_source(p.subset_on)
        indices = None
        if p.subset_indices is not None:
            indices = self.check_training_indices(p.subset_indices, "payload.subset_indices") \
                if p.subset_on == "train" else np.asarray(p.subset_indices, dtype=np.int64)
        request = {"action": "report", "run_id": run_id, "subset_on": p.subset_on}
        if p.metric != "loss":
            return self.dynamics_report(run_id, p, indices)

        def scan() -> dict[str, Any]:
            weights = (self.run_gen, self.checkpoints.version) if run_id == self.cfg.run_name else None
            model, ckpt_path, step = self.model_for_run(run_id)
            with self.per_sample_losses(model, source, indices, p.batch_size) as result:
                losses, idx = result.to_numpy()
                meta_scan = dict(result.meta)
            losses, idx = np.array(losses, dtype=np.float64), np.array(idx, dtype=np.int64)
            self.reports[(run_id, p.subset_on)] = Report(run_id, p.subset_on, losses, idx, step, ckpt_path,
                                                         weights, covers_training_set=indices is None)
            meta = {
                "metric": "loss",
                "note": f"{p.subset_on} split" if indices is None else f"{p.subset_on} subset",
                "samples": int(len(losses)),
                "owner_run_id": run_id,
                "subset_on": p.subset_on,
                "subset_count": len(indices) if indices is not None else None,
                "at_step": step,
                "at_epoch": self.state.epoch,
                "owner_ckpt_path": ckpt_path,
                "per_sample_method": meta_scan.get("per_sample_method"),
                "mode": meta_scan.get("mode"),
                "seed": SCAN_SEED,
                "ranks": int(meta_scan.get("ranks", 1)),  # how many ranks shared the scan
            }
            reply = {"losses": [float(x) if np.isfinite(x) else None for x in losses],
                     "sample_indices": idx.tolist(), "owner_run_id": run_id, "reqId": p.reqId, "meta": meta}
            if p.suggest_cutoff:
                reply["cutoff"] = self.loss_cutoff(losses, idx)
            return reply

        return self.console.pause_window(request, scan, checkpoint=False)

    def loss_cutoff(self, losses: np.ndarray, indices: np.ndarray) -> dict[str, Any]:
        """A suggested cut-off on a loss scan: a two-component mixture on log-loss (see docs)."""
        from ..data_explorer import CutoffError, suggest_cutoff

        try:
            return suggest_cutoff(losses=losses, indices=indices).to_dict()
        except CutoffError as exc:
            raise CommandError(f"payload.suggest_cutoff: {exc}", ErrorCode.FAILED) from exc

    def dynamics_report(self, run_id: str, p: GenerateReport, indices: np.ndarray | None) -> dict[str, Any]:
        """A report of a training-dynamics view (read from the run's records; no model pass)."""
        if p.subset_on != "train":
            raise CommandError(f"payload.metric {p.metric!r}: training dynamics are recorded on the training set; "
                               "use subset_on 'train'", ErrorCode.BAD_PAYLOAD)
        summary = self.dynamics_summary(run_id)
        values, idx = self.dynamics_values(run_id, p.metric)
        if indices is not None:
            keep = np.isin(idx, indices)
            values, idx = values[keep], idx[keep]
        records = self.dynamics_recorder(run_id).records
        self.reports[(run_id, "train")] = Report(run_id, "train", values, idx, records[-1].step, None, None,
                                                 covers_training_set=indices is None, metric=p.metric)
        meta = {
            "metric": p.metric, "note": f"training dynamics: {p.metric} over {len(records)} record(s)",
            "samples": int(len(values)), "owner_run_id": run_id, "subset_on": "train",
            "subset_count": len(indices) if indices is not None else None, "at_step": records[-1].step,
            "records": len(records), "record_steps": [r.step for r in records], "task": str(summary.task),
        }
        reply = {"losses": [float(x) if np.isfinite(x) else None for x in values], "sample_indices": idx.tolist(),
                 "owner_run_id": run_id, "reqId": p.reqId, "meta": meta}
        if p.suggest_cutoff:
            from ..data_explorer import CutoffError

            try:
                reply["cutoff"] = summary.suggested_cutoff().to_dict()
            except CutoffError as exc:
                raise CommandError(f"payload.suggest_cutoff: {exc}", ErrorCode.FAILED) from exc
        return reply

    @command("get_selected_region_indices", SelectedRegion, mutating=False,
             description="indices whose loss lies in [min_loss, max_loss] in the last report")
    def cmd_selected_region(self, p: SelectedRegion) -> dict[str, Any]:
        run_id = p.run_id or self.cfg.run_name
        report = self.last_report(run_id, p.subset_on)
        lo = -np.inf if p.min_loss is None else p.min_loss
        hi = np.inf if p.max_loss is None else p.max_loss
        if lo > hi:
            raise CommandError(f"payload.min_loss ({lo}) is greater than payload.max_loss ({hi})",
                               ErrorCode.BAD_PAYLOAD)
        chosen = np.unique(report.indices[(report.losses >= lo) & (report.losses <= hi)])
        return {"run_id": run_id, "subset_on": report.subset_on, "indices": chosen.tolist(),
                "count": int(chosen.size), "min_loss": p.min_loss, "max_loss": p.max_loss}

    @command("export_subset", ExportSubset, mutating=True,
             description="write a table of samples (parquet, feather, csv, json)")
    def cmd_export_subset(self, p: ExportSubset) -> dict[str, Any]:
        from ..data_explorer import export_subset_table

        run_id = p.run_id or self.cfg.run_name
        dataset = self.train_root_dataset()
        received = None
        if p.subset_indices is not None:
            received = len(p.subset_indices)
            indices = self.check_training_indices(p.subset_indices, "payload.subset_indices")
        elif p.region is not None:
            region = self.cmd_selected_region(SelectedRegion(run_id=run_id, min_loss=p.region.minLoss,
                                                             max_loss=p.region.maxLoss, subset_on=p.subset_on))
            indices = np.array(region["indices"], dtype=np.int64)
        else:
            indices = np.sort(self.run_training_indices(run_id))
        export_all = p.subset_indices is None and p.region is None and self.run_subset_indices(run_id) is None
        losses = None
        try:
            report = self.last_report(run_id, p.subset_on or "train")
            known = dict(zip(report.indices.tolist(), report.losses.tolist()))
            losses = {i: known[i] for i in indices.tolist() if i in known} or None
        except CommandError:
            losses = None
        if p.out_path:
            out = self.storage.resolve_write_path(p.out_path, "payload.out_path", suffixes=(f".{p.format}",))
        else:
            out = self.storage.exports / f"{run_id}-subset.{p.format}"
        if self.is_follower:  # rank 0 writes the table
            return {"ok": True, "run_id": run_id, "out_path": str(out), "rows": int(len(indices)), "format": p.format,
                    "received_indices": received, "export_all": export_all}
        result = export_subset_table(dataset, indices, out, format=p.format, losses=losses)
        self.emit("artifact_created", run_id=run_id, path=str(result.path), rows=result.rows, format=result.format)
        self.log(f"[export] {result.rows} rows -> {result.path}")
        return {"ok": True, "run_id": run_id, "out_path": str(result.path), "rows": result.rows,
                "format": result.format, "received_indices": received, "export_all": export_all}

    @command("propose_subsets", ProposeSubsets, mutating=True,
             description="k-means clusters of the embeddings, hardest first")
    def cmd_propose_subsets(self, p: ProposeSubsets) -> dict[str, Any]:
        from ..data_explorer import propose_subsets

        run_id = p.run_id or self.cfg.run_name
        source = self.scan_source(p.subset_on)

        def work() -> dict[str, Any]:
            model, _, step = self.model_for_run(run_id)
            clusters = propose_subsets(model, source, self.loss_fn, k=p.k, top_k=p.top_k,
                                       embedding_hook=self.embedding_hook, seed=0, device=self.resolve_device())
            rows = []
            for c in clusters:
                row = c.to_dict()
                if not p.with_indices:
                    row.pop("indices")
                rows.append(row)
            self.emit("subset_proposals", run_id=run_id, clusters=rows, step=step)
            return {"run_id": run_id, "clusters": rows, "step": step, "k": p.k}

        return self.console.pause_window({"action": "propose_subsets", "k": p.k}, work, checkpoint=False)
