"""The ranks of a `torch.distributed` job, and the few collectives a session uses to steer them as one.

Under `torchrun` every rank builds its own session. Rank 0, the *leader*, owns the dashboard
connection, the event log and the session folder; the other ranks (*followers*) open no
connection and write no checkpoint. The ranks stay in step without a per-step collective:

- they *agree* at a batch boundary only every `every` steps, or at every boundary while paused
  (the paused flag is the same on every rank: only commands and deterministic triggers set it),
  with one broadcast of a few integers from the leader;
- when the leader has commands waiting, every rank enters the same pause window at that step
  and runs the same commands in the same order (the leader broadcasts each before it runs);
- all of this travels on a separate gloo group with a timeout, so a rank that dies or hangs
  makes the others fail with `RankPeerLost` naming the rank, never hang forever.

This module knows torch and `torch.distributed`, nothing of sessions or the wire.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch

#: Steps between two agreements when no rank is paused (a command waits at most this many steps).
DEFAULT_SYNC_EVERY = 8
#: Seconds a rank waits in one of the session's collectives before it gives its peer up for lost.
DEFAULT_TIMEOUT_S = 120.0


#: The control group made for a process group (and timeout), reused by later sessions of the process.
_CONTROL_GROUPS: dict[tuple[int, float], Any] = {}


class RankPeerLost(RuntimeError):
    """A collective of the session failed: a peer rank died, hung past the timeout, or left."""


def launched_as_follower() -> bool:
    """Whether this process is a rank other than 0 of a distributed job (known before the group is up).

    The process group, when already up, knows best; otherwise `torchrun` sets `RANK`, and
    Lightning's own DDP launcher sets `LOCAL_RANK` / `NODE_RANK` for the processes it starts.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()) != 0
    rank = os.environ.get("RANK", "").strip()
    if rank.isdigit():
        return int(rank) != 0
    for name in ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) != 0:
            return True
    return False


def process_group_world() -> int:
    """The size of the initialised default process group (1 when there is none)."""
    return rank_and_world()[1]


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group; (0, 1) when there is none."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    return 0, 1


