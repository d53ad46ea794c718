"""The checkpoint file format: atomic save, safe (weights-only) load, the writer thread, the ring folder.

Nothing here knows about sessions. A checkpoint is one `torch.save` of a dict
`{"format": FORMAT, "version": FORMAT_VERSION, "meta": {...}, **payload}` written through a
temp file and `os.replace`, so a kill at any moment leaves the file complete or absent. Loading
uses `torch.load(weights_only=True)` and nothing else: a file that needs full unpickling is
refused with a `CheckpointError`, never retried unsafely. RNG capture and restore live in
`onthefly.rng`, host snapshots in `onthefly.snapshot` (both re-exported here for existing imports).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import pickle
import queue
import re
import threading
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointRing",
    "CheckpointWriter",
    "capture_rng_state",
    "find_unloadable_value",
    "fsync_directory",
    "is_lightning_checkpoint",
    "load_checkpoint",
    "pid_is_alive",
    "read_meta",
    "restore_rng_state",
    "save_checkpoint",
    "snapshot_to_host",
    "step_from_filename",
    "write_atomically",
]

from .fileio import DiskFullError, atomic_write, fsync_directory  # noqa: F401  (fsync_directory is re-exported)
from .rng import capture_rng_state, restore_rng_state  # noqa: F401  (re-exported: older imports use them)
from .snapshot import snapshot_to_host  # noqa: F401  (re-exported likewise)

log = logging.getLogger(__name__)

FORMAT = "onthefly.checkpoint"
FORMAT_VERSION = 1

RESERVED_KEYS = frozenset({"format", "version", "meta"})
STEP_FILE_RE = re.compile(r"^step-(\d+)\.pt$")
# `.<name>.tmp-<pid>-<hex>`: hidden, never matches STEP_FILE_RE, carries its writer's pid.
TEMP_FILE_RE = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]+$")
ANSI_ESCAPE_RE = re.compile(r"\x1b\[[0-9;]*m")


class CheckpointError(Exception):
    """A checkpoint could not be written or read; names the file and what is wrong.

    Preferred form: `CheckpointError(path, problem)`. A single argument is taken as a complete
    message that already names the file (`path` is then None).
    """

    def __init__(self, path: str | os.PathLike[str], problem: str | None = None) -> None:
        if problem is None:
            self.path: Path | None = None
            self.problem = str(path)
            super().__init__(self.problem)
            return
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"checkpoint {self.path}: {problem}")


# --------------------------------------------------------------------------------------------
# The weights-only check
# --------------------------------------------------------------------------------------------

SAFE_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
SAFE_LEAVES = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    bytearray,
    torch.Size,
    torch.dtype,
    torch.device,
)


def find_unloadable_value(obj: Any, where: str = "payload") -> str | None:
    """Return a description of the first value `torch.load(weights_only=True)` would refuse.

    Checked before writing so a checkpoint that could never be loaded safely is rejected at save
    time with the key that holds the offending value, instead of failing at resume time.
    """
    allowed_extra: tuple[type, ...] = tuple(
        item for item in _safe_globals() if isinstance(item, type)
    )
    stack: list[tuple[str, Any]] = [(where, obj)]
    while stack:
        label, value = stack.pop()
        kind = type(value)
        if kind in SAFE_TENSOR_TYPES or kind in SAFE_LEAVES or kind in allowed_extra:
            continue
        if kind in (dict, collections.OrderedDict):
            for key, item in value.items():
                if type(key) not in SAFE_LEAVES:
                    return f"a key of {label} is a {_qualname(key)}"
                stack.append((f"{label}[{key!r}]", item))
            continue
        if kind in (list, tuple, set):
            stack.extend((f"{label}[{index}]", item) for index, item in enumerate(value))
            continue
        return f"{label} is a {_qualname(value)}"
    return None


def _safe_globals() -> list[Any]:
    getter = getattr(torch.serialization, "get_safe_globals", None)
    return list(getter()) if getter is not None else []


def _qualname(value: Any) -> str:
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


# --------------------------------------------------------------------------------------------
# Atomic save
# --------------------------------------------------------------------------------------------


def write_atomically(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """`fileio.atomic_write`, with failures raised as `CheckpointError` naming `path`.

    A full disk reads "no space left on device while writing <path> (<free> free on <mount>)",
    whatever torch made of the ENOSPC underneath.
    """
    target = Path(path)
    try:
        return atomic_write(target, write)
    except CheckpointError:
        raise
    except DiskFullError as exc:
        error = CheckpointError(str(exc))
        error.path = target
        raise error from exc
    except Exception as exc:
        problem = "cannot create its folder" if not target.parent.is_dir() else "could not be written"
        raise CheckpointError(target, f"{problem} ({type(exc).__name__}: {exc})") from exc


def save_checkpoint(
    path: str | os.PathLike[str],
    payload: Mapping[str, Any],
    *,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Atomically write `{"format", "version", "meta", **payload}` to `path`; return the path.

    Creates parent folders. Rejects payloads that `torch.load(weights_only=True)` could not read
    back (numpy arrays, custom classes, ...) before touching the disk.
    """
    target = Path(path)
    if not isinstance(payload, Mapping):
        raise CheckpointError(target, f"payload must be a dict, got {type(payload).__name__}")
    clash = sorted(RESERVED_KEYS & set(payload))
    if clash:
        raise CheckpointError(
            target, f"payload uses reserved key(s) {clash}; pass metadata through meta="
        )
    if meta is not None and not isinstance(meta, Mapping):
        raise CheckpointError(target, f"meta must be a dict, got {type(meta).__name__}")
    document: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "meta": dict(meta or {}),
        **payload,
    }
    problem = find_unloadable_value(document, "checkpoint")
    if problem is not None:
        raise CheckpointError(
            target,
            f"{problem}, which torch.load(weights_only=True) refuses; store tensors and plain "
            "Python values (dict, list, tuple, str, int, float, bool, None) only",
        )
    return write_atomically(target, lambda handle: torch.save(document, handle))


