"""Verifying a bundle: every path, every byte and the manifest's own digest, before anything trusts it."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import weakref
import zlib
from collections.abc import Callable
from pathlib import Path, PureWindowsPath
from typing import Any

from ..storage import MARKER

from .format import BUNDLE_SCHEMA, BUNDLE_VERSION, BundleError, BundleInfo, CHUNK_BYTES, DIGEST_FIELD, DIGEST_PLACEHOLDER, MANIFEST_NAME, SAFE_NAME_RE, SHA256_RE, digest_needle, hash_file, log, parse_json_object, remove_tree


def verify_bundle(path: str | os.PathLike[str]) -> BundleInfo:
    """Check a bundle (a folder, its `manifest.json`, or an archive) and return what it holds.

    Checks the manifest's schema, version and own checksum, refuses any absolute, `..` or escaping
    path, and verifies the sha256 of every file. Archives are unpacked member by member into a
    temporary folder after every member was checked (no links, no special files, no unsafe names).
    Raises `BundleError` naming the first file that is wrong.
    """
    info, scratch = open_bundle(Path(path))
    if scratch is not None:
        weakref.finalize(info, remove_tree, scratch)
    return info

def open_bundle(source: Path) -> tuple[BundleInfo, Path | None]:
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
        remove_tree(scratch)
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
    manifest = parse_json_object(raw, label, "bundle manifest")
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
    needle = digest_needle(stored)
    if raw.count(needle) != 1:
        raise BundleError(label, f"bad manifest: the {DIGEST_FIELD} field is not written in the expected form")
    actual = hashlib.sha256(raw.replace(needle, digest_needle(DIGEST_PLACEHOLDER))).hexdigest()
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
    problem = name_problem(manifest["session_id"])
    if problem is not None:
        raise bad("session_id", f"{manifest['session_id']!r} {problem}")

    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise bad("files", "expected a non-empty object {relative_path: sha256}")
    for rel, digest in files.items():
        problem = path_problem(rel)
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
        problem = name_problem(key)
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
    problem = path_problem(rel)
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
    actual = hash_file(path)[0]
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

def name_problem(name: str) -> str | None:
    """Why `name` cannot be one file or folder name in a bundle, or None when it can."""
    if name in (".", ".."):
        return "is '.' or '..'"
    if not SAFE_NAME_RE.match(name):
        return "has characters outside [A-Za-z0-9._-]"
    return None

def path_problem(rel: Any) -> str | None:
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
        problem = name_problem(part)
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
                problem = path_problem(name)
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