def unwrap_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a `DistributedDataParallel` / `DataParallel` wrapper (others as they are).

    Checkpoints, scans and copies use the inner module: its state dict has no `module.` prefix,
    so a checkpoint of a 2-rank run loads into a 1-rank run, and copying it copies no process group.
    """
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


def rank_position(document: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """The (data position, RNG state) this process resumes a checkpoint `document` with: its own
    rank's, when a job of as many ranks wrote it (`document["ranks"]`); otherwise the document's own."""
    rank, world = rank_and_world()
    ranks = document.get("ranks")
    if isinstance(ranks, dict) and ranks.get("world") == world and world > 1:
        mine = ranks["states"][rank]
        return mine.get("data") or {}, mine.get("rng")
    return document.get("data") or {}, document.get("rng")


def whole_split(source: Any) -> Any:
    """What a split of a distributed job holds: the dataset behind a loader whose `DistributedSampler`
    hands this rank its share only (every rank's samples, no padding); any other source as it is."""
    from torch.utils.data import DataLoader, DistributedSampler

    if isinstance(source, DataLoader) and isinstance(source.sampler, DistributedSampler):
        return source.dataset
    return source


class RankGroup:
    """This rank's place in the job and the session's collectives on a gloo group of its own.

    Every method is a collective: all ranks call it, in the same order, on their training threads.
    """

    def __init__(self, *, every: int = DEFAULT_SYNC_EVERY, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("RankGroup needs an initialised torch.distributed process group")
        if type(every) is not int or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        self.dist = dist
        self.rank = int(dist.get_rank())
        self.world = int(dist.get_world_size())
        self.every = every
        self.timeout_s = float(timeout_s)
        self.agreements = 0  # how many agreements ran (diagnostics)
        key = (id(dist.distributed_c10d._get_default_group()), self.timeout_s)
        group = _CONTROL_GROUPS.get(key)
        if group is None:
            try:
                # Control messages travel on gloo whatever the training backend is (NCCL included): they
                # are tiny, live on the CPU, and must not queue behind the model's all-reduces.
                group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout_s))
            except Exception as exc:
                raise self.lost("creating the session's control group", exc) from exc
            _CONTROL_GROUPS[key] = group  # every rank makes its sessions in the same order: reuse it
        self.group = group

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def due(self, step: int, paused: bool) -> bool:
        """Whether the ranks agree at this boundary: every `every` steps, and at each boundary while paused.

        Both inputs are the same on every rank, so every rank decides alike without talking.
        """
        return paused or step % self.every == 0

    def lost(self, what: str, exc: BaseException) -> RankPeerLost:
        return RankPeerLost(
            f"rank {self.rank} of {self.world}: {what} failed — another rank died, hung for more than "
            f"{self.timeout_s:g} s, or left the job ({type(exc).__name__}: {exc})")

    # ---- collectives --------------------------------------------------------------------------
    def agree(self, values: list[int]) -> list[int]:
        """The leader's `values` on every rank (one broadcast of a small int64 tensor)."""
        tensor = torch.tensor(values, dtype=torch.int64)
        try:
            self.dist.broadcast(tensor, src=0, group=self.group)
        except Exception as exc:
            raise self.lost("agreeing on the next batch boundary", exc) from exc
        self.agreements += 1
        return [int(v) for v in tensor.tolist()]

    def broadcast(self, obj: Any = None, what: str = "a broadcast from rank 0") -> Any:
        """The leader's `obj` (any picklable object) on every rank; followers pass nothing."""
        box = [obj if self.leader else None]
        try:
            self.dist.broadcast_object_list(box, src=0, group=self.group)
        except Exception as exc:
            raise self.lost(what, exc) from exc
        return box[0]

    def all_gather(self, obj: Any, what: str = "gathering from every rank") -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        out: list[Any] = [None] * self.world
        try:
            self.dist.all_gather_object(out, obj, group=self.group)
        except Exception as exc:
            raise self.lost(what, exc) from exc
        return out

    def barrier(self, what: str = "waiting for every rank") -> None:
        try:
            self.dist.barrier(group=self.group)
        except Exception as exc:
            raise self.lost(what, exc) from exc

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Make every rank's parameters and buffers bit-equal to the leader's (e.g. after a merge)."""
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                host = tensor.detach().to("cpu", copy=True).contiguous()
                try:
                    self.dist.broadcast(host, src=0, group=self.group)
                except Exception as exc:
                    raise self.lost("sending the leader's weights", exc) from exc
                tensor.copy_(host.to(tensor.device))

    def timed_all_reduce(self, numel: int = 1 << 20, repeats: int = 5) -> dict[str, float]:
        """Seconds one all-reduce of `numel` float32 takes on the default group (min/median of `repeats`)."""
        import time

        dist = self.dist
        device = torch.device("cpu")
        if dist.get_backend() == "nccl" and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        tensor = torch.ones(numel, dtype=torch.float32, device=device)
        times: list[float] = []
        try:
            for _ in range(repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                dist.all_reduce(tensor)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
        except Exception as exc:
            raise self.lost("timing an all-reduce", exc) from exc
        times.sort()
        return {"min_s": times[0], "median_s": times[len(times) // 2], "numel": float(numel)}

    def shard(self, items: Any) -> Any:
        """This rank's share of `items` (every `world`-th item from this rank's offset)."""
        return items[self.rank::self.world]

    def interleave(self, shards: list[Any]) -> list[Any]:
        """Undo `shard`: the items of every rank's share back in their original order."""
        total = sum(len(s) for s in shards)
        out: list[Any] = [None] * total
        for rank, part in enumerate(shards):
            out[rank::self.world] = list(part)
        return out