# --------------------------------------------------------------------------------------------
# Safe load
# --------------------------------------------------------------------------------------------


def load_checkpoint(
    path: str | os.PathLike[str], *, map_location: Any = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint with `torch.load(weights_only=True)` and check it is one we can use.

    Returns the onthefly document, or a Lightning `.ckpt` dict as-is with `"format": "lightning"`
    added so callers can adapt it. Anything else raises `CheckpointError` naming the file.
    """
    source = Path(path)
    return _check_document(source, _load_weights_only(source, map_location, mmap=False))


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return a checkpoint's `meta` dict plus its `step`, memory-mapping tensors instead of reading them."""
    source = Path(path)
    document = _check_document(source, _load_weights_only(source, "cpu", mmap=True))
    if document["format"] == "lightning":
        meta: dict[str, Any] = {"format": "lightning"}
        step = document.get("global_step")
        if "epoch" in document:
            meta["epoch"] = document["epoch"]
    else:
        meta = dict(document["meta"])
        step = document.get("step")
    if step is not None and "step" not in meta:
        meta["step"] = step
    return meta


def _load_weights_only(source: Path, map_location: Any, *, mmap: bool) -> Any:
    if not source.exists():
        raise CheckpointError(source, "no such file")
    if not source.is_file():
        raise CheckpointError(source, "is not a regular file")
    if source.stat().st_size == 0:
        raise CheckpointError(source, "is empty (0 bytes)")
    # mmap works only for the zip format; other files are read normally (and most are refused).
    use_mmap = mmap and zipfile.is_zipfile(source)
    try:
        return torch.load(source, map_location=map_location, weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as exc:
        detail = _weights_only_detail(str(exc))
        refused = _refused_global(detail)
        if refused is not None:
            raise CheckpointError(source, _refusal_message(refused)) from exc
        raise CheckpointError(source, f"is corrupt or not a torch checkpoint ({detail})") from exc
    except Exception as exc:  # noqa: BLE001 - a damaged file surfaces as many types; all re-raised
        raise CheckpointError(
            source,
            f"is unreadable, truncated or corrupt ({type(exc).__name__}: {_first_line(str(exc))})",
        ) from exc


_GLOBAL_RE = re.compile(r"(?:GLOBAL|class)\s+([A-Za-z_][\w.]*[\w])")


def _refused_global(detail: str) -> str | None:
    """`global <module.name>` a weights-only refusal names, or None when `detail` is no refusal."""
    lowered = detail.lower()
    if "unsupported global" not in lowered and "unsupported class" not in lowered and "is blocked" not in lowered:
        return None
    match = _GLOBAL_RE.search(detail)
    return f"global {match.group(1)}" if match else "a global it does not allow"


# Modules whose globals in a pickle mean code execution, not data: never suggest allowing them.
_DANGEROUS_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "builtins", "__builtin__", "sys", "shutil", "importlib",
    "runpy", "pickle", "socket", "ctypes", "pty", "code", "codeop", "marshal", "webbrowser",
    "multiprocessing", "threading", "types", "functools", "operator", "io", "pathlib", "tempfile",
})


