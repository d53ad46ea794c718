"""Distributed runs: one session per rank, steered as one.

Under `torch.distributed` every rank builds a session. Rank 0 (the leader) owns the dashboard
connection, the event log and the session folder; the other ranks (followers) open no
connection, write no file, and adopt the leader's session id and folder when training starts.

At a batch boundary the ranks agree only every `dist_sync_every_steps` steps, or at every
boundary while paused (see `ranks.RankGroup.due`). When the leader has commands waiting, every
rank enters the same pause window at that step: the leader broadcasts each command before it
runs it, every follower runs the same command with the same payload, and after each command the
ranks compare outcomes — a command that failed on one rank only stops training with an error
naming it, because the ranks would otherwise drift apart. A `stop` takes effect on every rank at
the next agreement. While paused the leader sends a heartbeat every few seconds, so a follower
waiting for the next command can tell a quiet dashboard from a dead leader.

Files: checkpoints are written by the leader with every rank's RNG and data position; manifests,
exports and bundles by the leader only. Scans shard the samples over the ranks and gather them
(see `scan_shards`). This mixin owns `self.distributed`.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..ranks import (
    RankGroup,
    RankPeerLost,
    launched_as_follower,
    process_group_world,
    whole_split,
)
from ..storage import SessionStorage

#: Runtimes whose multi-process runs are not steered yet (their loops keep state the ranks cannot share).
UNSTEERED_RUNTIMES = frozenset({"hf", "accelerate"})

#: Commands that only write files (rank 0's job): a failure on one rank does not split the ranks' state.
FILE_ONLY_COMMANDS = frozenset({"save_ckpt", "prepare_export", "spill_all", "export_subset", "clean_disk"})


class RanksDiverged(RankPeerLost):
    """A command succeeded on some ranks and failed on others: the ranks no longer hold the same state."""


@dataclass
class DistributedState:
    """What DistributedMixin owns."""

    follower: bool = False  # a rank other than 0 (known from the launcher before the group is up)
    group: RankGroup | None = None  # bound when training starts under an initialised process group
    connected: bool = False  # whether the leader has a dashboard, as the ranks last agreed
    last_sent: float = 0.0  # when the leader last broadcast (heartbeats while paused)
    beat_s: float = 5.0
    root_manifest: dict[str, Any] | None = None  # the leader's manifest of the first run, when training began
    arrived_at: float | None = None  # wall clock when this rank reached the last agreement (dist_health)
    last_wait_s: float = 0.0  # how long it waited there for the leader
    runs_on_disk: list[str] = field(default_factory=list)  # the runs in rank 0's folder when training began


class _Replicator:
    """The gate hooks of the leader's pause window: broadcast each job, then compare outcomes."""

    def __init__(self, session: Any) -> None:
        self.session = session

    def before_job(self, name: str, replica: Any) -> None:
        s = self.session
        if replica is None:
            raise RankPeerLost(f"{name!r} cannot run in a distributed run: it has no description the other "
                               "ranks could run too")
        s.checkpoints.writer.flush(timeout=s.cfg.dist_timeout_s)  # every rank reads what the leader wrote
        s.ranks.broadcast(("job", name, replica), what=f"sending {name!r} to the other ranks")
        s.distributed.last_sent = time.monotonic()

    def after_job(self, name: str, replica: Any, error: BaseException | None) -> None:
        self.session.compare_outcomes(name, error)

    def idle(self) -> None:
        s = self.session
        if time.monotonic() - s.distributed.last_sent >= s.distributed.beat_s:
            s.ranks.broadcast(("beat",), what="the leader's heartbeat")
            s.distributed.last_sent = time.monotonic()


