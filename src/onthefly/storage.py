"""Where a session keeps its files, and the one policy for paths that arrive on the wire.

Every handler that takes a path from a dashboard goes through `resolve_read_path` or
`SessionStorage.resolve_write_path`; every name that becomes a path component goes through
`control.names.check_safe_name`. The rules (docs/security.md says why):

Reads (checkpoints, bundles, any input): any existing, readable regular file, because loading
is always `torch.load(weights_only=True)` or a checksummed bundle; NUL and control characters
are refused, `~` is expanded, and /proc, /sys and /dev (devices, kernel state) are refused.

Writes are allowed
  (a) inside this session's folder, the working directory, or `SessionConfig.allowed_paths`;
  (b) where the VS Code extension's dialogs write by default: under the user's home (e.g.
      ~/Downloads, the last folder used) or the system temp folder — a file that is new (or one
      this process wrote), or a folder that is new, empty, or this process's own.
and refused, wherever they point:
  - through a symbolic link as the final component, or with any component resolving (through
    a link or `..`) to somewhere no rule above allows;
  - into hidden files or folders below the root that admits them (~/.bashrc, ~/.ssh/..., a
    repository's .git/hooks), except inside this session's folder;
  - into system and package folders (/etc, /usr, /bin, /sbin, /lib*, /boot, /proc, /sys, /dev,
    /run, /var except its temp folders, the Python installation, site-packages, onthefly itself);
  - into another onthefly session's folder (reading it is fine), or over this session's own
    bookkeeping (session.json, events.db, runs/);
  - over an existing file this process did not write;
  - with a file suffix the command does not write (`suffixes=`).
"""

from __future__ import annotations

import json
import os
import re
import site
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Literal

from .control.errors import ConstraintViolation, ErrorCode, ProtocolError
from .control.names import NAME_CHARS, check_safe_name
from .fileio import atomic_write, note_written, written_by_this_process

__all__ = [
    "MARKER",
    "SessionStorage",
    "default_root",
    "resolve_read_path",
    "safe_component",
    "temp_roots",
    "write_json_atomic",
]

