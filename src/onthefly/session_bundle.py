"""Session bundles: export a session folder as a checked folder or archive, and import one back.

A bundle holds what is needed to inspect or resume a session elsewhere: `session.json`, every
run's `run.json` and checkpoints, a consistent copy of `events.db`, and `manifest.json`, which
records the lineage and the sha256 of every file and of the manifest itself. Nothing in a bundle is
trusted before `verify_bundle` has checked every path and every byte, and importing never
overwrites existing data. See docs/bundles.md.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import sqlite3
import sys
import tarfile
import tempfile
import time
import weakref
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Any

from ._version import __version__
from .checkpoints import fsync_directory, step_from_filename
from .session.storage import MARKER, default_root, safe_component

__all__ = [
    "BUNDLE_SCHEMA",
    "BUNDLE_VERSION",
    "BundleError",
    "BundleInfo",
    "encode_manifest",
    "export_session",
    "import_session",
    "latest_checkpoint",
    "verify_bundle",
]

log = logging.getLogger(__name__)

BUNDLE_SCHEMA = "onthefly.bundle"
BUNDLE_VERSION = 1

MANIFEST_NAME = "manifest.json"
EVENT_LOG_NAME = "events.db"
# Longest first, so "x.tar.gz" is recognised as gzip and not as plain tar.
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
DIGEST_FIELD = "manifest_sha256"
DIGEST_PLACEHOLDER = "0" * 64
CHUNK_BYTES = 1 << 20


class BundleError(Exception):
    """A bundle could not be written, read or imported; names the file and what is wrong."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass
class BundleInfo:
    """A verified bundle: where it came from, its manifest, its run ids, and the folder holding its files.

    For an archive, `folder` is a private temporary folder it was unpacked into; that folder is
    removed when this object is garbage-collected. After `import_session`, `folder` is the
    imported session folder.
    """

    path: Path
    manifest: dict[str, Any]
    runs: list[str]
    folder: Path

    @property
    def session_id(self) -> str:
        return str(self.manifest["session_id"])

    @property
    def project(self) -> str:
        return str(self.manifest["project"])


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


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
    marker = _read_json_object(source / MARKER, "session marker")
    session_id = marker.get("session_id", source.name)
    project = marker.get("project", source.parent.name)
    if not isinstance(session_id, str) or _name_problem(session_id) is not None:
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

    as_archive = _archive_compression(target) is not None if archive is None else bool(archive)
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
                _write_archive(staging, packed, manifest, gzipped=_archive_compression(target) != "tar")
                _remove_tree(staging)
                _move_into_place(packed, target, overwrite)
            finally:
                if packed.exists():
                    packed.unlink()
        else:
            _fsync_folders(staging)
            _move_into_place(staging, target, overwrite)
    finally:
        if staging.exists():
            _remove_tree(staging)
    return target


def _stage_bundle(source: Path, staging: Path, session_id: str, project: str,
                  latest_only: bool) -> dict[str, Any]:
    """Copy the session's files into `staging`, write its manifest there, and return the manifest."""
    staging.mkdir()
    files: dict[str, str] = {}
    files[MARKER] = _copy_hashed(source / MARKER, staging / MARKER)[0]

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
        if _name_problem(key) is not None:
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
        files[EVENT_LOG_NAME] = _hash_file(staging / EVENT_LOG_NAME)[0]
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
    _write_file(staging / MANIFEST_NAME, encode_manifest(manifest))
    return manifest


def _stage_run_manifest(run_dir: Path, staging: Path, files: dict[str, str]) -> dict[str, Any]:
    """Copy `run.json` byte for byte and return it parsed (empty when the run has none)."""
    path = run_dir / "run.json"
    if not path.is_file():
        log.warning("run folder %s has no run.json; it is exported without parents, kind or status", run_dir)
        return {}
    raw = path.read_bytes()
    record = _parse_json_object(raw, path, "run manifest")
    parents = record.get("parents", [])
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise BundleError(path, f"parents must be a list of run ids, got {parents!r}")
    rel = f"runs/{run_dir.name}/run.json"
    _write_file(staging / rel, raw)
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
            digest, size = _copy_hashed(path, staging / rel)
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


