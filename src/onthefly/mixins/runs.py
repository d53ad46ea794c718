"""Run identity: names, manifests (`run.json`), transitions between runs, switching runs.

Commands: `list_runs`, `set_counter_seeds`, `switch_run`, `attach_context`. Fork and merge build
on `start_new_run`; see docs/runs.md.
"""

from __future__ import annotations

import json
import os
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Optional

from ..control.constraints import Range, SafeName
from ..control.errors import CommandError, ErrorCode
from ..control.names import check_safe_name
from ..fileio import atomic_write
from .command import command


@dataclass
class RunsState:
    """What RunsMixin owns."""

    initial_name: str
    counters: dict[str, int]
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Manifest files are written (with fsync) off the training thread, in order; readers use the
    # in-memory copy, so they never wait for the disk either.
    io: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="onthefly-io"))
    io_pending: Future | None = None
    generation: int = 0  # bumped on every switch of the current run (stamped as run_gen)


@dataclass
class NoPayload:
    """No payload fields (extra keys are ignored)."""


Counter = Annotated[int, Range(ge=0, le=10**9)]


@dataclass
class CounterSeeds:
    fork_counter_init: Counter = 0
    merge_counter_init: Counter = 0


@dataclass
class SwitchRun:
    run_id: Optional[Annotated[str, SafeName]] = field(default=None, metadata={"aliases": ("runId",)})
    fork_counter_init: Optional[Counter] = None
    merge_counter_init: Optional[Counter] = None
    init_ckpt: Optional[str] = field(default=None, metadata={"aliases": ("ckpt",)})
    init_step: Optional[Annotated[int, Range(ge=0)]] = None


