"""The checkpoint file format: atomic save, safe (weights-only) load, RNG state, the ring folder.

Nothing here knows about sessions. A checkpoint is one `torch.save` of a dict
`{"format": FORMAT, "version": FORMAT_VERSION, "meta": {...}, **payload}` written through a
temp file and `os.replace`, so a kill at any moment leaves the file complete or absent. Loading
uses `torch.load(weights_only=True)` and nothing else: a file that needs full unpickling is
refused with a `CheckpointError`, never retried unsafely.
"""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import logging
import os
import pickle
import queue
import random
import re
import threading
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
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

from .fileio import atomic_write, fsync_directory  # noqa: F401  (fsync_directory is re-exported)

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
# RNG state
# --------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Return python, numpy, torch and CUDA RNG states in a form `weights_only` loading accepts.

    numpy's legacy state tuple holds a uint32 array and Python's holds a tuple of ints; both are
    turned into plain ints, lists and int64 tensors so the checkpoint needs no unsafe pickling.
    """
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    cuda_states: list[torch.Tensor] = []
    if torch.cuda.is_available():
        cuda_states = [state.clone() for state in torch.cuda.get_rng_state_all()]
    return {
        "python": {"version": int(py_version), "state": list(py_internal), "gauss": py_gauss},
        "numpy": {
            "bit_generator": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64).copy()),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": cuda_states,
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Set python, numpy, torch (and CUDA when present) RNGs from `capture_rng_state()` output."""
    if not isinstance(state, Mapping):
        raise TypeError(f"RNG state must be a dict, got {type(state).__name__}")
    missing = [key for key in ("python", "numpy", "torch") if key not in state]
    if missing:
        raise ValueError(f"RNG state is missing {missing}; expected keys python, numpy, torch, cuda")
    unknown = sorted(set(state) - {"python", "numpy", "torch", "cuda"})
    if unknown:
        raise ValueError(f"RNG state has unknown keys {unknown}; expected python, numpy, torch, cuda")

    py_state = _python_rng_tuple(state["python"])
    np_state = _numpy_rng_tuple(state["numpy"])
    torch_state = state["torch"]
    if not isinstance(torch_state, torch.Tensor) or torch_state.dtype != torch.uint8:
        raise ValueError(f"RNG state 'torch' must be a uint8 tensor, got {_describe(torch_state)}")
    cuda_states = state.get("cuda", [])
    if not isinstance(cuda_states, (list, tuple)) or not all(
        isinstance(s, torch.Tensor) and s.dtype == torch.uint8 for s in cuda_states
    ):
        raise ValueError("RNG state 'cuda' must be a list of uint8 tensors")

    random.setstate(py_state)
    np.random.set_state(np_state)
    torch.set_rng_state(torch_state.detach().cpu())
    _restore_cuda_rng(list(cuda_states))


def _python_rng_tuple(value: Any) -> tuple[Any, ...]:
    if not isinstance(value, Mapping) or not {"version", "state", "gauss"} <= set(value):
        raise ValueError("RNG state 'python' must be a dict with keys version, state, gauss")
    internal = value["state"]
    if not isinstance(internal, (list, tuple)) or not all(isinstance(v, int) for v in internal):
        raise ValueError("RNG state 'python.state' must be a list of ints")
    return (int(value["version"]), tuple(internal), value["gauss"])


def _numpy_rng_tuple(value: Any) -> tuple[Any, ...]:
    needed = {"bit_generator", "keys", "pos", "has_gauss", "cached_gaussian"}
    if not isinstance(value, Mapping) or not needed <= set(value):
        raise ValueError(f"RNG state 'numpy' must be a dict with keys {sorted(needed)}")
    keys = value["keys"]
    if not isinstance(keys, torch.Tensor) or keys.dim() != 1:
        raise ValueError(f"RNG state 'numpy.keys' must be a 1-d tensor, got {_describe(keys)}")
    return (
        str(value["bit_generator"]),
        keys.detach().cpu().numpy().astype(np.uint32),
        int(value["pos"]),
        int(value["has_gauss"]),
        float(value["cached_gaussian"]),
    )


