"""Training-loop overhead of onthefly against a plain PyTorch loop, measured in the same run.

    python benchmarks/overhead.py [--runs 5] [--epochs 1] [--samples 20000]

Prints the median wall time of each variant and its ratio to the plain loop. Variants are
interleaved run by run so machine noise hits all of them alike. Targets: Trainer.fit with a
loopback dashboard listening <= 1.05x.
"""

from __future__ import annotations

import argparse
import os
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


def plain(loader: DataLoader, epochs: int) -> float:
    torch.manual_seed(0)
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
    return time.perf_counter() - start


def with_trainer(loader: DataLoader, epochs: int, transport: str, port: int | None, root: str) -> float:
    torch.manual_seed(0)
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    trainer = Trainer(project="bench", max_epochs=epochs, transport=transport, dashboard_port=port,
                      save_dir=root, serve_after_training=False)
    if port is not None:
        deadline = time.monotonic() + 5
        while not trainer.session.bus.connected and time.monotonic() < deadline:
            time.sleep(0.01)
    start = time.perf_counter()
    trainer.fit(model=model, optimizer=opt, loss_fn=nn.CrossEntropyLoss(), train_loader=loader)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--samples", type=int, default=20000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    loader = make_loader(args.samples)
    root = tempfile.mkdtemp(prefix="onthefly-bench-")
    times: dict[str, list[float]] = {"plain": [], "trainer (no dashboard)": [], "trainer (dashboard)": []}
    with loopback_dashboard() as port:
        variants: dict[str, Callable[[], float]] = {
            "plain": lambda: plain(loader, args.epochs),
            "trainer (no dashboard)": lambda: with_trainer(loader, args.epochs, "off", None, root),
            "trainer (dashboard)": lambda: with_trainer(loader, args.epochs, "tcp", port, root),
        }
        for fn in variants.values():  # warm-up
            fn()
        for _ in range(args.runs):
            for name, fn in variants.items():
                times[name].append(fn())
    base = median(times["plain"])
    steps = args.epochs * len(loader)
    print(f"MLP 32-256-256-10, batch 64, {args.samples} samples x {args.epochs} epoch(s) = {steps} steps, "
          f"Adam, 1 thread, {args.runs} interleaved runs (median)")
    for name, values in times.items():
        m = median(values)
        print(f"  {name:<26} {m * 1e3:8.1f} ms  {m / steps * 1e6:7.1f} us/step  ratio {m / base:.3f}")
    ratio = median(times["trainer (dashboard)"]) / base
    print(f"target: trainer with dashboard <= 1.05x plain -> {'OK' if ratio <= 1.05 else 'MISSED'} ({ratio:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
