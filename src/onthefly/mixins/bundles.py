"""Session bundles from the wire: `prepare_export`, `spill_all`, and resuming a run from a bundle.

The bundle format itself (checksums, archive layout, verification) lives in `onthefly.bundle`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..control.errors import CommandError, ErrorCode
from ..fileio import atomic_copy, make_dirs
from .command import command


ARCHIVES = (".tar", ".tar.gz", ".tgz")


@dataclass
class PrepareExport:
    dir: Optional[str] = None
    owners: Optional[list[str]] = None
    latest_only: bool = False
    archive: bool = False


class BundleMixin:
    """Exports of the whole session (no state of its own)."""

    def export_folder(self, requested: str | None, default_name: str) -> Path:
        """Where an export goes: the folder the dashboard chose (checked), else the session's exports."""
        if requested:
            return self.storage.resolve_write_path(requested, "payload.dir", kind="dir")
        return self.storage.exports / default_name

    @command("prepare_export", PrepareExport, mutating=True, description="checkpoint and write a session bundle")
    def cmd_prepare_export(self, p: PrepareExport) -> dict[str, Any]:
        from ..session_bundle import export_session

        ckpt = {"path": self.save_checkpoint_now(), "run": self.cfg.run_name, "step": self.state.step}
        if self.is_follower:
            return {"ckpt": ckpt, "snapshots": [], "bundle": None}  # rank 0 writes the bundle
        self.bus.flush(timeout=10, wire=False)  # the event log on disk; a stalled dashboard must not delay it
        self.flush_manifests()
        if p.dir and p.dir.endswith(ARCHIVES):  # `dir` names the archive itself
            out = self.storage.resolve_write_path(p.dir, "payload.dir", suffixes=ARCHIVES)
        else:
            suffix = ".tar.gz" if p.archive else ""
            base = f"bundle-{self.session_id}-step{self.state.step}"
            folder = self.export_folder(p.dir, "") if p.dir else self.storage.exports
            out, n = folder / f"{base}{suffix}", 2
            while out.exists():  # an earlier export at this step: never overwrite it
                out, n = folder / f"{base}-{n}{suffix}", n + 1
        bundle = export_session(self.storage.folder, out, latest_only=p.latest_only)
        self.emit("artifact_created", run_id=self.cfg.run_name, path=str(bundle), kind="session_bundle")
        return {"ckpt": ckpt, "snapshots": [], "bundle": str(bundle)}

    @command("spill_all", PrepareExport, mutating=True, description="copy every run's checkpoints into a folder")
    def cmd_spill_all(self, p: PrepareExport) -> list[dict[str, Any]]:
        if self.is_follower:
            return []  # rank 0 copies the files
        out = self.export_folder(p.dir, f"spill-{self.session_id}")
        make_dirs(out)
        copied = []
        for run_id in self.known_runs():
            infos = self.ring(run_id).list()
            for info in infos[-1:] if p.latest_only else infos:
                target = out / f"{run_id}__step{info.step}.pt"
                if p.dir:
                    target = self.storage.resolve_write_path(str(target), "payload.dir", suffixes=(".pt",))
                atomic_copy(info.path, target)
                copied.append({"run": run_id, "step": info.step, "path": str(target)})
        return copied

    def resume_from(self, path: str | Path, run_id: str | None = None) -> dict[str, Any]:
        """Continue from a checkpoint, or from a run of a session bundle (`run_id`; default its newest run)."""
        from ..session_bundle import is_bundle

        if is_bundle(path):
            return self.resume_from_bundle(path, run_id)
        info = self.load_checkpoint_into_state(path)
        self.log(f"[resume] restored {path} at step {info['step']}")
        self.emit("checkpoint_loaded", path=str(path), step=info["step"])
        return info

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
            manifests[folder.name] = self.read_manifest(folder.name) or {}
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