def _refusal_message(refused: str) -> str:
    name = refused.removeprefix("global ")
    module = name.split(".", 1)[0]
    why = (
        "onthefly only loads checkpoints with torch.load(weights_only=True), which allows tensors "
        "and plain Python values"
    )
    if module in _DANGEROUS_MODULES or "." not in name:
        return (
            f"holds objects onthefly will not unpickle ({refused}, which would run code when "
            f"loaded: treat the file as malicious); {why}"
        )
    return (
        f"holds objects onthefly will not unpickle ({refused}); {why}. If you wrote this file "
        f"and trust the class, register it with torch.serialization.add_safe_globals([{name}]) "
        "before loading"
    )


def _weights_only_detail(message: str) -> str:
    """torch's refusal without its advice: never pass on "re-run with weights_only=False"."""
    text = ANSI_ESCAPE_RE.sub("", message)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    else:
        # torch's preamble about the default change ends with this sentence; the detail follows.
        text = text.split("trusted source.", 1)[-1]
    text = text.split("Check the documentation of torch.load", 1)[0]
    return " ".join(text.split()) or "no detail"


def _first_line(text: str) -> str:
    stripped = text.strip()
    return stripped.splitlines()[0] if stripped else "no detail"


def is_lightning_checkpoint(document: Mapping[str, Any]) -> bool:
    """True for a dict shaped like a Lightning `.ckpt` (state_dict plus version or global_step)."""
    return "state_dict" in document and (
        "pytorch-lightning_version" in document or "global_step" in document
    )


def _check_document(source: Path, document: Any) -> dict[str, Any]:
    if not isinstance(document, dict):
        raise CheckpointError(
            source, f"expected a dict at the top level, got {type(document).__name__}"
        )
    if "format" not in document:
        if is_lightning_checkpoint(document):
            document["format"] = "lightning"
            return document
        keys = sorted(str(key) for key in document)
        shown = ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "")
        raise CheckpointError(
            source, f"is not an onthefly checkpoint: no 'format' key (top-level keys: {shown})"
        )
    found = document["format"]
    if found != FORMAT:
        raise CheckpointError(source, f"has foreign format {found!r}, expected {FORMAT!r}")
    version = document.get("version")
    if type(version) is not int or version < 1:
        raise CheckpointError(source, f"has an invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            source,
            f"uses format version {version}, newer than this onthefly reads "
            f"({FORMAT_VERSION}); upgrade onthefly",
        )
    if not isinstance(document.get("meta"), dict):
        raise CheckpointError(
            source, f"'meta' must be a dict, got {type(document.get('meta')).__name__}"
        )
    return document


# --------------------------------------------------------------------------------------------
# Background writer
# --------------------------------------------------------------------------------------------


@dataclass
class WriteJob:
    """One queued checkpoint write."""

    path: Path
    payload: Mapping[str, Any]
    meta: Mapping[str, Any] | None
    future: concurrent.futures.Future[Path]


class CheckpointWriter:
    """Writes checkpoints on a background thread so the training thread never waits on disk.

    Hand it a host snapshot (`snapshot_to_host`) and do not mutate that snapshot afterwards.
    Writes happen in submission order. A failed write sets its Future's exception (a
    `CheckpointError` naming the file) and the thread carries on with the next one.
    """

    THREAD_NAME = "onthefly-ckpt-writer"

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[WriteJob | None] = queue.SimpleQueue()
        self._state = threading.Condition()
        self._pending = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=self.THREAD_NAME, daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Writes submitted and not yet finished (including their done-callbacks)."""
        with self._state:
            return self._pending

    @property
    def closed(self) -> bool:
        """True once `close()` was called; `submit` then refuses new writes."""
        with self._state:
            return self._closed

    def submit(
        self,
        path: str | os.PathLike[str],
        payload: Mapping[str, Any],
        *,
        meta: Mapping[str, Any] | None = None,
    ) -> concurrent.futures.Future[Path]:
        """Queue a write and return at once; the Future resolves to the written path."""
        target = Path(path)
        future: concurrent.futures.Future[Path] = concurrent.futures.Future()
        with self._state:
            if self._closed:
                raise RuntimeError(f"CheckpointWriter is closed; cannot write {target}")
            self._pending += 1
            self._jobs.put(WriteJob(target, payload, meta, future))
        return future

    def flush(self, timeout: float | None = None) -> None:
        """Block until every submitted write has finished; TimeoutError if `timeout` runs out."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("CheckpointWriter.flush() called from the writer thread would deadlock")
        with self._state:
            if not self._state.wait_for(lambda: self._pending == 0, timeout):
                raise TimeoutError(
                    f"{self._pending} checkpoint write(s) still pending after {timeout} s"
                )

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued writes, then stop the thread; TimeoutError if it takes too long."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("CheckpointWriter.close() called from the writer thread would deadlock")
        with self._state:
            if not self._closed:
                self._closed = True
                self._jobs.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(
                f"checkpoint writer still busy after {timeout} s ({self.pending} write(s) pending)"
            )

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._write(job)
            finally:
                del job
                with self._state:
                    self._pending -= 1
                    self._state.notify_all()

    @staticmethod
    def _write(job: WriteJob) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            written = save_checkpoint(job.path, job.payload, meta=job.meta)
        except CheckpointError as exc:
            log.error("background checkpoint write failed: %s", exc)
            job.future.set_exception(exc)
        except Exception as exc:  # noqa: BLE001 - the thread must survive; the Future reports it
            error = CheckpointError(job.path, f"write failed ({type(exc).__name__}: {exc})")
            error.__cause__ = exc
            log.error("background checkpoint write failed: %s", error)
            job.future.set_exception(error)
        else:
            job.future.set_result(written)


