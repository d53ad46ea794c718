"""`dist_health`: the distributed setup and this rank's parameter hashes."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from torch import nn

from ...control.constraints import Range
from ..command import command
from .common import evenly_spaced, health_model, health_text, in_health_window

WEIGHT_SAMPLE_ELEMENTS = 1024


@dataclass
class DistHealth:
    require_all_ranks: bool = False
    sample_weights: Annotated[int, Range(ge=0, le=100_000)] = 0


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor's values (any dtype), for hashing."""
    flat = t.detach().reshape(-1).contiguous().cpu()
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def metadata_hash(model: nn.Module) -> str:
    """sha256 over `P|name|shape|dtype` and `B|name|shape|dtype` records, names sorted."""
    h = hashlib.sha256()
    for tag, named in (("P", model.named_parameters()), ("B", model.named_buffers())):
        for name, t in sorted(named, key=lambda kv: kv[0]):
            h.update(f"{tag}|{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
    return h.hexdigest()


def sampled_weights_hash(model: nn.Module, k: int) -> tuple[str, list[str]]:
    """sha256 over up to 1024 evenly spaced values of `k` trainable parameters (by sorted name)."""
    named = sorted(((n, p) for n, p in model.named_parameters() if p.requires_grad), key=lambda kv: kv[0])
    chosen = evenly_spaced(named, k)
    h = hashlib.sha256()
    for name, p in chosen:
        flat = p.detach().reshape(-1)
        m = min(WEIGHT_SAMPLE_ELEMENTS, flat.numel())
        if m == 0:
            picked = flat
        elif m == 1:
            picked = flat[:1]
        else:
            idx = torch.arange(m, device=flat.device) * (flat.numel() - 1) // (m - 1)
            picked = flat[idx]
        h.update(name.encode() + b"\0" + tensor_bytes(picked))
    return h.hexdigest(), [name for name, _ in chosen]


def is_fsdp(model: nn.Module) -> bool:
    """Whether any module is a fully sharded wrapper (FSDP1 or FSDP2), by class name."""
    for m in model.modules():
        name = type(m).__name__.lower()
        if "fullysharded" in name or "fsdp" in name:
            return True
    return False


def dist_report(session: Any, model: nn.Module, p: DistHealth) -> dict[str, Any]:
    import torch.distributed as dist

    fsdp = is_fsdp(model)
    if not (dist.is_available() and dist.is_initialized()):
        notes = ["torch.distributed not initialized; skipping parity checks"]
        return {"is_distributed": False, "distributed": False, "fsdp": fsdp, "backend": None,
                "world_size": 1, "rank": 0, "ok": True, "notes": notes,
                "text": health_text(session, "Distributed health", ["not distributed"] + notes)}
    backend = str(dist.get_backend())
    world, rank = dist.get_world_size(), dist.get_rank()
    local_rank = os.environ.get("LOCAL_RANK")
    meta_hash = metadata_hash(model)
    if session.ranks is not None:
        return ranks_report(session, model, p, fsdp, backend, meta_hash)
    notes = [
        "cross-rank parity needs every rank's session to answer: this command reached one rank, "
        "so no collective was issued (it would wait forever for ranks that were not asked); "
        "compare metadata_hash (and weights_hash) across the ranks' replies",
    ]
    weights_hash, sampled = None, []
    if p.sample_weights > 0:
        if fsdp:
            notes.append("FSDP shards parameters across ranks: a weight hash would differ by design; skipped")
        else:
            weights_hash, sampled = sampled_weights_hash(model, p.sample_weights)
    if p.require_all_ranks:
        notes.append(f"require_all_ranks: only rank {rank} of {world} answered this request")
    if world == 1:
        notes.append("world_size is 1: there is no other rank to compare with")
    lines = [f"backend={backend} world_size={world} rank={rank}"
             + (f" local_rank={local_rank}" if local_rank is not None else "") + f" fsdp={fsdp}",
             f"metadata_hash={meta_hash[:16]}"]
    if weights_hash is not None:
        lines.append(f"weights_hash={weights_hash[:16]} over {len(sampled)} parameter(s)")
    return {
        "is_distributed": True, "distributed": True, "fsdp": fsdp, "backend": backend,
        "world_size": world, "rank": rank, "local_rank": int(local_rank) if local_rank is not None else None,
        "ok": None, "metadata_hash": meta_hash,
        "params": sum(1 for _ in model.parameters()), "buffers": sum(1 for _ in model.buffers()),
        "weights_hash": weights_hash, "sampled_weights": sampled, "notes": notes,
        "text": health_text(session, "Distributed health", lines + notes),
    }


def ranks_report(session: Any, model: nn.Module, p: DistHealth, fsdp: bool, backend: str,
                 meta_hash: str) -> dict[str, Any]:
    """Every rank's figures, gathered (the command runs on every rank of a session's distributed run)."""
    group = session.ranks
    weights_hash, sampled = (None, []) if fsdp else sampled_weights_hash(model, max(p.sample_weights, 8))
    mine = {"rank": group.rank, "local_rank": os.environ.get("LOCAL_RANK"), "pid": os.getpid(),
            "step": int(session.state.step), "epoch": int(session.state.epoch),
            "metadata_hash": meta_hash, "weights_hash": weights_hash,
            "last_agreement_wait_ms": round(session.distributed.last_wait_s * 1000, 3),
            "arrived_at": session.distributed.arrived_at, "agreements": group.agreements}
    ranks = group.all_gather(mine, what="gathering dist_health")
    timing = group.timed_all_reduce(numel=1 << 18)
    steps = [r["step"] for r in ranks]
    arrivals = [r["arrived_at"] for r in ranks if r["arrived_at"] is not None]
    same_meta = len({r["metadata_hash"] for r in ranks}) == 1
    same_weights = fsdp or len({r["weights_hash"] for r in ranks}) == 1
    skew = max(steps) - min(steps)
    notes = []
    if not same_meta:
        notes.append("the ranks' models differ in structure (metadata_hash)")
    if not same_weights:
        notes.append("the ranks' weights differ (weights_hash): they are no longer in sync")
    if fsdp:
        notes.append("FSDP shards parameters across ranks: weights are not compared")
    arrival_ms = round((max(arrivals) - min(arrivals)) * 1000, 3) if len(arrivals) == len(ranks) else None
    ok = same_meta and same_weights and skew == 0
    lines = [f"backend={backend} world_size={group.world} fsdp={fsdp}",
             f"step_skew={skew} arrival_skew_ms={arrival_ms} all_reduce_ms={timing['median_s'] * 1000:.3f} "
             f"(1 MiB, median of 5)", f"metadata parity={same_meta} weights parity={same_weights}"]
    lines += [f"rank {r['rank']}: step {r['step']} waited {r['last_agreement_wait_ms']} ms at the last agreement"
              for r in ranks]
    return {
        "is_distributed": True, "distributed": True, "fsdp": fsdp, "backend": backend, "world_size": group.world,
        "rank": group.rank, "ok": ok, "metadata_hash": meta_hash, "weights_hash": weights_hash,
        "sampled_weights": sampled, "params": sum(1 for _ in model.parameters()),
        "buffers": sum(1 for _ in model.buffers()), "ranks": ranks, "step_skew": skew,
        "arrival_skew_ms": arrival_ms, "all_reduce_ms": round(timing["median_s"] * 1000, 4),
        "all_reduce_min_ms": round(timing["min_s"] * 1000, 4), "all_reduce_numel": int(timing["numel"]),
        "sync_every_steps": group.every, "notes": notes,
        "text": health_text(session, "Distributed health", lines + notes),
    }


class DistHealthMixin:
    @command("dist_health", DistHealth, mutating=True,
             description="distributed setup and this rank's parameter metadata hash")
    def cmd_dist_health(self, p: DistHealth) -> dict[str, Any]:
        model = health_model(self)
        return in_health_window(self, "dist_health", lambda: dist_report(self, model, p))
