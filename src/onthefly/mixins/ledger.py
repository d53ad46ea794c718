"""The edit ledger: every mutating command a run received — who, when, where, what, with what result.

Each mutating command's handler is wrapped once, where the session registers it
(`ledgered`), so nothing can change a run without an entry. An entry records the command and
its validated payload, its origin (`wire`, `python`, `autopilot`, `replay`), the time, the
run and the exact position it ran at (`step`, `epoch`, `batch_in_epoch`, and whether it ran at
a batch boundary or inline from Python), and the result or error. Entries are appended to the
run's manifest (`runs/<run>/run.json`, key `ledger`) and emitted as `ledger_entry` events
(stamped with the run current when it is emitted; `ledger_run` is the run the entry belongs to,
which differs for the fork or merge that switched runs).

The manifest also records how the run was launched (`launch`: the command line, working folder,
interpreter and a few environment variables) and, when training ends, its final state
(`final`: status, step and a SHA-256 of the weights), which is what `onthefly replay` needs to
re-run the script and check that it reproduced the run bit-exactly (see `replay.py`).

Each entry says how a replay treats it (`replay`): `edit` (re-applied at the same position),
`neutral` (changes nothing training computes: pauses, checkpoints, tests, reports, probes),
`moves` (switches or rewinds the run: a replay refuses a ledger with one), `unknown`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from .._version import __version__
from ..control.errors import CommandError, ErrorCode, ProtocolError
from ..control.jsonsafe import to_jsonable

REPLAY_KINDS: dict[str, str] = {
    **dict.fromkeys(("set_hparams", "layer_op", "set_data_weights", "drop_samples", "restore_samples",
                     "rollback"), "edit"),
    **dict.fromkeys(("pause", "resume", "save_ckpt", "test_now", "test", "generate_report", "export_subset",
                     "propose_subsets", "prepare_export", "spill_all", "clean_disk", "activations_health",
                     "throughput_health", "numerics_health", "dist_health", "determinism_health"), "neutral"),
    **dict.fromkeys(("fork", "merge", "reset_session", "switch_run", "attach_context", "load_ckpt"), "moves"),
}
#: Environment variables a replay sets as the original run had them (they can change results).
RECORDED_ENV = ("PYTHONHASHSEED", "CUBLAS_WORKSPACE_CONFIG", "PYTHONPATH", "CUDA_VISIBLE_DEVICES",
                "OMP_NUM_THREADS", "ONTHEFLY_HOME", "ONTHEFLY_TRANSPORT", "ONTHEFLY_DASHBOARD_PORT")
#: Lists longer than this are shown by their length in an entry's `result` (payloads are kept whole).
RESULT_LIST_LIMIT = 32


def replay_kind(cmd: str) -> str:
    """How a replay treats command `cmd`: `edit`, `neutral`, `moves` or `unknown`."""
    return REPLAY_KINDS.get(cmd, "unknown")


def summarize(value: Any, depth: int = 0) -> Any:
    """A compact JSON form of a command's result for the ledger (long lists become their length)."""
    if isinstance(value, Future):
        return {"deferred": True}
    if isinstance(value, dict):
        return {str(k): summarize(v, depth + 1) for k, v in value.items()} if depth < 4 else "{...}"
    if isinstance(value, (list, tuple)):
        if len(value) > RESULT_LIST_LIMIT:
            return {"items": len(value)}
        return [summarize(v, depth + 1) for v in value]
    return to_jsonable(value)


def payload_record(payload: Any) -> Any:
    """A validated payload as JSON (dataclass fields by name), so a replay can send it again."""
    extra = None
    if dataclasses.is_dataclass(payload) and not isinstance(payload, type):
        extra = next((f.name for f in dataclasses.fields(payload) if f.metadata.get("extra_keys")), None)
        payload = dataclasses.asdict(payload)
    record = to_jsonable(payload)
    if extra is not None and isinstance(record, dict) and isinstance(record.get(extra), dict):
        record.update(record.pop(extra))  # the extra keys travel as the keys they were sent as
    return record


def launch_record() -> dict[str, Any]:
    """How this process was started: what `onthefly replay` runs again."""
    argv = list(getattr(sys, "orig_argv", sys.argv))
    return {
        "argv": [sys.executable, *argv[1:]] if argv else [sys.executable],
        "cwd": os.getcwd(),
        "env": {name: os.environ[name] for name in RECORDED_ENV if name in os.environ},
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "onthefly": __version__,
        "pid": os.getpid(),
    }


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every state-dict entry (name, dtype, shape, bytes): equal iff bit-identical."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        if not isinstance(tensor, torch.Tensor):
            digest.update(repr(tensor).encode())
            continue
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{data.dtype}{tuple(data.shape)}".encode())
        if data.numel():
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class LedgerState:
    """What LedgerMixin owns."""

    seq: int = 0
    entries: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # run id -> its entries
    origin: str = "wire"  # who sends the command running now (set around Python/internal calls)
    note: dict[str, Any] = field(default_factory=dict)  # extra fields for the next entries (e.g. `rule`)
    in_boundary: bool = False  # commands run now are at a batch boundary (not inline from Python)
    lock: threading.Lock = field(default_factory=threading.Lock)


