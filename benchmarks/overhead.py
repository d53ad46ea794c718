"""Training-loop overhead of onthefly against a plain PyTorch loop, measured in the same run.

    python benchmarks/overhead.py [--runs 5] [--epochs 1] [--samples 20000]

Prints the median wall time of each variant and its ratio to the plain loop. Variants are
interleaved run by run so machine noise hits all of them alike. Targets: Trainer.fit with a
loopback dashboard listening <= 1.05x.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(__file__))
from _common import loopback_dashboard, median  # noqa: E402

from onthefly import Trainer  # noqa: E402


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def make_loader(samples: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 32, generator=g)
    y = torch.randint(0, 10, (samples,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)


Timing = tuple[float, float]  # (wall seconds, CPU seconds of this process, all threads)


def clocks() -> Timing:
    return time.perf_counter(), time.process_time()


def since(start: Timing) -> Timing:
    return time.perf_counter() - start[0], time.process_time() - start[1]


def plain(loader: DataLoader, epochs: int) -> Timing:
    torch.manual_seed(0)
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    start = clocks()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
    return since(start)


def with_trainer(loader: DataLoader, epochs: int, transport: str, port: int | None, root: str) -> Timing:
    torch.manual_seed(0)
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    trainer = Trainer(project="bench", max_epochs=epochs, transport=transport, dashboard_port=port,
                      save_dir=root, serve_after_training=False)
    if port is not None:
        deadline = time.monotonic() + 5
        while not trainer.session.bus.connected and time.monotonic() < deadline:
            time.sleep(0.01)
    start = clocks()
    trainer.fit(model=model, optimizer=opt, loss_fn=nn.CrossEntropyLoss(), train_loader=loader)
    return since(start)


def child(variant: str, samples: int, epochs: int, port: int | None) -> None:
    """One measurement in a fresh interpreter: warm up, then time one training; print JSON."""
    torch.set_num_threads(1)
    loader = make_loader(samples)
    root = tempfile.mkdtemp(prefix="onthefly-bench-")
    run: Callable[[], Timing]
    if variant == "plain":
        run = lambda: plain(loader, epochs)  # noqa: E731
    elif variant == "trainer (no dashboard)":
        run = lambda: with_trainer(loader, epochs, "off", None, root)  # noqa: E731
    else:
        run = lambda: with_trainer(loader, epochs, "tcp", port, root)  # noqa: E731
    run()  # warm-up: first-call costs (allocator, kernels, lazy imports) hit every variant alike
    wall, cpu = run()
    print(json.dumps({"wall": wall, "cpu": cpu}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.samples, args.epochs, args.port)
        return 0
    names = ["plain", "trainer (no dashboard)", "trainer (dashboard)"]
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    with loopback_dashboard() as port:
        for run in range(args.runs):
            # Every measurement is a fresh process (a long-lived process slows down as it ages,
            # which would favour whichever variant ran first); the order rotates every run.
            order = names[run % 3:] + names[:run % 3]
            for name in order:
                cmd = [sys.executable, __file__, "--child", name, "--samples", str(args.samples),
                       "--epochs", str(args.epochs), "--port", str(port)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                result = json.loads(out.strip().splitlines()[-1])
                wall[name].append(result["wall"])
                cpu[name].append(result["cpu"])
    steps = args.epochs * len(make_loader(args.samples))
    print(f"MLP 32-256-256-10, batch 64, {args.samples} samples x {args.epochs} epoch(s) = {steps} steps, "
          f"Adam, 1 thread, {args.runs} runs per variant (each a fresh process, order rotated)")
    print("  ratio = median over runs of (variant / plain of the same run); wall time, and CPU time of the")
    print("  process (all threads: what the variant costs, whatever else the machine is doing)")
    for name in names:
        w_ratio = median([v / p for v, p in zip(wall[name], wall["plain"])])
        c_ratio = median([v / p for v, p in zip(cpu[name], cpu["plain"])])
        m = median(wall[name])
        print(f"  {name:<26} {m * 1e3:8.1f} ms  {m / steps * 1e6:7.1f} us/step  wall ratio {w_ratio:.3f}"
              f"  cpu ratio {c_ratio:.3f}")
    ratio = median([v / p for v, p in zip(wall["trainer (dashboard)"], wall["plain"])])
    print(f"target: trainer with dashboard <= 1.05x plain -> {'OK' if ratio <= 1.05 else 'MISSED'} ({ratio:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
