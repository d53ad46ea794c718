"""Overhead of onthefly in a 2-rank DDP job: `Trainer.fit` against a plain DDP loop, same job, same run.

    python benchmarks/distributed.py [--runs 9] [--samples 20000] [--sync-every 8] [--slice 8]
                                     [--no-dashboard] [--sequential]

Launches itself under `torchrun --standalone --nproc_per_node 2` (gloo, CPU, one thread per
rank). Each rank trains the same MLP (32-256-256-10, batch 64 per rank, Adam) for one epoch of
its `DistributedSampler` share, once as a plain DDP loop and once as `Trainer.fit` on the same
kind of DDP model, with a loopback dashboard listening on rank 0 (the ranks agree on commands
every `--sync-every` steps). A variant's time is its whole training call as the user sees it
(`fit` and `session.close()`), not the construction of the model and trainer before it.

Method. The VM's speed drifts by 10-30% over seconds, more than the few percent measured here,
so the two variants run *interleaved* (the harness of `benchmarks/overhead.py`): on every rank
each variant trains in its own thread, and the turn passes between them every `--slice` batches.
Both ranks pass the turn at the same batch — a barrier on a process group of its own, not
timed — so the other rank is always training the same variant. The plain loop's DDP all-reduces
on a process group of its own too, so the two variants' collectives never mix. A run's time of
a variant is the mean over the ranks of the time it held the turn; its ratio is Trainer over
plain; the figure is the median over `--runs` runs (with the interquartile range).
`--sequential` instead times whole trainings back to back in ABBA order. Target: <= 1.05x.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset, default_collate

sys.path.insert(0, os.path.dirname(__file__))
from _common import loopback_dashboard  # noqa: E402
from _interleave import Interleaved, Tick, Timer, Variant, quartiles, sequential, settle  # noqa: E402


def make_data(samples: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 32, generator=g)
    return TensorDataset(x, (x[:, :10].argmax(dim=1)))


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def loader_for(data: TensorDataset, tick: Tick) -> DataLoader:
    """The user's DDP loader; the hand-off runs as each batch is put together (a real DataLoader,
    so the Trainer sees the `DistributedSampler` as it would in a user's job)."""
    def collate(items: list[Any]) -> Any:
        tick()
        return default_collate(items)
    return DataLoader(data, batch_size=64, sampler=DistributedSampler(data, shuffle=True, seed=0), collate_fn=collate)


def plain_variant(data: TensorDataset, group: Any, sync: Callable[[], None]) -> Variant:
    def run(tick: Tick, timer: Timer) -> None:
        model = DistributedDataParallel(make_model(), process_group=group)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss_fn = nn.CrossEntropyLoss()
        loader = loader_for(data, tick)
        sync()
        timer.start()
        model.train()
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
        sync()
        timer.stop()
    return run


def onthefly_variant(data: TensorDataset, port: int | None, store: str, sync_every: int,
                     sync: Callable[[], None]) -> Variant:
    import onthefly

    def run(tick: Tick, timer: Timer) -> None:
        model = DistributedDataParallel(make_model())
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        loader = loader_for(data, tick)
        trainer = onthefly.Trainer(max_epochs=1, project="bench-ddp", save_dir=store, dashboard_port=port,
                                   transport="tcp" if port else "off", dist_sync_every_steps=sync_every)
        sync()
        timer.start()
        trainer.fit(model, optimizer, nn.CrossEntropyLoss(), loader)
        trainer.session.close()
        sync()
        timer.stop()
    return run


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    plain_group = dist.new_group(backend="gloo")  # the plain loop's all-reduces
    handoff = dist.new_group(backend="gloo")  # the turn passes on both ranks at the same batch

    def sync() -> None:
        dist.barrier(group=handoff)

    data = make_data(args.samples)
    port = args.port if rank == 0 else None
    with tempfile.TemporaryDirectory() as store:
        variants = {"plain": plain_variant(data, plain_group, sync),
                    "onthefly": onthefly_variant(data, port, store, args.sync_every, sync)}
        measure = sequential if args.sequential else Interleaved(args.slice, on_turn=sync).run
        settle()
        measure(variants)  # warm-up: first-call costs (the control group, imports) hit neither figure
        times: dict[str, list[float]] = {"plain": [], "onthefly": []}
        ratios = []
        for _ in range(args.runs):
            settle()
            spent = measure(variants)
            both = torch.tensor([spent["plain"], spent["onthefly"]], dtype=torch.float64)
            dist.all_reduce(both, group=handoff)
            plain_s, onthefly_s = (both / world).tolist()
            times["plain"].append(plain_s)
            times["onthefly"].append(onthefly_s)
            ratios.append(onthefly_s / plain_s)
    if rank == 0:
        steps = -(-len(data) // world // 64)
        how = "back to back, ABBA" if args.sequential else f"interleaved every {args.slice} batches"
        print(f"2-rank DDP, gloo, {args.samples} samples ({steps} steps of 64 per rank), "
              f"ranks agree every {args.sync_every} steps, {args.runs} runs ({how}), "
              f"{'a loopback dashboard on rank 0' if port else 'no dashboard'}")
        print(f"plain DDP loop    median {statistics.median(times['plain']) * 1000:.1f} ms")
        print(f"Trainer.fit       median {statistics.median(times['onthefly']) * 1000:.1f} ms")
        q1, q2, q3 = quartiles(ratios)
        print(f"ratio Trainer/plain: median {q2:.3f}x (IQR {q1:.3f}-{q3:.3f}, min {min(ratios):.3f}, "
              f"max {max(ratios):.3f}); target <= 1.05x -> {'OK' if q2 <= 1.05 else 'MISSED'}")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--sync-every", type=int, default=8)
    parser.add_argument("--slice", type=int, default=8, help="batches per turn when interleaving (default 8)")
    parser.add_argument("--no-dashboard", action="store_true", help="rank 0 connects to no dashboard")
    parser.add_argument("--sequential", action="store_true", help="whole trainings back to back (ABBA) instead")
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.runs < 1 or args.slice < 1:
        parser.error("--runs and --slice must be >= 1")
    if args.worker:
        worker(args)
        return
    with loopback_dashboard() as port:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   os.path.abspath(__file__), "--worker", *([] if args.no_dashboard else ["--port", str(port)]),
                   "--runs", str(args.runs), "--samples", str(args.samples), "--sync-every", str(args.sync_every),
                   "--slice", str(args.slice), *(["--sequential"] if args.sequential else [])]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        sys.exit(subprocess.run(command, env=env).returncode)


if __name__ == "__main__":
    main()
