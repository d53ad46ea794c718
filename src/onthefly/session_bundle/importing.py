"""Importing a verified bundle as a new session folder (never over existing data), and finding its checkpoints."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from ..checkpoints import fsync_directory
from ..storage import default_root, safe_component

from .format import BundleError, BundleInfo, copy_hashed, fsync_folders, hash_file, log, remove_tree
from .verify import open_bundle, path_problem


def import_session(path: str | os.PathLike[str], dest_root: str | os.PathLike[str] | None = None) -> BundleInfo:
    """Verify a bundle and copy its session to `<dest_root>/<project>/<session_id>/`.

    `dest_root` defaults to `$ONTHEFLY_HOME` or `./.onthefly`. An existing session folder is
    never overwritten: importing the same bundle again is accepted only when that folder is
    byte-identical to the bundle, else `BundleError`. Returns a `BundleInfo` whose `folder` is
    the imported session folder.
    """
    source = Path(path)
    info, scratch = open_bundle(source)
    try:
        root = Path(dest_root) if dest_root is not None else default_root()
        project_dir = root / safe_component(info.project, "default")
        target = project_dir / info.session_id
        files: dict[str, str] = info.manifest["files"]
        if target.exists() or target.is_symlink():
            difference = _difference_from(target, files)
            if difference is not None:
                raise BundleError(target, f"already exists and differs from the bundle ({difference}); import "
                                          "never overwrites a session: move it away or choose another dest_root")
            log.info("session %s is already imported at %s, byte-identical; nothing copied", info.session_id, target)
        else:
            _copy_session(info, files, project_dir, target)
        return BundleInfo(path=source, manifest=info.manifest, runs=info.runs, folder=target)
    finally:
        if scratch is not None:
            remove_tree(scratch)

def _copy_session(info: BundleInfo, files: dict[str, str], project_dir: Path, target: Path) -> None:
    """Copy the listed files into a temp sibling of `target`, re-checking each hash, then rename it."""
    try:
        project_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BundleError(project_dir, f"cannot create the project folder: {exc}") from exc
    staging = project_dir / f".{info.session_id}.import-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        staging.mkdir()
        for rel, expected in sorted(files.items()):
            digest = copy_hashed(info.folder / rel, staging / rel)[0]
            if digest != expected:
                raise BundleError(info.folder / rel, "changed after it was verified (checksum mismatch); import stopped")
        fsync_folders(staging)
        try:
            os.rename(staging, target)
        except OSError as exc:
            raise BundleError(target, f"could not be created ({exc}); import never overwrites a session") from exc
        fsync_directory(project_dir)
    finally:
        if staging.exists():
            remove_tree(staging)

def _difference_from(folder: Path, files: dict[str, str]) -> str | None:
    """None when `folder` holds exactly the bundle's files with the same bytes, else what differs."""
    if folder.is_symlink() or not folder.is_dir():
        return "it is not a folder"
    present: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in filenames + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]:
            path = Path(dirpath) / name
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink() or not path.is_file():
                return f"{rel} is not a regular file"
            present.add(rel)
    extra = sorted(present - set(files))
    if extra:
        return f"it has files the bundle lacks: {', '.join(extra[:5])}"
    missing = sorted(set(files) - present)
    if missing:
        return f"it lacks {', '.join(missing[:5])}"
    for rel, expected in sorted(files.items()):
        if hash_file(folder / rel)[0] != expected:
            return f"{rel} has different contents"
    return None

def latest_checkpoint(info: BundleInfo, run_id: str) -> Path:
    """The newest checkpoint of `run_id` (its run folder name or its run id) inside `info.folder`."""
    runs = info.manifest.get("runs") or {}
    key = run_id if run_id in runs else next(
        (k for k, run in runs.items() if isinstance(run, dict) and run.get("run_id") == run_id), None
    )
    if key is None:
        raise BundleError(info.folder, f"run {run_id!r} is not in the bundle (runs: {', '.join(sorted(runs)) or 'none'})")
    latest = runs[key].get("latest")
    if latest is None:
        raise BundleError(info.folder, f"run {run_id!r} has no checkpoint in the bundle")
    problem = path_problem(latest)
    if problem is not None:
        raise BundleError(info.folder, f"unsafe latest checkpoint path {latest!r} for run {run_id!r}: {problem}")
    path = info.folder / latest
    if not path.is_file():
        raise BundleError(path, f"missing: the latest checkpoint of run {run_id!r} is not there")
    return path
