"""Atomic file writes: every file this library writes goes through here (temp file, fsync, rename)."""

from __future__ import annotations

import errno
import logging
import os
import secrets
from pathlib import Path
from typing import IO, Callable

log = logging.getLogger("onthefly")


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
    error propagates unchanged. The pid in the temp name lets cleaners tell stale temp files
    (of dead writers) from live ones.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(temp, "xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
        fsync_directory(target.parent)
    except BaseException:
        remove_quietly(temp)
        raise
    return target
