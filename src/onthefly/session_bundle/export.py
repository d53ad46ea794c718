"""Exporting a session folder as a bundle (a checked folder or a tar archive), never half-written."""

from __future__ import annotations

import gzip
import hashlib
import os
import secrets
import sqlite3
import tarfile
import time
from pathlib import Path
from typing import Any

from .._version import __version__
from ..checkpoints import fsync_directory, step_from_filename
from ..storage import MARKER, safe_component

from .format import BUNDLE_SCHEMA, BUNDLE_VERSION, BundleError, EVENT_LOG_NAME, MANIFEST_NAME, archive_compression, copy_hashed, encode_manifest, fsync_folders, hash_file, log, parse_json_object, read_json_object, remove_tree, write_file
from .verify import name_problem


def export_session(
    session_folder: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    archive: bool | None = None,
    latest_only: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write a bundle of `session_folder` to `out_path` and return `out_path`.

    The bundle is a folder, or one tar archive when `archive` is True or (with `archive=None`)
    when `out_path` ends with `.tar`, `.tar.gz` or `.tgz` (gzip unless it ends with `.tar`).
    `latest_only` keeps only each run's newest checkpoint. The bundle is built in a temporary
    sibling and renamed into place, so `out_path` is either absent or complete. An existing
    `out_path` is refused unless `overwrite` is True.
    """
    source = Path(session_folder)
    target = Path(out_path)
    if not source.is_dir():
        raise BundleError(source, "is not a folder; expected a session folder <root>/<project>/<session_id>/")
    marker = read_json_object(source / MARKER, "session marker")
    session_id = marker.get("session_id", source.name)
    project = marker.get("project", source.parent.name)
    if not isinstance(session_id, str) or name_problem(session_id) is not None:
        raise BundleError(
            source / MARKER, f"session_id must be a name of [A-Za-z0-9._-] characters, got {session_id!r}"
        )
    if not isinstance(project, str) or not project:
        raise BundleError(source / MARKER, f"project must be a non-empty string, got {project!r}")
    source_resolved = source.resolve()
    target_resolved = target.resolve()
    if target_resolved == source_resolved or target_resolved in source_resolved.parents:
        raise BundleError(target, f"is (or contains) the session folder {source}; choose another out_path")
    if target_resolved.is_relative_to(source_resolved / "runs"):
        raise BundleError(target, f"is inside the runs folder of {source}; put bundles in exports/ or elsewhere")
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise BundleError(target, "already exists; pass overwrite=True to replace it")

    as_archive = archive_compression(target) is not None if archive is None else bool(archive)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BundleError(target, f"cannot create its folder: {exc}") from exc
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        manifest = _stage_bundle(source, staging, session_id, project, latest_only)
        if as_archive:
            packed = staging.with_name(staging.name + ".tar")
            try:
                _write_archive(staging, packed, manifest, gzipped=archive_compression(target) != "tar")
                remove_tree(staging)
                _move_into_place(packed, target, overwrite)
            finally:
                if packed.exists():
                    packed.unlink()
        else:
            fsync_folders(staging)
            _move_into_place(staging, target, overwrite)
    finally:
        if staging.exists():
            remove_tree(staging)
    return target

def _stage_bundle(source: Path, staging: Path, session_id: str, project: str,
                  latest_only: bool) -> dict[str, Any]:
    """Copy the session's files into `staging`, write its manifest there, and return the manifest."""
    staging.mkdir()
    files: dict[str, str] = {}
    files[MARKER] = copy_hashed(source / MARKER, staging / MARKER)[0]

    runs: dict[str, dict[str, Any]] = {}
    run_ids: dict[str, str] = {}
    runs_dir = source / "runs"
    run_dirs = sorted(p for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else []
    for run_dir in run_dirs:
        key = run_dir.name
        if key.startswith("."):
            # Run folder names never start with a dot (safe_component strips them): a temp folder.
            log.debug("skipping hidden folder %s in runs/", run_dir)
            continue
        if name_problem(key) is not None:
            raise BundleError(run_dir, "run folder name has characters outside [A-Za-z0-9._-]")
        record = _stage_run_manifest(run_dir, staging, files)
        entries = _stage_checkpoints(run_dir, key, staging, files, latest_only)
        run_id = record.get("run_id", key)
        runs[key] = {
            "run_id": run_id if isinstance(run_id, str) else key,
            "parents": record.get("parents", []),
            "kind": record.get("kind"),
            "status": record.get("status"),
            "checkpoints": entries,
            "latest": entries[-1]["file"] if entries else None,
        }
        run_ids[runs[key]["run_id"]] = key

    lineage = []
    for key, run in runs.items():
        for parent in run["parents"]:
            # Parents are recorded by run id; name them by their run folder when it is in the bundle.
            lineage.append([_run_key_for(parent, runs, run_ids), key])

    event_log: str | None = None
    events_db = source / EVENT_LOG_NAME
    if events_db.is_file():
        _copy_event_log(events_db, staging / EVENT_LOG_NAME)
        files[EVENT_LOG_NAME] = hash_file(staging / EVENT_LOG_NAME)[0]
        event_log = EVENT_LOG_NAME

    manifest = {
        "schema": BUNDLE_SCHEMA,
        "version": BUNDLE_VERSION,
        "created": time.time(),
        "onthefly_version": __version__,
        "session_id": session_id,
        "project": project,
        "runs": runs,
        "lineage": lineage,
        "files": dict(sorted(files.items())),
        "event_log": event_log,
    }
    write_file(staging / MANIFEST_NAME, encode_manifest(manifest))
    return manifest

def _stage_run_manifest(run_dir: Path, staging: Path, files: dict[str, str]) -> dict[str, Any]:
    """Copy `run.json` byte for byte and return it parsed (empty when the run has none)."""
    path = run_dir / "run.json"
    if not path.is_file():
        log.warning("run folder %s has no run.json; it is exported without parents, kind or status", run_dir)
        return {}
    raw = path.read_bytes()
    record = parse_json_object(raw, path, "run manifest")
    parents = record.get("parents", [])
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise BundleError(path, f"parents must be a list of run ids, got {parents!r}")
    rel = f"runs/{run_dir.name}/run.json"
    write_file(staging / rel, raw)
    files[rel] = hashlib.sha256(raw).hexdigest()
    return record

def _stage_checkpoints(run_dir: Path, key: str, staging: Path, files: dict[str, str],
                       latest_only: bool) -> list[dict[str, Any]]:
    """Copy a run's `step-<N>.pt` files (or only the newest) and describe them, oldest first."""
    folder = run_dir / "checkpoints"
    found: list[tuple[int, Path]] = []
    if folder.is_dir():
        for path in folder.iterdir():
            step = step_from_filename(path.name)
            if step is not None and path.is_file():
                found.append((step, path))
    found.sort()
    entries: list[dict[str, Any]] = []
    # Newest first, so that with latest_only a checkpoint pruned by a live ring falls back to the next.
    for step, path in reversed(found):
        rel = f"runs/{key}/checkpoints/{path.name}"
        try:
            digest, size = copy_hashed(path, staging / rel)
        except FileNotFoundError:
            log.info("checkpoint %s was removed by its ring while exporting; not in the bundle", path)
            continue
        entries.append({"file": rel, "step": step, "sha256": digest, "size": size})
        files[rel] = digest
        if latest_only:
            break
    entries.reverse()
    return entries

def _run_key_for(run_id: str, runs: dict[str, Any], run_ids: dict[str, str]) -> str:
    if run_id in runs:
        return run_id
    if run_id in run_ids:
        return run_ids[run_id]
    cleaned = safe_component(run_id)
    return cleaned if cleaned in runs else run_id

def _copy_event_log(source: Path, dest: Path) -> None:
    """Copy an SQLite (WAL) database consistently with the backup API, as a single-file database."""
    try:
        src = sqlite3.connect(str(source), timeout=30.0)
        try:
            dst = sqlite3.connect(str(dest))
            try:
                src.backup(dst)
                mode = dst.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
                check = dst.execute("PRAGMA quick_check").fetchone()[0]
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as exc:
        raise BundleError(source, f"could not be copied as an SQLite database ({exc})") from exc
    if str(mode).lower() != "delete":
        raise BundleError(source, f"its copy could not leave WAL mode (journal_mode={mode})")
    if check != "ok":
        raise BundleError(source, f"its copy failed SQLite's integrity check: {check}")
    with open(dest, "rb") as handle:
        os.fsync(handle.fileno())

def _write_archive(staging: Path, dest: Path, manifest: dict[str, Any], *, gzipped: bool) -> None:
    """Pack the staged bundle into one tar file (manifest first), regular files only, fsynced."""
    mtime = int(manifest["created"])
    names = [MANIFEST_NAME, *sorted(manifest["files"])]
    with open(dest, "xb") as raw:
        stream: Any = raw
        if gzipped:
            # filename="" keeps the temp file's name out of the gzip header.
            stream = gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=mtime)
        try:
            with tarfile.open(fileobj=stream, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for name in names:
                    path = staging / name
                    member = tarfile.TarInfo(name)
                    member.size = path.stat().st_size
                    member.mtime = mtime
                    member.mode = 0o644
                    with open(path, "rb") as handle:
                        tar.addfile(member, handle)
        finally:
            if gzipped:
                stream.close()
        raw.flush()
        os.fsync(raw.fileno())

def _move_into_place(built: Path, target: Path, overwrite: bool) -> None:
    """Rename a finished bundle onto `target`; an existing target is replaced only with `overwrite`."""
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise BundleError(target, "already exists; pass overwrite=True to replace it")
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.rename(target, old)
        except OSError as exc:
            raise BundleError(target, f"could not be moved aside to be replaced ({exc})") from exc
        try:
            os.rename(built, target)
        except BaseException as exc:
            os.rename(old, target)
            if isinstance(exc, OSError):
                raise BundleError(target, f"could not be replaced ({exc}); the old one was kept") from exc
            raise
        remove_tree(old)
    else:
        try:
            os.rename(built, target)
        except OSError as exc:
            raise BundleError(target, f"could not be put in place ({exc})") from exc
    fsync_directory(target.parent)