MARKER = "session.json"
_UNSAFE_RUN = re.compile(f"[^{NAME_CHARS}]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PROTECTED = frozenset({MARKER, "events.db", "events.db-wal", "events.db-shm", "runs"})
_PSEUDO = ("/proc", "/sys", "/dev")
_SYSTEM = ("/etc", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/boot", "/proc",
           "/sys", "/dev", "/run", "/var", "/snap", "/System", "/Library", "/private/etc", "/private/var")


def safe_component(name: str, fallback: str = "run") -> str:
    """Derive a path component from a *local* name (a configured project or run name).

    Characters outside the safe set become `-`; the result always passes `check_safe_name`.
    Names from the wire are never rewritten like this: they are checked and refused.
    """
    cleaned = _UNSAFE_RUN.sub("-", str(name)).strip("-_.+")[:120].rstrip("-_.+")
    try:
        return check_safe_name(cleaned, "name")
    except ValueError:
        return fallback


def write_json_atomic(path: Path, data: dict[str, Any] | str) -> None:
    """Write JSON atomically (temp file, fsync, rename), so readers never see half a file."""
    text = data if isinstance(data, str) else json.dumps(data, indent=2, default=str)
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def default_root() -> Path:
    return Path(os.environ.get("ONTHEFLY_HOME") or ".onthefly")


# ---- reads --------------------------------------------------------------------------------------


def resolve_read_path(value: Any, field: str) -> Path:
    """The resolved file a wire path names for reading; `field` is the label (`payload.init_ckpt`).

    Any existing, readable regular file is fine (loading is always weights-only). Refused with
    `bad_payload`: non-strings, empty, NUL or control characters, folders and other non-files,
    unreadable files; `not_found` when nothing is there.
    """
    path = _absolute(value, field)
    resolved = Path(os.path.realpath(path))
    for pseudo in _PSEUDO:
        if _inside(resolved, Path(pseudo)):
            raise ConstraintViolation(field, f"{str(path)!r} is in {pseudo}, which holds devices and kernel state, not files")
    if not resolved.exists():
        raise ProtocolError(ErrorCode.NOT_FOUND, f"{field}: no such file {str(path)!r}")
    if not resolved.is_file():
        kind = "a folder" if resolved.is_dir() else "not a regular file"
        raise ConstraintViolation(field, f"{str(path)!r} is {kind}; expected a file")
    if not os.access(resolved, os.R_OK):
        raise ConstraintViolation(field, f"{str(path)!r} is not readable by this process")
    return resolved


def _absolute(value: Any, field: str) -> Path:
    if not isinstance(value, str):
        raise ConstraintViolation(field, f"expected a path string, got {type(value).__name__}")
    if not value.strip():
        raise ConstraintViolation(field, "expected a non-empty path")
    if "\x00" in value:
        raise ConstraintViolation(field, "the path contains a NUL byte")
    control = _CONTROL.search(value)
    if control is not None:
        raise ConstraintViolation(field, f"the path contains the control character {control.group()!r}")
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else Path.cwd() / path


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _hidden_below(path: Path, root: Path) -> str | None:
    """The first component of `path` below `root` that starts with '.', if any."""
    for part in path.relative_to(root).parts:
        if part.startswith("."):
            return part
    return None


# ---- the session folder and writes --------------------------------------------------------------


class SessionStorage:
    """The session folder `<root>/<project>/<session_id>/`, the paths inside it, and the write rule."""

    def __init__(self, root: str | os.PathLike | None, project: str, session_id: str,
                 allowed: tuple[str, ...] = ()) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.project_dir = (self.root / safe_component(project, "default")).resolve()
        self.session_id = check_safe_name(session_id, "session_id")
        self.folder = self.project_dir / session_id
        self.allowed = tuple(Path(os.path.realpath(os.path.expanduser(str(p)))) for p in allowed)

    def create(self, info: dict) -> None:
        """Create the folder and its marker file (which `clean_disk` uses to know what is ours)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        marker = self.folder / MARKER
        if not marker.exists():
            write_json_atomic(marker, {"session_id": self.session_id, "created": time.time(), **info})

    @property
    def events_db(self) -> Path:
        return self.folder / "events.db"

    @property
    def exports(self) -> Path:
        return self.folder / "exports"

    def run_dir(self, run_id: str) -> Path:
        """`runs/<run_id>/`; `run_id` must be a safe name (`UnsafeName`, a bad_payload, if not)."""
        return self.folder / "runs" / check_safe_name(run_id, "run_id")

    def checkpoint_dir(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "checkpoints"

    def run_ids(self) -> list[str]:
        runs = self.folder / "runs"
        if not runs.is_dir():
            return []
        return sorted(p.name for p in runs.iterdir() if p.is_dir() and not p.name.startswith("."))

    def other_sessions(self) -> list[Path]:
        """Earlier session folders of this project that this library created (they carry the marker)."""
        if not self.project_dir.is_dir():
            return []
        return sorted(
            p for p in self.project_dir.iterdir()
            if p.is_dir() and p.resolve() != self.folder.resolve() and (p / MARKER).is_file()
        )

    # ---- paths from the wire --------------------------------------------------------------
    def resolve_read_path(self, value: Any, field: str) -> Path:
        """`resolve_read_path` (module level): reads are not limited to this session."""
        return resolve_read_path(value, field)

    def resolve_write_path(
        self,
        value: Any,
        field: str,
        *,
        kind: Literal["file", "dir"] = "file",
        suffixes: Iterable[str] | None = None,
    ) -> Path:
        """The resolved path a wire value names for writing, or `bad_payload` saying which rule refused it.

        `field` is the label for messages (`payload.out_path`). `kind="file"`: a file the command
        will write (its folder is created if missing); `suffixes` (e.g. `(".csv", ".parquet")`),
        when given, lists the endings it may have (case-insensitive). `kind="dir"`: a folder the
        command will write files into. A folder admitted under home or temp is recorded as this
        process's own, so the same folder may be used again. See the module docstring for rules.
        """
        if kind not in ("file", "dir"):
            raise ValueError(f"kind must be 'file' or 'dir', got {kind!r}")
        path = _absolute(value, field)
        shown = repr(str(value))
        if os.path.islink(path):
            raise ConstraintViolation(field, f"{shown} is a symbolic link; onthefly does not write through links")
        real = Path(os.path.realpath(path))
        via = "" if real == Path(os.path.normpath(path)) else f" (it resolves to {str(real)!r})"
        self._refuse_denied(real, field, shown + via)
        root, where = self._admitting_root(real, field, shown + via)
        if kind == "file":
            self._check_file(real, field, shown, where, suffixes)
        else:
            self._check_dir(real, field, shown, where)
        return real

    # ---- the rules ------------------------------------------------------------------------
    def _refuse_denied(self, real: Path, field: str, shown: str) -> None:
        temps = temp_roots()
        for folder in _SYSTEM:
            system = Path(folder)
            if _inside(real, system) and not any(_inside(real, temp) for temp in temps):
                raise ConstraintViolation(field, f"{shown} is inside the system folder {folder}; refusing to write there")
        for folder, what in _installation_folders(self._user_roots()):
            if _inside(real, folder):
                raise ConstraintViolation(field, f"{shown} is inside {what} ({folder}); refusing to write there")
        own = self.folder.resolve()
        if _inside(real, own):
            part = real.relative_to(own).parts[:1]
            if part and part[0] in _PROTECTED:
                raise ConstraintViolation(
                    field, f"{shown} is this session's own {part[0]}; write exports elsewhere (e.g. exports/)"
                )
            return
        for ancestor in (real, *real.parents):
            if (ancestor / MARKER).is_file():
                raise ConstraintViolation(
                    field, f"{shown} is inside another onthefly session's folder ({ancestor}); "
                           "a session reads other sessions but writes only its own folder"
                )

    def _admitting_root(self, real: Path, field: str, shown: str) -> tuple[Path, str]:
        """The first root that admits `real`, with its kind ("own", "cwd", "allowed", "home", "temp")."""
        candidates: list[tuple[Path, str]] = [(self.folder.resolve(), "own")]
        cwd = Path.cwd().resolve()
        if cwd != cwd.parent:  # a process started in / does not make the whole disk writable
            candidates.append((cwd, "cwd"))
        candidates += [(root, "allowed") for root in self.allowed]
        home = _home()
        if home is not None:
            candidates.append((home, "home"))
        candidates += [(temp, "temp") for temp in temp_roots()]
        refusals: list[str] = []
        for root, where in candidates:
            if not _inside(real, root):
                continue
            hidden = None if where == "own" else _hidden_below(real, root)
            if hidden is None:
                return root, where
            refusals.append(hidden)
        if refusals:
            raise ConstraintViolation(
                field, f"{shown} is inside the hidden file or folder {refusals[0]!r}; onthefly does not write "
                       "hidden files (shell start-up files, keys, configuration, repository hooks)"
            )
        raise ConstraintViolation(
            field, f"{shown} is outside the folders onthefly writes to: the session folder, the working "
                   "directory, SessionConfig.allowed_paths, a folder under your home, or the temp folder"
        )

    @staticmethod
    def _check_file(real: Path, field: str, shown: str, where: str, suffixes: Iterable[str] | None) -> None:
        if real.exists():
            if not real.is_file():
                raise ConstraintViolation(field, f"{shown} exists and is not a file")
            if where != "own" and not written_by_this_process(real):
                raise ConstraintViolation(
                    field, f"{shown} exists and was not written by onthefly in this process; refusing to "
                           "overwrite it (choose a new name)"
                )
        if real.parent.exists() and not real.parent.is_dir():
            raise ConstraintViolation(field, f"{shown}: {str(real.parent)!r} is not a folder")
        if suffixes is not None:
            allowed = tuple(s.lower() for s in suffixes)
            if not real.name.lower().endswith(allowed):
                raise ConstraintViolation(
                    field, f"{shown} must end with {' or '.join(allowed)} (the kind of file this command writes)"
                )

    @staticmethod
    def _check_dir(real: Path, field: str, shown: str, where: str) -> None:
        if real.exists() and not real.is_dir():
            raise ConstraintViolation(field, f"{shown} exists and is not a folder")
        if where in ("home", "temp"):
            if real.exists() and any(real.iterdir()) and not written_by_this_process(real):
                raise ConstraintViolation(
                    field, f"{shown} is a folder that is not empty and was not created by onthefly; "
                           "choose a new or empty folder"
                )
            note_written(real)  # claimed: this process may write here again

    def _user_roots(self) -> tuple[Path, ...]:
        home = _home()
        return (Path.cwd().resolve(), *((home,) if home is not None else ()), *self.allowed)


def _home() -> Path | None:
    """The user's home folder, resolved; None when it is unknown or the file-system root."""
    try:
        home = Path(os.path.realpath(Path.home()))
    except (RuntimeError, KeyError):
        return None
    return None if home == home.parent else home


def temp_roots() -> tuple[Path, ...]:
    """The system temp folders (resolved): `tempfile.gettempdir()`, /tmp and /var/tmp."""
    roots = {Path(os.path.realpath(tempfile.gettempdir()))}
    for folder in ("/tmp", "/var/tmp"):
        if os.path.isdir(folder):
            roots.add(Path(os.path.realpath(folder)))
    return tuple(sorted(roots))


def _installation_folders(user_roots: tuple[Path, ...]) -> list[tuple[Path, str]]:
    """Python's installation, its site-packages, and onthefly itself.

    A prefix that contains the working directory or home (a Python installed into ~) is
    narrowed to the folders packages live in, so the user's own files stay writable.
    """
    from . import __file__ as package_init

    folders: list[tuple[Path, str]] = [(Path(os.path.realpath(package_init)).parent, "the onthefly package")]
    getsitepackages = getattr(site, "getsitepackages", lambda: [])  # missing in some old virtualenvs
    packages = [*getsitepackages(), site.getusersitepackages()]
    folders += [(Path(os.path.realpath(p)), "a site-packages folder") for p in packages if p]
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}:
        real = Path(os.path.realpath(prefix))
        if any(_inside(root, real) for root in user_roots):
            for sub in ("bin", "lib", "lib64", "include", "Lib", "Scripts"):
                folders.append((real / sub, "the Python installation"))
        else:
            folders.append((real, "the Python installation"))
    return folders