def encode_manifest(manifest: dict[str, Any]) -> bytes:
    """The bytes of `manifest.json`: sorted, indented JSON whose `manifest_sha256` is its own digest.

    The digest is the sha256 of these exact bytes with the digest's 64 characters replaced by
    zeros, so any changed byte anywhere in the file is detected.
    """
    body = dict(manifest)
    body[DIGEST_FIELD] = DIGEST_PLACEHOLDER
    data = (json.dumps(body, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
    digest = hashlib.sha256(data).hexdigest()
    return data.replace(_digest_needle(DIGEST_PLACEHOLDER), _digest_needle(digest))


def _digest_needle(digest: str) -> bytes:
    # Inside a JSON string every '"' is escaped, so this byte sequence can only be the real field.
    return f'"{DIGEST_FIELD}": "{digest}"'.encode("ascii")


def _archive_compression(path: Path) -> str | None:
    """"gz" or "tar" when the name asks for an archive, else None."""
    name = path.name.lower()
    for suffix in ARCHIVE_SUFFIXES:
        if name.endswith(suffix):
            return "tar" if suffix == ".tar" else "gz"
    return None


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
        _remove_tree(old)
    else:
        try:
            os.rename(built, target)
        except OSError as exc:
            raise BundleError(target, f"could not be put in place ({exc})") from exc
    fsync_directory(target.parent)


# --------------------------------------------------------------------------------------------
# Verify
# --------------------------------------------------------------------------------------------


def is_bundle(path: str | os.PathLike[str]) -> bool:
    """A session bundle: a folder with manifest.json, or a .tar/.tar.gz/.tgz archive."""
    p = Path(path)
    return (p.is_dir() and (p / "manifest.json").is_file()) or p.name.endswith((".tar", ".tar.gz", ".tgz"))


def verify_bundle(path: str | os.PathLike[str]) -> BundleInfo:
    """Check a bundle (a folder, its `manifest.json`, or an archive) and return what it holds.

    Checks the manifest's schema, version and own checksum, refuses any absolute, `..` or escaping
    path, and verifies the sha256 of every file. Archives are unpacked member by member into a
    temporary folder after every member was checked (no links, no special files, no unsafe names).
    Raises `BundleError` naming the first file that is wrong.
    """
    info, scratch = _open_bundle(Path(path))
    if scratch is not None:
        weakref.finalize(info, _remove_tree, scratch)
    return info


def _open_bundle(source: Path) -> tuple[BundleInfo, Path | None]:
    """Verify a bundle; for an archive also return the temporary folder it was unpacked into."""
    if source.is_dir():
        return _verify_folder(source, source, _folder_labeller(source)), None
    if source.is_file() and source.name == MANIFEST_NAME:
        return _verify_folder(source.parent, source, _folder_labeller(source.parent)), None
    if not source.is_file():
        raise BundleError(source, "does not exist; expected a bundle folder or a .tar/.tar.gz/.tgz archive")
    scratch = Path(tempfile.mkdtemp(prefix="onthefly-bundle-"))
    try:
        _unpack_archive(source, scratch)
        info = _verify_folder(scratch, source, _archive_labeller(source))
    except BaseException:
        _remove_tree(scratch)
        raise
    return info, scratch


def _folder_labeller(folder: Path) -> Callable[[str], str]:
    return lambda rel: str(folder / rel)


def _archive_labeller(archive: Path) -> Callable[[str], str]:
    return lambda rel: f"{archive} (member {rel})"


def _verify_folder(folder: Path, origin: Path, label: Callable[[str], str]) -> BundleInfo:
    manifest = _read_manifest(folder / MANIFEST_NAME, label(MANIFEST_NAME))
    _check_manifest(manifest, label(MANIFEST_NAME))
    root = folder.resolve()
    for rel, expected in manifest["files"].items():
        _check_bundle_file(root, rel, expected, label(rel))
    for key, run in manifest["runs"].items():
        for entry in run["checkpoints"]:
            size = (root / entry["file"]).stat().st_size
            if size != entry["size"]:
                raise BundleError(label(entry["file"]), f"size is {size} bytes, the manifest says {entry['size']}")
    unlisted = _unlisted_files(root, set(manifest["files"]))
    if unlisted:
        log.warning("bundle %s holds files its manifest does not list; they are ignored: %s",
                    origin, ", ".join(unlisted[:10]))
    return BundleInfo(path=origin, manifest=manifest, runs=sorted(manifest["runs"]), folder=folder)


def _read_manifest(path: Path, label: str) -> dict[str, Any]:
    """Parse `manifest.json` and check its schema, version and its own checksum."""
    if not path.is_file():
        raise BundleError(label, "missing: not an onthefly bundle (it has no manifest.json)")
    raw = path.read_bytes()
    manifest = _parse_json_object(raw, label, "bundle manifest")
    if manifest.get("schema") != BUNDLE_SCHEMA:
        raise BundleError(label, f"bad manifest: schema is {manifest.get('schema')!r}, expected {BUNDLE_SCHEMA!r}")
    version = manifest.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise BundleError(label, f"bad manifest: version must be an integer, got {version!r}")
    if version > BUNDLE_VERSION:
        raise BundleError(label, f"bundle version {version} was written by a newer onthefly; "
                                 f"this one reads version {BUNDLE_VERSION}")
    if version != BUNDLE_VERSION:
        raise BundleError(label, f"unsupported bundle version {version}; expected {BUNDLE_VERSION}")
    stored = manifest.get(DIGEST_FIELD)
    if not isinstance(stored, str) or not SHA256_RE.match(stored):
        raise BundleError(label, f"bad manifest: {DIGEST_FIELD} must be 64 lowercase hex digits, got {stored!r}")
    needle = _digest_needle(stored)
    if raw.count(needle) != 1:
        raise BundleError(label, f"bad manifest: the {DIGEST_FIELD} field is not written in the expected form")
    actual = hashlib.sha256(raw.replace(needle, _digest_needle(DIGEST_PLACEHOLDER))).hexdigest()
    if actual != stored:
        raise BundleError(label, f"checksum mismatch: the manifest records sha256 {stored[:16]}..., its bytes "
                                 f"hash to {actual[:16]}...; it was modified or damaged")
    return manifest


def _check_manifest(manifest: dict[str, Any], label: str) -> None:
    """Check the manifest's fields and that every path in it is a safe relative path."""

    def bad(where: str, problem: str) -> BundleError:
        return BundleError(label, f"bad manifest: {where}: {problem}")

    for field in ("session_id", "project"):
        value = manifest.get(field)
        if not isinstance(value, str) or not value:
            raise bad(field, f"expected a non-empty string, got {value!r}")
    problem = _name_problem(manifest["session_id"])
    if problem is not None:
        raise bad("session_id", f"{manifest['session_id']!r} {problem}")

    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise bad("files", "expected a non-empty object {relative_path: sha256}")
    for rel, digest in files.items():
        problem = _path_problem(rel)
        if problem is not None:
            raise BundleError(label, f"unsafe path {rel!r} in files: {problem}")
        if not isinstance(digest, str) or not SHA256_RE.match(digest):
            raise bad(f"files[{rel!r}]", f"expected 64 lowercase hex digits, got {digest!r}")
    if MARKER not in files:
        raise bad("files", f"{MARKER} is missing; a bundle must carry the session marker")

    event_log = manifest.get("event_log")
    if event_log is not None and event_log not in files:
        raise bad("event_log", f"{event_log!r} is not listed in files")

    runs = manifest.get("runs")
    if not isinstance(runs, dict):
        raise bad("runs", f"expected an object keyed by run, got {type(runs).__name__}")
    for key, run in runs.items():
        problem = _name_problem(key)
        if problem is not None:
            raise BundleError(label, f"unsafe run name {key!r} in runs: {problem}")
        where = f"runs[{key!r}]"
        if not isinstance(run, dict):
            raise bad(where, f"expected an object, got {type(run).__name__}")
        parents = run.get("parents")
        if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
            raise bad(f"{where}.parents", f"expected a list of run ids, got {parents!r}")
        checkpoints = run.get("checkpoints")
        if not isinstance(checkpoints, list):
            raise bad(f"{where}.checkpoints", f"expected a list, got {type(checkpoints).__name__}")
        ckpt_files = []
        for index, entry in enumerate(checkpoints):
            _check_checkpoint_entry(entry, key, files, bad, f"{where}.checkpoints[{index}]", label)
            ckpt_files.append(entry["file"])
        latest = run.get("latest")
        if latest is not None and latest not in ckpt_files:
            raise bad(f"{where}.latest", f"{latest!r} is not one of the run's checkpoints")

    lineage = manifest.get("lineage")
    if not isinstance(lineage, list) or not all(
        isinstance(edge, list) and len(edge) == 2 and all(isinstance(v, str) for v in edge) for edge in lineage
    ):
        raise bad("lineage", "expected a list of [parent, child] pairs of run ids")


def _check_checkpoint_entry(entry: Any, key: str, files: dict[str, str],
                            bad: Callable[[str, str], BundleError], where: str, label: str) -> None:
    if not isinstance(entry, dict):
        raise bad(where, f"expected an object, got {type(entry).__name__}")
    rel = entry.get("file")
    problem = _path_problem(rel)
    if problem is not None:
        raise BundleError(label, f"unsafe path {rel!r} in {where}.file: {problem}")
    if not rel.startswith(f"runs/{key}/checkpoints/"):
        raise bad(f"{where}.file", f"{rel!r} is not inside runs/{key}/checkpoints/")
    if rel not in files:
        raise bad(f"{where}.file", f"{rel!r} is not listed in files")
    step = entry.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise bad(f"{where}.step", f"expected an integer >= 0, got {step!r}")
    if entry.get("sha256") != files[rel]:
        raise bad(f"{where}.sha256", f"differs from files[{rel!r}]")
    size = entry.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise bad(f"{where}.size", f"expected an integer >= 0, got {size!r}")


def _check_bundle_file(root: Path, rel: str, expected: str, label: str) -> None:
    """One listed file: a regular file inside the bundle whose sha256 is the one recorded."""
    path = root / rel
    if path.is_symlink():
        raise BundleError(label, "is a symbolic link; bundles hold regular files only")
    if not path.resolve().is_relative_to(root):
        raise BundleError(label, f"resolves outside the bundle folder {root}")
    if not path.exists():
        raise BundleError(label, "missing: listed in the manifest but not in the bundle")
    if not path.is_file():
        raise BundleError(label, "is not a regular file")
    actual = _hash_file(path)[0]
    if actual != expected:
        raise BundleError(label, f"checksum mismatch: the manifest records sha256 {expected[:16]}..., the file "
                                 f"hashes to {actual[:16]}...; it was modified or damaged")


def _unlisted_files(root: Path, listed: set[str]) -> list[str]:
    extra = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != MANIFEST_NAME and rel not in listed:
                extra.append(rel)
    return sorted(extra)


def _name_problem(name: str) -> str | None:
    """Why `name` cannot be one file or folder name in a bundle, or None when it can."""
    if name in (".", ".."):
        return "is '.' or '..'"
    if not SAFE_NAME_RE.match(name):
        return "has characters outside [A-Za-z0-9._-]"
    return None


def _path_problem(rel: Any) -> str | None:
    """Why `rel` is not a safe relative bundle path (`a/b/c.pt`), or None when it is."""
    if not isinstance(rel, str) or not rel:
        return f"expected a non-empty string, got {rel!r}"
    if rel.startswith(("/", "\\")) or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive:
        return "is an absolute path"
    if "\\" in rel:
        return "contains a backslash; bundle paths use '/'"
    parts = rel.split("/")
    if ".." in parts:
        return "contains '..'"
    if any(part in ("", ".") for part in parts):
        return "has an empty or '.' component"
    for part in parts:
        problem = _name_problem(part)
        if problem is not None:
            return f"component {part!r} {problem}"
    return None


def _unpack_archive(archive: Path, dest: Path) -> None:
    """Unpack a tar archive after checking every member: regular files and folders with safe names only.

    Members are written by this function (never by tarfile's extract), so links, devices,
    permissions and owners in the archive have no effect.
    """
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            wanted: list[tuple[str, tarfile.TarInfo]] = []
            seen: set[str] = set()
            for member in members:
                name = member.name[2:] if member.name.startswith("./") else member.name
                if name in ("", ".") and member.isdir():
                    continue
                if member.issym() or member.islnk():
                    raise BundleError(archive, f"member {member.name!r} is a link; bundles hold regular files only")
                if not (member.isfile() or member.isdir()):
                    raise BundleError(archive, f"member {member.name!r} is not a regular file or folder")
                problem = _path_problem(name)
                if problem is not None:
                    raise BundleError(archive, f"unsafe member path {member.name!r}: {problem}")
                if name in seen:
                    raise BundleError(archive, f"member {member.name!r} appears more than once")
                seen.add(name)
                wanted.append((name, member))
            for name, member in wanted:
                target = dest / name
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                reader = tar.extractfile(member)
                if reader is None:
                    raise BundleError(archive, f"member {member.name!r} has no data")
                with reader, open(target, "xb") as out:
                    shutil.copyfileobj(reader, out, CHUNK_BYTES)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise BundleError(archive, f"could not be unpacked as a tar archive ({type(exc).__name__}: {exc})") from exc


# --------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------


def import_session(path: str | os.PathLike[str], dest_root: str | os.PathLike[str] | None = None) -> BundleInfo:
    """Verify a bundle and copy its session to `<dest_root>/<project>/<session_id>/`.

    `dest_root` defaults to `$ONTHEFLY_HOME` or `./.onthefly`. An existing session folder is
    never overwritten: importing the same bundle again is accepted only when that folder is
    byte-identical to the bundle, else `BundleError`. Returns a `BundleInfo` whose `folder` is
    the imported session folder.
    """
    source = Path(path)
    info, scratch = _open_bundle(source)
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
            _remove_tree(scratch)


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
            digest = _copy_hashed(info.folder / rel, staging / rel)[0]
            if digest != expected:
                raise BundleError(info.folder / rel, "changed after it was verified (checksum mismatch); import stopped")
        _fsync_folders(staging)
        try:
            os.rename(staging, target)
        except OSError as exc:
            raise BundleError(target, f"could not be created ({exc}); import never overwrites a session") from exc
        fsync_directory(project_dir)
    finally:
        if staging.exists():
            _remove_tree(staging)


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
        if _hash_file(folder / rel)[0] != expected:
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
    problem = _path_problem(latest)
    if problem is not None:
        raise BundleError(info.folder, f"unsafe latest checkpoint path {latest!r} for run {run_id!r}: {problem}")
    path = info.folder / latest
    if not path.is_file():
        raise BundleError(path, f"missing: the latest checkpoint of run {run_id!r} is not there")
    return path


# --------------------------------------------------------------------------------------------
# Small file helpers
# --------------------------------------------------------------------------------------------


def _hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _copy_hashed(source: Path, dest: Path) -> tuple[str, int]:
    """Copy a file, returning the sha256 and size of the bytes actually written; fsyncs the copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    with open(source, "rb") as src, open(dest, "xb") as out:
        while chunk := src.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest(), size


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "xb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def _fsync_folders(root: Path) -> None:
    """fsync every folder under `root` (deepest first), so the entries survive a power cut."""
    for dirpath, _dirnames, _filenames in os.walk(root, topdown=False):
        fsync_directory(dirpath)


def _read_json_object(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise BundleError(path, f"missing: no {what} (is this a session folder?)")
    return _parse_json_object(path.read_bytes(), path, what)


def _parse_json_object(raw: bytes, label: str | Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(label, f"{what} is not valid UTF-8 JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise BundleError(label, f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _remove_tree(path: Path) -> None:
    """Remove a temporary file or folder of ours; a failure is logged (the data it held is a copy)."""

    def report(_func: Any, failed: str, exc: BaseException) -> None:
        log.warning("could not remove temporary bundle file %s: %s", failed, exc)

    if path.is_dir() and not path.is_symlink():
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=report)
        else:
            shutil.rmtree(path, onerror=lambda func, failed, info: report(func, failed, info[1]))
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("could not remove temporary bundle file %s: %s", path, exc)
