"""The bundle format: its names, manifest encoding, errors, and the hashed file operations every step uses."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoints import fsync_directory



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

def encode_manifest(manifest: dict[str, Any]) -> bytes:
    """The bytes of `manifest.json`: sorted, indented JSON whose `manifest_sha256` is its own digest.

    The digest is the sha256 of these exact bytes with the digest's 64 characters replaced by
    zeros, so any changed byte anywhere in the file is detected.
    """
    body = dict(manifest)
    body[DIGEST_FIELD] = DIGEST_PLACEHOLDER
    data = (json.dumps(body, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
    digest = hashlib.sha256(data).hexdigest()
    return data.replace(digest_needle(DIGEST_PLACEHOLDER), digest_needle(digest))

def digest_needle(digest: str) -> bytes:
    # Inside a JSON string every '"' is escaped, so this byte sequence can only be the real field.
    return f'"{DIGEST_FIELD}": "{digest}"'.encode("ascii")

def archive_compression(path: Path) -> str | None:
    """"gz" or "tar" when the name asks for an archive, else None."""
    name = path.name.lower()
    for suffix in ARCHIVE_SUFFIXES:
        if name.endswith(suffix):
            return "tar" if suffix == ".tar" else "gz"
    return None

def is_bundle(path: str | os.PathLike[str]) -> bool:
    """A session bundle: a folder with manifest.json, or a .tar/.tar.gz/.tgz archive."""
    p = Path(path)
    return (p.is_dir() and (p / "manifest.json").is_file()) or p.name.endswith((".tar", ".tar.gz", ".tgz"))

def hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size

def copy_hashed(source: Path, dest: Path) -> tuple[str, int]:
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

def write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "xb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())

def fsync_folders(root: Path) -> None:
    """fsync every folder under `root` (deepest first), so the entries survive a power cut."""
    for dirpath, _dirnames, _filenames in os.walk(root, topdown=False):
        fsync_directory(dirpath)

def read_json_object(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise BundleError(path, f"missing: no {what} (is this a session folder?)")
    return parse_json_object(path.read_bytes(), path, what)

def parse_json_object(raw: bytes, label: str | Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(label, f"{what} is not valid UTF-8 JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise BundleError(label, f"{what} must be a JSON object, got {type(value).__name__}")
    return value

def remove_tree(path: Path) -> None:
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