def write_manifest(path: Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


class RunsMixin:
    """Owns `self.runs` (a `RunsState`)."""

    def _init_runs(self) -> None:
        self.runs = RunsState(
            initial_name=self.cfg.run_name,
            counters={"fork": env_int("ONTHEFLY_FORK_COUNTER_INIT"), "merge": env_int("ONTHEFLY_MERGE_COUNTER_INIT")},
        )

    @property
    def run_gen(self) -> int:
        return self.runs.generation

    @property
    def counters(self) -> dict[str, int]:
        return self.runs.counters

    # ---- manifests ---------------------------------------------------------------------------
    def store_manifest(self, run_id: str, manifest: dict[str, Any]) -> None:
        """Keep `manifest` as the run's current one and write `run.json` in the background."""
        runs = self.runs
        runs.manifests[run_id] = manifest
        if self.is_follower:
            return  # rank 0 writes the run's manifest; the other ranks keep the same one in memory
        text = json.dumps(manifest, indent=2, default=str)
        runs.io_pending = runs.io.submit(write_manifest, self.manifest_path(run_id), text)

    def flush_manifests(self, timeout: float | None = 60.0) -> None:
        """Wait until every manifest handed to `store_manifest` is on disk (raises a write error)."""
        pending = self.runs.io_pending
        if pending is not None:
            pending.result(timeout)

    def close_runs(self) -> None:
        runs = self.runs
        runs.io.shutdown(wait=True)
        if runs.io_pending is not None and runs.io_pending.exception() is not None:
            self.log(f"could not write a run manifest: {runs.io_pending.exception()}", level="error")

    def manifest_path(self, run_id: str) -> Path:
        return self.storage.run_dir(run_id) / "run.json"

    def read_manifest(self, run_id: str) -> dict[str, Any] | None:
        manifest = self.runs.manifests.get(run_id)
        if manifest is not None:
            return manifest
        path = self.manifest_path(run_id)
        if path.is_file():
            with open(path, encoding="utf-8") as fh:
                return json.load(fh)
        return None

    def update_run_manifest(self, run_id: str | None = None, **changes: Any) -> None:
        run_id = run_id or self.cfg.run_name
        manifest = self.read_manifest(run_id)
        if manifest is None:
            return
        manifest = {**manifest, **changes, "updated": time.time()}
        self.store_manifest(run_id, manifest)

    def new_manifest(self, run_id: str, parents: list[str], meta: dict[str, Any],
                     hparams: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "run_id": run_id, "display_name": run_id, "project": self.cfg.project, "session_id": self.session_id,
            "parents": list(parents), "kind": meta.get("kind", "root"), "meta": meta, "hparams": hparams or {},
            "status": "running", "created": time.time(),
        }

    # ---- names -------------------------------------------------------------------------------
    def known_runs(self) -> list[str]:
        """Every run of the session: those made here, and those in its folder.

        In a distributed run the folder is read as rank 0 saw it when training began: rank 0
        writes run folders in the background, and a rank that saw one a moment earlier than
        another would name the next fork differently.
        """
        on_disk = self.distributed.runs_on_disk if self.ranks is not None else self.storage.run_ids()
        return sorted(set(self.runs.manifests) | set(on_disk))

    def unique_run_name(self, wanted: str, *, dedupe: bool = True) -> str:
        """`wanted` (a safe name), with `-2`, `-3`, ... appended while it is taken."""
        base = check_safe_name(wanted, "run_name")
        if not dedupe:
            return base
        taken = set(self.known_runs())
        if base not in taken:
            return base
        n = 2
        while f"{base}-{n}" in taken:
            n += 1
        return f"{base}-{n}"

    def next_run_name(self, kind: str) -> str:
        """`fork<N>` / `merge<N>`: the counter (seeded from the dashboard or env) never reuses a name."""
        taken = set(self.known_runs())
        pattern = re.compile(rf"^{kind}(\d+)$")
        highest = max((int(m.group(1)) for r in taken if (m := pattern.match(r))), default=0)
        n = max(self.runs.counters.get(kind, 0), highest) + 1
        self.runs.counters[kind] = n
        return f"{kind}{n}"

    def child_name(self, requested: str | None, kind: str) -> str:
        """The name of a new fork/merge run: the requested one (must be free) or the next counter."""
        if requested is None:
            return self.next_run_name(kind)
        name = check_safe_name(requested, "run_name")
        if name in self.known_runs() or name == self.cfg.run_name:
            raise CommandError(f"a run named {name!r} exists already; choose another name", ErrorCode.BAD_PAYLOAD)
        return name

    # ---- runs and their transitions ----------------------------------------------------------
    def emit_new_run(self, run_id: str, *, parents: list[str], meta: dict[str, Any],
                     hparams: dict[str, Any] | None = None) -> None:
        """Record a run (`run.json`) and announce it with `newRun`."""
        self.store_manifest(run_id, self.new_manifest(run_id, parents, meta, hparams))
        self.emit("newRun", **self.new_run_fields(run_id, parents, meta))

    def new_run_fields(self, run_id: str, parents: list[str], meta: dict[str, Any]) -> dict[str, Any]:
        return {"run_id": run_id, "parents": list(parents),
                "meta": {**meta, "display_name": run_id, "run_gen": self.run_gen},
                "project": self.cfg.project, "run_name": run_id}

    def make_current(self, run_id: str) -> None:
        """Make `run_id` the run events are stamped with (a new run generation)."""
        self.runs.generation += 1
        self.cfg.run_name = run_id
        self.update_event_context()
        self.checkpoints.last_saved = None

    def start_new_run(self, run_id: str, *, parents: list[str], meta: dict[str, Any],
                      hparams: dict[str, Any] | None = None, transition: bool = True,
                      announce: bool = True) -> None:
        """Switch the session to a new run: close the old one, re-stamp events, record the new one."""
        previous, prev_step = self.cfg.run_name, self.state.step
        if transition:
            self.emit("runTransition", **{"from": previous, "to": run_id, "prev_step": prev_step})
            self.emit("finalizeRun", run_id=previous, next_run=run_id, last_step=prev_step)
        self.update_run_manifest(previous, status="finished" if transition else "reset", last_step=prev_step)
        self.make_current(run_id)
        if announce:
            self.emit_new_run(run_id, parents=parents, meta=meta, hparams=hparams)
        else:
            self.store_manifest(run_id, self.new_manifest(run_id, parents, meta, hparams))

    def run_subset_indices(self, run_id: str) -> list[int] | None:
        """The training subset a run trains on (None: the whole training set)."""
        if run_id == self.cfg.run_name:
            return self.active_subset
        return self.manifest_subset(run_id)

    def manifest_subset(self, run_id: str) -> list[int] | None:
        subset = (self.read_manifest(run_id) or {}).get("subset_indices")
        return list(subset) if subset is not None else None

    def announcements(self) -> list[dict[str, Any]]:
        """`session_started` and a `newRun` for every run, parents first: what a fresh dashboard needs.

        Sent (by the bus, on its sender thread) at the start of every dashboard connection after
        the first: a dashboard that wiped its state rebuilds the run list from them. Before any
        event reached a dashboard the replay from the first event carries the originals instead.
        """
        if not self.lifecycle.started or self.bus.sent_seq < 1:
            return []
        out: list[dict[str, Any]] = [{"type": "session_started", "project": self.cfg.project,
                                      "run_name": self.runs.initial_name, "announced": True}]
        manifests = {r: self.read_manifest(r) or {} for r in self.known_runs()}
        for run_id in sorted(manifests, key=lambda r: manifests[r].get("created", 0.0)):
            manifest = manifests[run_id]
            meta = manifest.get("meta") or {"kind": manifest.get("kind", "root")}
            out.append({"type": "newRun", **self.new_run_fields(run_id, manifest.get("parents") or [], meta),
                        "announced": True})
        return out

    # ---- commands ----------------------------------------------------------------------------
    @command("list_runs", NoPayload, mutating=False,
             description="runs with parents, kind, status and latest checkpoint")
    def cmd_list_runs(self, p: NoPayload) -> dict[str, Any]:
        runs = []
        for run_id in self.known_runs():
            manifest = self.read_manifest(run_id) or {"run_id": run_id, "parents": [], "kind": "unknown"}
            latest = self.ring(run_id).latest()
            runs.append({
                "run_id": run_id,
                "parents": manifest.get("parents", []),
                "kind": manifest.get("kind"),
                "status": manifest.get("status"),
                "current": run_id == self.cfg.run_name,
                "at_step": (manifest.get("meta") or {}).get("at_step"),
                "latest_checkpoint": str(latest.path) if latest else None,
                "latest_step": latest.step if latest else None,
            })
        return {"runs": runs, "current": self.cfg.run_name}

    @command("set_counter_seeds", CounterSeeds, mutating=False, description="seed the fork/merge name counters")
    def cmd_set_counter_seeds(self, p: CounterSeeds) -> dict[str, Any]:
        counters = self.runs.counters
        counters["fork"] = max(counters.get("fork", 0), p.fork_counter_init)
        counters["merge"] = max(counters.get("merge", 0), p.merge_counter_init)
        self.log(f"[runs] counters seeded: fork={counters['fork']} merge={counters['merge']}")
        return {"ok": True, "fork_counter_seed": counters["fork"], "merge_counter_seed": counters["merge"]}

    @command("switch_run", SwitchRun, mutating=True,
             description="make another run current (loads its checkpoint and its subset)")
    def cmd_switch_run(self, p: SwitchRun) -> dict[str, Any]:
        if not p.run_id:
            raise CommandError("payload.run_id: required", ErrorCode.BAD_PAYLOAD)
        return self.bind_to_run(p)

    @command("attach_context", SwitchRun, mutating=True, description="bind the session to a run the dashboard knows")
    def cmd_attach_context(self, p: SwitchRun) -> dict[str, Any]:
        return self.bind_to_run(p)

    def bind_to_run(self, p: SwitchRun) -> dict[str, Any]:
        """Make `run_id` current, load its checkpoint (given, else its latest) and its subset.

        While a loop trains, the run is paused first (the dashboard resumes it); between trainings
        nothing is held, so the next `train()` continues the run at once.
        """
        run_id = p.run_id or self.cfg.run_name
        ckpt = None
        if p.init_ckpt:
            ckpt = self.wire_checkpoint(p.init_ckpt, "payload.init_ckpt")
        elif run_id != self.cfg.run_name and run_id not in self.known_runs():
            raise CommandError(f"unknown run {run_id!r} and no init_ckpt given", ErrorCode.NOT_FOUND)
        if self.state.training:
            self.console.pause({"action": "switch_run", "run_id": run_id}, checkpoint=run_id != self.cfg.run_name)
        if p.fork_counter_init is not None or p.merge_counter_init is not None:
            self.cmd_set_counter_seeds(CounterSeeds(p.fork_counter_init or 0, p.merge_counter_init or 0))
        ckpt = self.adopt_run(run_id, ckpt, init_step=p.init_step)
        counters = self.runs.counters
        return {"ok": True, "run_id": run_id, "paused": self.gate.paused, "ckpt_loaded": ckpt is not None,
                "ckpt_path": str(ckpt) if ckpt else None, "step": self.state.step,
                "fork_counter_seed": counters["fork"], "merge_counter_seed": counters["merge"]}

    def adopt_run(self, run_id: str, ckpt: Path | None = None, *, init_step: int | None = None) -> Path | None:
        """Make `run_id` the current run and load `ckpt` (default: its latest, when switching runs)."""
        if run_id != self.cfg.run_name:
            self.save_checkpoint_now()
            if ckpt is None:
                latest = self.ring(run_id).latest() if run_id in self.known_runs() else None
                ckpt = latest.path if latest else None
            self.update_run_manifest(self.cfg.run_name, last_step=self.state.step)
            self.make_current(run_id)
            if self.read_manifest(run_id) is None:
                self.store_manifest(run_id, self.new_manifest(run_id, [], {"kind": "attached"}, None))
            self.rebind_train_loader(self.manifest_subset(run_id))
        if ckpt is not None:
            self.load_checkpoint_into_state(ckpt)
            self.emit("checkpoint_loaded", path=str(ckpt), step=self.state.step)
        if init_step is not None:
            self.state.step = int(init_step)
        self.request_reposition()
        self.log(f"[runs] bound to run {run_id!r}" + (f" from {ckpt}" if ckpt else ""))
        return ckpt


def env_int(name: str) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return 0
    try:
        return max(0, int(raw))
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None