# --------------------------------------------------------------------------------------------
# The ring folder
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint file found in a ring folder."""

    path: Path
    step: int
    size: int
    created: float


def step_from_filename(name: str) -> int | None:
    """The step of a ring file name (`step-00000120.pt` → 120), or None for any other name."""
    match = STEP_FILE_RE.match(name)
    return int(match.group(1)) if match else None


def pid_is_alive(pid: int) -> bool:
    """True when a process with this id exists (on Windows: only for this process itself)."""
    if pid == os.getpid():
        return True
    if os.name != "posix":
        # os.kill(pid, 0) would terminate the process on Windows; assume other writers are gone.
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CheckpointRing:
    """A run's checkpoint folder of `step-<N>.pt` files, keeping only the newest `keep` steps."""

    def __init__(self, directory: str | os.PathLike[str], keep: int = 10) -> None:
        if type(keep) is not int or keep < 1:
            raise ValueError(f"keep must be an int >= 1, got {keep!r}")
        self.directory = Path(directory)
        self.keep = keep
        self._lock = threading.Lock()

    def path_for(self, step: int) -> Path:
        """Where the checkpoint of `step` lives: `<dir>/step-<8 digits>.pt`."""
        if type(step) is not int or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        return self.directory / f"step-{step:08d}.pt"

    def register(self, path: str | os.PathLike[str]) -> list[Path]:
        """Record a completed write: delete the lowest steps beyond `keep`, return what was removed.

        The file just registered is never removed, even when older-numbered steps exist (for
        example after rewinding); the others are pruned lowest step first.
        """
        written = Path(path)
        if step_from_filename(written.name) is None:
            raise ValueError(f"{written} is not a ring checkpoint name (expected step-<N>.pt)")
        if written.parent.resolve() != self.directory.resolve():
            raise ValueError(f"{written} is not inside the ring folder {self.directory}")
        if not written.is_file():
            raise ValueError(f"{written} does not exist; register a checkpoint after writing it")
        removed: list[Path] = []
        with self._lock:
            others = [info for info in self.list() if info.path.name != written.name]
            excess = len(others) + 1 - self.keep
            for info in others[: max(excess, 0)]:
                try:
                    info.path.unlink()
                except FileNotFoundError:
                    continue
                removed.append(info.path)
        return removed

    def list(self) -> list[CheckpointInfo]:
        """Every `step-<N>.pt` in the folder (temp files ignored), sorted by step."""
        infos: list[CheckpointInfo] = []
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return []
        for entry in entries:
            step = step_from_filename(entry.name)
            if step is None:
                continue
            try:
                status = entry.stat()
            except FileNotFoundError:
                continue  # pruned between the scan and the stat
            infos.append(
                CheckpointInfo(
                    path=Path(entry.path), step=step, size=status.st_size, created=status.st_mtime
                )
            )
        infos.sort(key=lambda info: info.step)
        return infos

    def latest(self) -> CheckpointInfo | None:
        """The checkpoint with the highest step, or None when the folder has none."""
        infos = self.list()
        return infos[-1] if infos else None

    def clean_temp_files(self) -> int:
        """Remove temp files left by writers that died mid-write; return how many were removed.

        Temp files of a live process (this one included) are kept: a write may be in flight.
        """
        removed = 0
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return 0
        for entry in entries:
            match = TEMP_FILE_RE.match(entry.name)
            if match is None or pid_is_alive(int(match.group(1))):
                continue
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed += 1
        return removed
