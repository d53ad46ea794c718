"""Overhead of onthefly in a 2-rank DDP job: `Trainer.fit` against a plain DDP loop, same job, same run.

    python benchmarks/distributed.py [--runs 7] [--samples 20000] [--sync-every 8]

Launches itself under `torchrun --standalone --nproc_per_node 2` (gloo, CPU, one thread per
rank). Each rank trains the same MLP (32-256-256-10, batch 64 per rank, Adam) for one epoch of
its `DistributedSampler` share, alternately as a plain DDP loop and as `Trainer.fit` on the same
kind of DDP model, with a loopback dashboard listening on rank 0 (the ranks agree on commands
every `--sync-every` steps). The order is ABBA per pair of runs, so a drifting machine speed
weighs on both sides alike; a run's ratio is Trainer time over plain time, and the figure is the
median over `--runs` pairs (with min and max). Target: <= 1.05x.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path.insert(0, os.path.dirname(__file__))
from _common import loopback_dashboard  # noqa: E402


def make_data(samples: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 32, generator=g)
    return TensorDataset(x, (x[:, :10].argmax(dim=1)))


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def plain(loader: DataLoader) -> float:
    model = DistributedDataParallel(make_model())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    dist.barrier()
    start = time.perf_counter()
    model.train()
    for x, y in loader:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
    dist.barrier()
    return time.perf_counter() - start


def with_onthefly(loader: DataLoader, port: int | None, store: str, sync_every: int) -> float:
    import onthefly

    model = DistributedDataParallel(make_model())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    trainer = onthefly.Trainer(max_epochs=1, project="bench-ddp", save_dir=store, dashboard_port=port,
                               transport="tcp" if port else "off", dist_sync_every_steps=sync_every)
    dist.barrier()
    start = time.perf_counter()
    trainer.fit(model, optimizer, nn.CrossEntropyLoss(), loader)
    trainer.session.close()
    dist.barrier()
    return time.perf_counter() - start


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    data = make_data(args.samples)
    sampler = DistributedSampler(data, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=64, sampler=sampler)
    port = args.port if rank == 0 else None
    with tempfile.TemporaryDirectory() as store:
        plain(loader), with_onthefly(loader, port, store, args.sync_every)  # warm-up
        ratios, times = [], {"plain": [], "onthefly": []}
        for run in range(args.runs):
            order = ("plain", "onthefly") if run % 2 == 0 else ("onthefly", "plain")
            got = {}
            for name in order:
                got[name] = plain(loader) if name == "plain" else with_onthefly(loader, port, store, args.sync_every)
                times[name].append(got[name])
            ratios.append(got["onthefly"] / got["plain"])
    if rank == 0:
        steps = len(loader)
        print(f"2-rank DDP, gloo, {args.samples} samples ({steps} steps of 64 per rank), "
              f"ranks agree every {args.sync_every} steps, {args.runs} runs (ABBA), "
              f"{'a loopback dashboard on rank 0' if port else 'no dashboard'}")
        print(f"plain DDP loop    median {statistics.median(times['plain']) * 1000:.1f} ms")
        print(f"Trainer.fit       median {statistics.median(times['onthefly']) * 1000:.1f} ms")
        print(f"ratio Trainer/plain: median {statistics.median(ratios):.3f}x "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f}); target <= 1.05x")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--sync-every", type=int, default=8)
    parser.add_argument("--no-dashboard", action="store_true", help="rank 0 connects to no dashboard")
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with loopback_dashboard() as port:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   os.path.abspath(__file__), "--worker", *([] if args.no_dashboard else ["--port", str(port)]),
                   "--runs", str(args.runs),
                   "--samples", str(args.samples), "--sync-every", str(args.sync_every)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        sys.exit(subprocess.run(command, env=env).returncode)


if __name__ == "__main__":
    main()
