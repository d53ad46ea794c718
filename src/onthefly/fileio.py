"""Atomic file writes: every file this library writes goes through here (temp file, fsync, rename).

Also kept here, because every write passes through: the registry of paths this process wrote
(so the path policy can let a user re-export over our own file but never over anyone else's),
and the translation of a full disk into one clear message, whatever layer noticed it (torch's
zip writer reports ENOSPC as "unexpected pos").
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import secrets
import shutil
import threading
from pathlib import Path
from typing import IO, Callable

log = logging.getLogger("onthefly")

__all__ = [
    "DiskFullError",
    "atomic_copy",
    "atomic_write",
    "disk_full_error",
    "format_bytes",
    "fsync_directory",
    "make_dirs",
    "mount_point",
    "note_written",
    "remove_quietly",
    "written_by_this_process",
]

#: Below this much free space a failed write is reported as a full disk even without ENOSPC.
NEARLY_FULL_BYTES = 1 << 20
_DISK_FULL_ERRNOS = frozenset(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if code)
_REGISTRY_SIZE = 65_536


class DiskFullError(OSError):
    """A write failed because the file system is full (or the user's quota is spent)."""

    def __init__(self, path: Path, free: int | None, mount: Path) -> None:
        shown = "unknown space" if free is None else format_bytes(free)
        super().__init__(
            errno.ENOSPC, f"no space left on device while writing {path} ({shown} free on {mount})"
        )
        self.path = path
        self.free = free
        self.mount = mount

    def __str__(self) -> str:
        return self.strerror or super().__str__()


# ---- the registry of files this process wrote ---------------------------------------------------

_written: collections.OrderedDict[str, None] = collections.OrderedDict()
_written_lock = threading.Lock()


def _key(path: str | os.PathLike[str]) -> str:
    # The folder resolved (symlinks, ..), the final name as it is: the entry itself may be a link.
    absolute = os.path.abspath(os.fspath(path))
    return os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))


def note_written(path: str | os.PathLike[str]) -> None:
    """Record that this process created `path` (a file or folder); bounded, oldest forgotten first."""
    key = _key(path)
    with _written_lock:
        _written[key] = None
        _written.move_to_end(key)
        while len(_written) > _REGISTRY_SIZE:
            _written.popitem(last=False)


def written_by_this_process(path: str | os.PathLike[str]) -> bool:
    """True when `path` was created by this process through `atomic_write`, `make_dirs` or `note_written`."""
    with _written_lock:
        return _key(path) in _written


# ---- folders and atomic writes ------------------------------------------------------------------


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Flush a folder's entry table so a completed `os.replace` survives a power cut."""
    if os.name != "posix":
        # Windows cannot open a folder as a file; NTFS journals the rename itself.
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
        log.debug("filesystem of %s does not support fsync on folders (%s); skipped", directory, exc)
    finally:
        os.close(fd)


def make_dirs(path: str | os.PathLike[str]) -> Path:
    """`mkdir -p`, recording every folder it created in the registry; returns the folder."""
    folder = Path(path)
    missing: list[Path] = []
    probe = folder
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    folder.mkdir(parents=True, exist_ok=True)
    for created in missing:
        note_written(created)
    return folder


def remove_quietly(path: Path) -> None:
    """Remove a leftover temp file; a failure is logged, never raised over the original error."""
    try:
        path.unlink()
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("could not remove temp file %s after a failed write: %s", path, exc)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Write `path` through `.<name>.tmp-<pid>-<rand>` in the same folder, fsync, os.replace.

    `write` receives the open binary temp file. Readers see the old file or the new one, never a
    partial one; on any failure the temp file is removed, the target is left untouched, and the
    error propagates unchanged — except a full disk, raised as `DiskFullError` (an `OSError`
    with errno ENOSPC) naming the file, the free space and the mount, the original as its cause.
    The pid in the temp name lets cleaners tell stale temp files (of dead writers) from live
    ones. The written path is recorded in the registry (`written_by_this_process`).
    """
    target = Path(path)
    make_dirs(target.parent)
    temp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(temp, "xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
        fsync_directory(target.parent)
    except BaseException as exc:
        full = disk_full_error(target, exc) if isinstance(exc, Exception) else None
        remove_quietly(temp)
        if full is not None:
            raise full from exc
        raise
    note_written(target)
    return target


def atomic_copy(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Copy a file's bytes (and times) atomically to `target`, recorded in the registry."""
    src = Path(source)

    def copy(handle: IO[bytes]) -> None:
        with open(src, "rb") as reader:
            shutil.copyfileobj(reader, handle, 1 << 20)

    written = atomic_write(target, copy)
    shutil.copystat(src, written)
    return written


# ---- a full disk ---------------------------------------------------------------------------------


def disk_full_error(path: str | os.PathLike[str], exc: BaseException) -> DiskFullError | None:
    """A `DiskFullError` for `path` when `exc` means the disk is full, else None.

    Full means ENOSPC/EDQUOT anywhere in the exception's cause/context chain, or — because
    torch's writer reports it without an errno ("unexpected pos") — an `OSError`/`RuntimeError`
    while the file system holds less than 1 MiB free.
    """
    target = Path(path)
    if isinstance(exc, DiskFullError):
        return exc
    seen: set[int] = set()
    link: BaseException | None = exc
    by_errno = False
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if isinstance(link, OSError) and link.errno in _DISK_FULL_ERRNOS:
            by_errno = True
            break
        link = link.__cause__ or link.__context__
    folder = _existing_folder(target.parent)
    free = _free_bytes(folder)
    if not by_errno:
        if not isinstance(exc, (OSError, RuntimeError)) or free is None or free >= NEARLY_FULL_BYTES:
            return None
    return DiskFullError(target, free, mount_point(folder))


def mount_point(path: str | os.PathLike[str]) -> Path:
    """The mount point of the file system holding `path` (an existing path)."""
    probe = Path(os.path.realpath(path))
    while not os.path.ismount(probe) and probe != probe.parent:
        probe = probe.parent
    return probe


def format_bytes(size: int) -> str:
    """`0 B`, `512 B`, `3.0 KiB`, `12.5 MiB`, `1.2 GiB`."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _existing_folder(folder: Path) -> Path:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError as exc:
        log.debug("cannot read the free space of %s: %s", folder, exc)
        return None