class LedgerMixin:
    """Owns `self.ledger` (a `LedgerState`)."""

    def _init_ledger(self) -> None:
        self.ledger = LedgerState()

    # ---- recording -----------------------------------------------------------------------------
    def ledgered(self, name: str, handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """`handler` with every call recorded in the ledger (used for each mutating command)."""

        def run(payload: Any) -> Any:
            entry = self.open_entry(name, payload)
            try:
                self.refuse_during_replay(name)
                result = handler(payload)
            except BaseException as exc:
                self.close_entry(entry, error=exc)
                raise
            self.close_entry(entry, result=result)
            return result

        run.__name__ = getattr(handler, "__name__", name)
        run.__doc__ = handler.__doc__
        return run

    def refuse_during_replay(self, name: str) -> None:
        """A replay takes its edits from its plan: the same edit sent again would be applied twice."""
        if self.replaying and self.ledger.origin in ("wire", "python") and replay_kind(name) != "neutral":
            raise CommandError(f"{name}: run {self.cfg.run_name!r} is a replay; it applies the edits of its plan "
                               "and takes no others (pauses, checkpoints, tests and reports are fine)",
                               ErrorCode.FAILED)

    def open_entry(self, name: str, payload: Any) -> dict[str, Any]:
        st, ledger = self.state, self.ledger
        with ledger.lock:
            ledger.seq += 1
            seq = ledger.seq
        return {
            "seq": seq, "cmd": name, "origin": ledger.origin, "ts": time.time(), "run_id": self.cfg.run_name,
            "step": int(st.step), "epoch": int(st.epoch), "batch_in_epoch": int(st.batch_in_epoch),
            "at": "boundary" if ledger.in_boundary else "inline", "training": bool(st.training),
            "replay": replay_kind(name), "payload": payload_record(payload), **ledger.note,
        }

    def close_entry(self, entry: dict[str, Any], *, result: Any = None, error: BaseException | None = None) -> None:
        """Finish `entry`, append it to its run's manifest and emit it as a `ledger_entry` event."""
        entry["ok"] = error is None
        if error is None:
            entry["result"] = summarize(result)
        else:
            entry["error"] = error.message if isinstance(error, ProtocolError) else f"{type(error).__name__}: {error}"
            entry["code"] = error.code if isinstance(error, ProtocolError) else "failed"
        entry["duration_s"] = round(time.time() - entry["ts"], 6)
        run_id = entry["run_id"]
        entries = self.ledger.entries.setdefault(run_id, list((self.read_manifest(run_id) or {}).get("ledger") or []))
        entries.append(entry)
        self.update_run_manifest(run_id, ledger=list(entries))
        # Stamped with the run current now (dashboards follow `run_id`); the entry's own run is `ledger_run`.
        self.emit("ledger_entry", **{k: v for k, v in entry.items() if k != "run_id"}, ledger_run=run_id)

    def execute_as(self, origin: str, spec: Any, payload: Any, **note: Any) -> Any:
        """Run a validated command as if `origin` had sent it (the ledger records who)."""
        ledger = self.ledger
        previous, previous_note = ledger.origin, ledger.note
        ledger.origin, ledger.note = origin, note
        try:
            return self.router.execute(spec, payload)
        finally:
            ledger.origin, ledger.note = previous, previous_note

    def ledger_of(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """The ledger of a run (default: the current one), oldest entry first."""
        run_id = run_id or self.cfg.run_name
        if run_id in self.ledger.entries:
            return list(self.ledger.entries[run_id])
        return list((self.read_manifest(run_id) or {}).get("ledger") or [])

    @contextlib.contextmanager
    def command_boundary(self) -> Iterator[bool]:
        """Around the commands a batch boundary runs; yields whether the gate has anything to run.

        A replay applies the edits it has due here first (see `replay.py`).
        """
        self.ledger.in_boundary = True
        try:
            yield self.replay_at_boundary()
        finally:
            self.ledger.in_boundary = False
            self.rearm_replay()

    # ---- the run's record ----------------------------------------------------------------------
    def open_root_run(self, run_id: str) -> None:
        """Record and announce the session's first run, with how it was launched (and, for a replay, its source)."""
        parents, meta = self.replay_lineage()
        self.emit_new_run(run_id, parents=parents, meta=meta)
        self.update_run_manifest(run_id, launch=launch_record(), ledger=list(self.ledger.entries.get(run_id, [])))

    def record_final_state(self, status: str) -> None:
        """At the end of a training: the run's final step and weights digest, in its manifest."""
        final: dict[str, Any] = {"status": status, "step": int(self.state.step), "epoch": int(self.state.epoch)}
        if self.model is not None:
            started = time.perf_counter()
            final["weights_sha256"] = weights_digest(self.model)
            final["digest_s"] = round(time.perf_counter() - started, 4)
        self.update_run_manifest(final=final)
        self.finish_replay(final)