def _restore_cuda_rng(states: list[torch.Tensor]) -> None:
    if not states:
        return
    if not torch.cuda.is_available():
        log.warning(
            "checkpoint carries CUDA RNG state for %d device(s) but CUDA is not available here; "
            "CUDA randomness is not restored",
            len(states),
        )
        return
    count = torch.cuda.device_count()
    if count != len(states):
        log.warning(
            "checkpoint carries CUDA RNG state for %d device(s), this process sees %d; "
            "restoring the first %d",
            len(states),
            count,
            min(count, len(states)),
        )
    for index, cuda_state in enumerate(states[:count]):
        torch.cuda.set_rng_state(cuda_state.detach().cpu(), index)


# --------------------------------------------------------------------------------------------
# Host snapshots and the weights-only check
# --------------------------------------------------------------------------------------------

IMMUTABLE_LEAVES = (
    type(None), bool, int, float, complex, str, bytes, torch.Size, torch.dtype, torch.device
)


_IMMUTABLE_TYPES = frozenset(IMMUTABLE_LEAVES)


def snapshot_to_host(obj: Any) -> Any:
    """Deep-copy a nested dict/list/tuple structure with every tensor detached, cloned, on CPU.

    The copy is independent of the originals, so training may keep mutating them while a writer
    thread serialises the copy. CUDA tensors are copied with `non_blocking=True` and the devices
    involved are synchronised once at the end, not once per tensor.
    """
    cuda_devices: set[int] = set()
    memo: dict[int, torch.Tensor] = {}
    result = _snapshot(obj, cuda_devices, memo)
    for index in sorted(cuda_devices):
        torch.cuda.synchronize(index)
    return result


def _snapshot(obj: Any, cuda_devices: set[int], memo: dict[int, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        # The same tensor object seen twice (tied entries) stays one tensor in the copy.
        cached = memo.get(id(obj))
        if cached is not None:
            return cached
        source = obj.detach()
        if source.device.type == "cpu":
            copied = source.clone()
        elif source.device.type == "cuda":
            copied = source.to("cpu", non_blocking=True)
            cuda_devices.add(source.device.index if source.device.index is not None else 0)
        else:
            copied = source.to("cpu")
        memo[id(obj)] = copied
        return copied
    if isinstance(obj, IMMUTABLE_LEAVES):
        return obj
    if type(obj) is dict:
        return {key: _snapshot(value, cuda_devices, memo) for key, value in obj.items()}
    if isinstance(obj, dict):
        # OrderedDict, defaultdict, ...: keep the type and its extra state (default_factory).
        duplicate = copy.copy(obj)
        for key, value in obj.items():
            duplicate[key] = _snapshot(value, cuda_devices, memo)
        return duplicate
    if type(obj) is list:
        return [_snapshot(value, cuda_devices, memo) for value in obj]
    if type(obj) is tuple:
        if all(type(value) in _IMMUTABLE_TYPES for value in obj):
            return obj  # e.g. Python's RNG state: 625 ints
        return tuple(_snapshot(value, cuda_devices, memo) for value in obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_snapshot(value, cuda_devices, memo) for value in obj))
    return copy.deepcopy(obj)


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
    """`fileio.atomic_write`, with failures raised as `CheckpointError` naming `path`."""
    target = Path(path)
    try:
        return atomic_write(target, write)
    except CheckpointError:
        raise
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
        if "Unsupported global" in detail:
            raise CheckpointError(
                source,
                "torch.load(weights_only=True) refused it because it stores objects that need "
                f"full unpickling ({detail}). onthefly never loads checkpoints unsafely; if you "
                "trust this file, allowlist the classes with torch.serialization.add_safe_globals",
            ) from exc
        raise CheckpointError(source, f"is corrupt or not a torch checkpoint ({detail})") from exc
    except Exception as exc:  # noqa: BLE001 - a damaged file surfaces as many types; all re-raised
        raise CheckpointError(
            source,
            f"is unreadable, truncated or corrupt ({type(exc).__name__}: {_first_line(str(exc))})",
        ) from exc


def _weights_only_detail(message: str) -> str:
    text = ANSI_ESCAPE_RE.sub("", message)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
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
