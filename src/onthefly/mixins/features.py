"""Per-sample scans for the dashboard: loss reports, region lookups, subset export, k-means proposals.

Every scan runs on a copy of the model (the live one is untouched), in eval mode, with RNGs seeded
(1337) and restored — the same settings the fork selection uses, so the region a user picks on the
report chart selects exactly the samples they saw.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..checkpoints import load_checkpoint
from ..control.errors import CommandError, ErrorCode
from ..control.router import CommandRouter
from ..session.schemas import ExportSubset, GenerateReport, ProposeSubsets, SelectedRegion

SCAN_SEED = 1337
FORMATS = ("parquet", "feather", "csv", "json")


@dataclass
class Report:
    """The last per-sample loss scan of a run on one split."""

    run_id: str
    subset_on: str
    losses: np.ndarray
    indices: np.ndarray
    step: int
    ckpt_path: str | None


class FeaturesMixin:
    """Scans over the training or validation data, on a model copy."""

    def _init_features(self) -> None:
        self._reports: dict[tuple[str, str], Report] = {}

    # ---- shared helpers --------------------------------------------------------------------
    def train_root_dataset(self) -> Any:
        """The innermost dataset of the user's training loader (fork subsets index into it)."""
        from ..data_explorer import root_dataset

        loader = getattr(self, "train_root_loader", None) or self.train_loader
        if loader is None or not hasattr(loader, "dataset"):
            raise CommandError("no training dataset is bound to the session", ErrorCode.NOT_FOUND)
        return root_dataset(loader.dataset)

    def scan_source(self, subset_on: str) -> Any:
        """What a scan reads: the full training data (the root loader) or the validation loader."""
        if subset_on == "train":
            loader = getattr(self, "train_root_loader", None) or self.train_loader
        elif subset_on == "val":
            loader = self.val_loader
        else:
            raise CommandError(f"payload.subset_on: expected 'train' or 'val', got {subset_on!r}",
                               ErrorCode.BAD_PAYLOAD)
        if loader is None:
            raise CommandError(f"no {subset_on} loader is configured for this session", ErrorCode.NOT_FOUND)
        return loader

    def model_for_run(self, run_id: str | None) -> tuple[torch.nn.Module, str | None, int]:
        """A fresh copy of the model with `run_id`'s weights: (model, checkpoint path, step)."""
        if self.model is None:
            raise CommandError("no model is bound to the session", ErrorCode.NOT_FOUND)
        run_id = run_id or self.cfg.run_name
        if run_id == self.cfg.run_name:
            model = copy.deepcopy(self.model)
            return model, self.console.pause_ckpt, self.state.step
        latest = self.ring(run_id).latest() if run_id in self.known_runs() else None
        if latest is None:
            raise CommandError(f"no checkpoint found for run {run_id!r}", ErrorCode.NOT_FOUND)
        model = self.model_factory() if self.model_factory is not None else copy.deepcopy(self.model)
        ckpt = load_checkpoint(latest.path)
        model.load_state_dict(ckpt["model"], strict=True)
        return model.to(self.resolve_device()), str(latest.path), int(ckpt.get("step", latest.step))

    def per_sample_losses(self, model: torch.nn.Module, source: Any, indices: Any = None,
                          batch_size: int | None = None) -> Any:
        """The one scan used by reports and fork selection (eval mode, seeded, cancellable)."""
        from ..data_explorer import compute_per_sample_losses

        return compute_per_sample_losses(
            model, source, self.loss_fn, indices, batch_size=batch_size, seed=SCAN_SEED,
            amp=self.cfg.amp, device=self.resolve_device(),
            cancel=lambda: not self.state.running,
            progress=lambda done, total: self.emit("scan_progress", done=done, total=total),
        )

    # ---- commands ----------------------------------------------------------------------------
    def _register_feature_commands(self, router: CommandRouter) -> None:
        router.register("generate_report", self.cmd_generate_report, schema=GenerateReport, mutating=True,
                        description="per-sample loss distribution of a run's weights")
        router.register("get_selected_region_indices", self.cmd_selected_region, schema=SelectedRegion,
                        mutating=False, description="indices whose loss lies in [min_loss, max_loss] in the last report")
        router.register("export_subset", self.cmd_export_subset, schema=ExportSubset, mutating=True,
                        description="write a table of samples (parquet, feather, csv, json)")
        router.register("propose_subsets", self.cmd_propose_subsets, schema=ProposeSubsets, mutating=True,
                        description="k-means clusters of the embeddings, hardest first")

    def cmd_generate_report(self, p: GenerateReport) -> dict[str, Any]:
        run_id = p.owner_run_id or self.cfg.run_name
        source = self.scan_source(p.subset_on)
        request = {"action": "report", "run_id": run_id, "subset_on": p.subset_on}

        def scan() -> dict[str, Any]:
            model, ckpt_path, step = self.model_for_run(run_id)
            result = self.per_sample_losses(model, source, p.subset_indices, p.batch_size)
            losses, indices = result.to_numpy()
            losses, indices = np.array(losses, dtype=np.float64), np.array(indices, dtype=np.int64)
            self._reports[(run_id, p.subset_on)] = Report(run_id, p.subset_on, losses, indices, step, ckpt_path)
            meta = {
                "note": f"{p.subset_on} split" if p.subset_indices is None else f"{p.subset_on} subset",
                "samples": int(len(losses)),
                "owner_run_id": run_id,
                "subset_on": p.subset_on,
                "subset_count": len(p.subset_indices) if p.subset_indices is not None else None,
                "at_step": step,
                "at_epoch": self.state.epoch,
                "owner_ckpt_path": ckpt_path,
                "per_sample_method": result.meta.get("per_sample_method"),
                "mode": result.meta.get("mode"),
                "seed": SCAN_SEED,
            }
            return {
                "losses": [float(x) if np.isfinite(x) else None for x in losses],
                "sample_indices": indices.tolist(),
                "owner_run_id": run_id,
                "reqId": p.reqId,
                "meta": meta,
            }

        return self.console.pause_window(request, scan, checkpoint=False)

    def last_report(self, run_id: str, subset_on: str | None) -> Report:
        splits = [subset_on] if subset_on else ["train", "val"]
        for split in splits:
            report = self._reports.get((run_id, split))
            if report is not None:
                return report
        raise CommandError(
            f"no report for run {run_id!r}" + (f" on {subset_on}" if subset_on else "")
            + "; send generate_report first", ErrorCode.NOT_FOUND,
        )

    def cmd_selected_region(self, p: SelectedRegion) -> dict[str, Any]:
        run_id = p.run_id or self.cfg.run_name
        report = self.last_report(run_id, p.subset_on)
        lo = -np.inf if p.min_loss is None else p.min_loss
        hi = np.inf if p.max_loss is None else p.max_loss
        if lo > hi:
            raise CommandError(f"payload.min_loss ({lo}) is greater than payload.max_loss ({hi})",
                               ErrorCode.BAD_PAYLOAD)
        chosen = report.indices[(report.losses >= lo) & (report.losses <= hi)]
        return {"run_id": run_id, "subset_on": report.subset_on, "indices": chosen.tolist(),
                "count": int(chosen.size), "min_loss": p.min_loss, "max_loss": p.max_loss}

    def run_subset_indices(self, run_id: str) -> list[int] | None:
        """The training subset a run trains on (None = the whole dataset)."""
        if run_id == self.cfg.run_name:
            return self.active_subset
        return self.manifest_subset(run_id)

    def manifest_subset(self, run_id: str) -> list[int] | None:
        """The training subset recorded in a run's manifest (None = the whole dataset)."""
        subset = (self.read_manifest(run_id) or {}).get("subset_indices")
        return list(subset) if subset is not None else None

    def cmd_export_subset(self, p: ExportSubset) -> dict[str, Any]:
        from ..data_explorer import export_subset_table

        run_id = p.run_id or self.cfg.run_name
        fmt = p.format.lower()
        if fmt not in FORMATS:
            raise CommandError(f"payload.format: expected one of {FORMATS}, got {p.format!r}", ErrorCode.BAD_PAYLOAD)
        dataset = self.train_root_dataset()
        losses = None
        received = None
        if p.subset_indices is not None:
            indices = np.array(sorted(set(int(i) for i in p.subset_indices)), dtype=np.int64)
            received = len(p.subset_indices)
            n = len(dataset)
            bad = indices[(indices < 0) | (indices >= n)]
            if bad.size:
                raise CommandError(f"payload.subset_indices: {bad[:5].tolist()} out of range for a dataset of {n}",
                                   ErrorCode.BAD_PAYLOAD)
        elif p.region is not None:
            region = self.cmd_selected_region(SelectedRegion(run_id=run_id, min_loss=p.region.minLoss,
                                                             max_loss=p.region.maxLoss, subset_on=p.subset_on))
            indices = np.array(region["indices"], dtype=np.int64)
        else:
            subset = self.run_subset_indices(run_id)
            indices = np.arange(len(dataset), dtype=np.int64) if subset is None else np.array(subset, dtype=np.int64)
        export_all = p.subset_indices is None and p.region is None and self.run_subset_indices(run_id) is None
        try:
            report = self.last_report(run_id, p.subset_on)
            losses = dict(zip(report.indices.tolist(), report.losses.tolist()))
        except CommandError:
            losses = None
        if p.out_path:
            out = self.storage.resolve_wire_path(p.out_path, field="out_path")
        else:
            out = self.storage.exports / f"{run_id}-subset.{fmt}"
        out.parent.mkdir(parents=True, exist_ok=True)
        result = export_subset_table(dataset, indices, out, format=fmt,
                                     losses={i: losses[i] for i in indices.tolist() if i in losses} if losses else None)
        self.emit("artifact_created", run_id=run_id, path=str(result.path), rows=result.rows, format=result.format)
        self.log(f"[export] {result.rows} rows -> {result.path}")
        return {"ok": True, "run_id": run_id, "out_path": str(result.path), "rows": result.rows,
                "format": result.format, "received_indices": received, "export_all": export_all}

    def cmd_propose_subsets(self, p: ProposeSubsets) -> dict[str, Any]:
        from ..data_explorer import propose_subsets

        run_id = p.run_id or self.cfg.run_name
        source = self.scan_source(p.subset_on)
        if p.k < 1:
            raise CommandError(f"payload.k must be >= 1, got {p.k}", ErrorCode.BAD_PAYLOAD)

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
