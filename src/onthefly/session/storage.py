"""Where a session keeps its files, and the rule that wire paths stay inside allowed folders."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from ..fileio import atomic_write
from ..control.errors import ErrorCode, ProtocolError

MARKER = "session.json"
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_component(name: str, fallback: str = "run") -> str:
    """A file-system-safe version of a run or project name (no separators, no dots at the ends)."""
    cleaned = _SAFE.sub("-", str(name)).strip("-_.")
    if not cleaned:
        return fallback
    return cleaned[:120]


def write_json_atomic(path: Path, data: dict[str, Any] | str) -> None:
    """Write JSON atomically (temp file, fsync, rename), so readers never see half a file."""
    text = data if isinstance(data, str) else json.dumps(data, indent=2, default=str)
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def default_root() -> Path:
    return Path(os.environ.get("ONTHEFLY_HOME") or ".onthefly")


class SessionStorage:
    """The session folder `<root>/<project>/<session_id>/` and the paths inside it."""

    def __init__(self, root: str | os.PathLike | None, project: str, session_id: str,
                 allowed: tuple[str, ...] = ()) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.project_dir = (self.root / safe_component(project, "default")).resolve()
        self.folder = self.project_dir / session_id
        self.session_id = session_id
        self.allowed = tuple(Path(p).resolve() for p in allowed)

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
        return self.folder / "runs" / safe_component(run_id)

    def checkpoint_dir(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "checkpoints"

    def run_ids(self) -> list[str]:
        runs = self.folder / "runs"
        if not runs.is_dir():
            return []
        return sorted(p.name for p in runs.iterdir() if p.is_dir())

    def other_sessions(self) -> list[Path]:
        """Earlier session folders of this project that this library created (they carry the marker)."""
        if not self.project_dir.is_dir():
            return []
        return sorted(
            p for p in self.project_dir.iterdir()
            if p.is_dir() and p.resolve() != self.folder.resolve() and (p / MARKER).is_file()
        )

    def resolve_wire_path(self, value: str, *, field: str, must_exist: bool = False) -> Path:
        """Resolve a path received on the wire; it must lie in the session folder, the cwd, or an allowed root."""
        if not isinstance(value, str) or not value.strip():
            raise ProtocolError(ErrorCode.BAD_PAYLOAD, f"payload.{field}: expected a non-empty path")
        if "\x00" in value:
            raise ProtocolError(ErrorCode.BAD_PAYLOAD, f"payload.{field}: path contains a NUL byte")
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = Path.cwd() / path
        path = path.resolve()
        roots = (self.folder.resolve(), self.project_dir, Path.cwd().resolve(), *self.allowed)
        if not any(path == root or root in path.parents for root in roots):
            raise ProtocolError(
                ErrorCode.BAD_PAYLOAD,
                f"payload.{field}: {value!r} is outside the allowed folders "
                f"(the session folder, the working directory, or SessionConfig.allowed_paths)",
            )
        if must_exist and not path.exists():
            raise ProtocolError(ErrorCode.NOT_FOUND, f"payload.{field}: no such file {str(path)!r}")
        return path