class DistributedMixin:
    """Joins the ranks when training starts and runs the shared pause windows."""

    def _init_distributed(self) -> None:
        self.distributed = DistributedState(follower=launched_as_follower())

    @property
    def ranks(self) -> RankGroup | None:
        """The rank group of a distributed run (None in a single process)."""
        return self.distributed.group

    @property
    def is_follower(self) -> bool:
        """A rank other than 0: no connection, no files, commands come from the leader."""
        return self.distributed.follower

    def dashboard_connected(self) -> bool:
        """Whether a dashboard is attached — as every rank agrees, in a distributed run."""
        if self.distributed.group is not None:
            return self.distributed.connected
        return bool(self.bus.connected)

    # ---- joining -------------------------------------------------------------------------------
    def join_ranks(self) -> None:
        """At the start of training under an initialised process group of 2+ ranks: bind the group once.

        Followers take the leader's session id and folder, which must be visible to them (every
        rank needs the same filesystem for the session folder).
        """
        dist = self.distributed
        if dist.group is not None or process_group_world() < 2:
            return
        cfg = self.cfg
        runtime = self.framework.runtime
        if runtime in UNSTEERED_RUNTIMES:
            raise RuntimeError(f"onthefly does not steer a multi-process {runtime!r} run yet (world size "
                               f"{process_group_world()}): run it in one process, or use onthefly.Trainer, "
                               "onthefly.attach or Lightning for DDP (see docs/distributed.md)")
        group = RankGroup(every=cfg.dist_sync_every_steps, timeout_s=cfg.dist_timeout_s)
        if group.leader == dist.follower:
            raise RuntimeError(f"rank {group.rank}: the launcher's environment (RANK/LOCAL_RANK) said this process "
                               f"is{'' if dist.follower else ' not'} a follower, but the process group says rank "
                               f"{group.rank}; launch with torchrun (or set RANK) so the session knows its rank")
        identity = group.broadcast({"session_id": self.session_id, "folder": str(self.storage.folder),
                                    "connected": bool(self.bus.connected),
                                    "manifest": self.read_manifest(cfg.run_name) if group.leader else None,
                                    "runs": self.storage.run_ids() if group.leader else None},
                                   what="sharing the session folder")
        if not group.leader:
            folder = Path(identity["folder"])
            if not folder.is_dir():
                raise RuntimeError(f"rank {group.rank} cannot see the session folder {folder} that rank 0 created: "
                                   "every rank needs the same filesystem (pass save_dir= a shared path)")
            self.session_id = identity["session_id"]
            self.storage = SessionStorage(folder.parent.parent, folder.parent.name, identity["session_id"],
                                          cfg.allowed_paths)
            self.update_event_context()
        dist.connected = bool(identity["connected"])
        dist.root_manifest = identity["manifest"]
        dist.runs_on_disk = list(identity["runs"])
        dist.beat_s = max(0.5, min(5.0, cfg.dist_timeout_s / 4))
        dist.last_sent = time.monotonic()
        dist.group = group
        self.telemetry.samples_scale = group.world  # throughput counts the samples of every rank
        self.fail_on_sigterm(group)
        if group.leader:
            self.log(f"distributed run: {group.world} ranks; rank 0 owns the dashboard, the others follow "
                     f"(ranks agree every {group.every} steps)")

    def fail_on_sigterm(self, group: RankGroup) -> None:
        """torchrun ends the surviving ranks with SIGTERM when one rank dies: turn that into an error
        on the training thread, so this rank reports `trainingFinished` (failed, with its rank) and
        flushes its events before it exits. Only when nobody else handles SIGTERM."""
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return

        def terminated(signum: int, frame: Any) -> None:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
            raise RankPeerLost(f"rank {group.rank} of {group.world} received SIGTERM: its launcher is ending the "
                               "job (torchrun does so when another rank fails)")

        signal.signal(signal.SIGTERM, terminated)

    # ---- the shared boundary -------------------------------------------------------------------
    def rank_boundary(self) -> None:
        """A batch boundary of a distributed run: agree (when due), then share the pause window."""
        group, gate = self.distributed.group, self.gate
        if not group.due(self.state.step, gate.paused):
            return  # the leader's commands wait for the next agreement
        if group.leader:
            flags = [int(gate.queued > 0 or gate.paused), *self.ending_flags()]
        else:
            flags = [0, 0, 0, 0]
        dist = self.distributed
        dist.arrived_at = time.time()
        pending, *ending = group.agree(flags)
        dist.last_wait_s = time.time() - dist.arrived_at
        self.adopt_ending(*ending)
        if pending:
            if group.leader:
                self.lead_window()
            else:
                self.follow_window()
        if not group.leader:
            gate.run_pending()  # nothing queues here; this clears the local pending flag

    def ending_flags(self) -> list[int]:
        life = self.lifecycle
        return [int(life.stop_requested), int(life.finish_requested is not None), int(self.bus.connected)]

    def adopt_ending(self, stop: int, finish: int, connected: int) -> None:
        """Every rank takes the leader's decision to stop or finish (and its dashboard's presence)."""
        self.distributed.connected = bool(connected)
        if stop:
            self.lifecycle.stop_requested = True
            self.state.running = False
        if finish and self.lifecycle.finish_requested is None:
            self.lifecycle.finish_requested = "rank 0 ended training"

    def lead_window(self) -> None:
        """The leader's pause window: run the queued commands (and, paused, those that come) on every rank."""
        gate = self.gate
        self.report_unreported_steps()
        gate.hooks = _Replicator(self)
        try:
            gate.service(keep_going=lambda: self.state.running and not self.lifecycle.stop_requested)
        finally:
            gate.hooks = None
        ending = self.ending_flags()
        self.ranks.broadcast(("end", ending), what="closing the pause window")
        self.adopt_ending(*ending)

    def follow_window(self) -> None:
        """A follower's pause window: run what the leader runs, in its order, until it closes the window."""
        group = self.distributed.group
        while True:
            message = group.broadcast(what="waiting for rank 0's next command")
            if message[0] == "beat":
                continue
            if message[0] == "end":
                self.adopt_ending(*message[1])
                return
            _, name, (cmd, payload, origin) = message
            error: BaseException | None = None
            try:
                spec = self.router.spec(cmd)
                with self.job_context(cmd):
                    self.execute_as(origin, spec, payload)
            except Exception as exc:
                error = exc
            self.compare_outcomes(name, error)

    def compare_outcomes(self, name: str, error: BaseException | None) -> None:
        """After a command ran on every rank: all succeeded or all failed, else stop with the difference."""
        group = self.distributed.group
        mine = None if error is None else f"{type(error).__name__}: {error}"
        outcomes = group.all_gather(mine, what=f"comparing the outcome of {name!r}")
        failed = [rank for rank, outcome in enumerate(outcomes) if outcome is not None]
        if failed and len(failed) < group.world and name not in FILE_ONLY_COMMANDS:
            details = "; ".join(f"rank {r}: {outcomes[r]}" for r in failed)
            raise RanksDiverged(f"{name!r} failed on rank(s) {failed} but not on the others ({details}); "
                                "training stops so the ranks do not drift apart")

    # ---- helpers for the other concerns ----------------------------------------------------------
    def rank_fields(self) -> dict[str, Any]:
        """`rank` / `world_size` for events of a distributed run (empty in a single process)."""
        group = self.distributed.group
        return {} if group is None else {"rank": group.rank, "world_size": group.world}

    def sharded_scan(self, scan: Callable[[Any], Any], source: Any, indices: Any) -> Any:
        """Run a per-sample `scan(indices)` with each rank scoring every `world`-th sample, gathered.

        Every sample is scored exactly once (a `DistributedSampler`'s padding is not scanned: the
        samples come from the dataset, not the sampler), and every rank receives the whole result
        in the order a single process would produce.
        """
        from ..data_explorer import PerSampleResult, dataset_indices_of

        group = self.distributed.group
        if indices is None:
            indices = dataset_indices_of(whole_split(source))
        indices = np.asarray(indices, dtype=np.int64)
        with scan(group.shard(indices)) as result:
            losses, idx = result.to_numpy()
            mine = (np.array(losses, dtype=np.float32), np.array(idx, dtype=np.int64), dict(result.meta))
        shards = group.all_gather(mine, what="gathering a per-sample scan")
        losses = np.asarray(group.interleave([s[0] for s in shards]), dtype=np.float32)
        idx = np.asarray(group.interleave([s[1] for s in shards]), dtype=np.int64)
        meta = {**shards[0][2], "samples": len(losses), "ranks": group.world,
                "elapsed_s": max(float(s[2].get("elapsed_s") or 0.0) for s in shards)}
        return PerSampleResult(losses, idx, meta)
