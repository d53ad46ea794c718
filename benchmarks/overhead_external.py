"""Overhead of onthefly on loops it does not own: Lightning, and a hand-written PyTorch loop.

    python benchmarks/overhead_external.py [--runs 5] [--samples 20000] [--skip-lightning]

Pairs, each timed in the same process and interleaved run by run so machine noise hits both
sides alike; the figure is the median of the per-run ratios:

- Lightning: plain `L.Trainer.fit` vs the same with `onthefly.attach_lightning` and a loopback
  dashboard listening (progress bar, logger, checkpointing and model summary off in both).
  Target <= 1.05x.
- Own loop: a bare PyTorch loop vs the same loop with `onthefly.attach` + `session.step(loss)`
  and a loopback dashboard listening. Target <= 1.03x.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(__file__))
from _common import loopback_dashboard, median  # noqa: E402

import onthefly  # noqa: E402

LIGHTNING_TARGET = 1.05
OWN_LOOP_TARGET = 1.03


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def make_loader(samples: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 32, generator=g)
    y = torch.randint(0, 10, (samples,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)


def wait_connected(session: onthefly.OnTheFlyExternalSession) -> None:
    deadline = time.monotonic() + 5
    while not session.bus.connected:
        if time.monotonic() > deadline:
            raise RuntimeError("the loopback dashboard did not accept the connection within 5 s")
        time.sleep(0.01)


# ---- own loop ------------------------------------------------------------------------------------
def bare_loop(loader: DataLoader) -> float:
    torch.manual_seed(0)
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    for x, y in loader:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def attached_loop(loader: DataLoader, port: int, root: str) -> float:
    torch.manual_seed(0)
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    session = onthefly.attach(model=model, optimizer=opt, train_loader=loader, project="bench",
                              transport="tcp", dashboard_port=port, save_dir=root)
    wait_connected(session)
    start = time.perf_counter()
    for x, y in loader:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if not session.step(loss):
            break
    elapsed = time.perf_counter() - start
    session.close()
    return elapsed


# ---- Lightning ------------------------------------------------------------------------------------
def lightning_variants(loader: DataLoader, port: int, root: str) -> dict[str, Callable[[], float]]:
    import lightning.pytorch as pl

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_mlp()

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    def trainer() -> pl.Trainer:
        return pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, accelerator="cpu", devices=1, num_sanity_val_steps=0)

    def plain() -> float:
        torch.manual_seed(0)
        model, t = Lit(), trainer()
        start = time.perf_counter()
        t.fit(model, loader)
        return time.perf_counter() - start

    def attached() -> float:
        torch.manual_seed(0)
        model, t = Lit(), trainer()
        session = onthefly.attach_lightning(trainer=t, model=model, project="bench", transport="tcp",
                                            dashboard_port=port, save_dir=root)
        wait_connected(session)
        start = time.perf_counter()
        t.fit(model, loader)
        elapsed = time.perf_counter() - start
        session.close()
        return elapsed

    return {"lightning plain": plain, "lightning + attach_lightning": attached}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--skip-lightning", action="store_true")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers")
    warnings.filterwarnings("ignore", message=".*LeafSpec")
    loader = make_loader(args.samples)
    root = tempfile.mkdtemp(prefix="onthefly-bench-")
    times: dict[str, list[float]] = {}
    with loopback_dashboard() as port:
        variants: dict[str, Callable[[], float]] = {
            "own loop bare": lambda: bare_loop(loader),
            "own loop + attach": lambda: attached_loop(loader, port, root),
        }
        if not args.skip_lightning:
            variants.update(lightning_variants(loader, port, root))
        for fn in variants.values():  # warm-up
            fn()
        for _ in range(args.runs):
            for name, fn in variants.items():
                times.setdefault(name, []).append(fn())
    steps = len(loader)
    print(f"MLP 32-256-256-10, batch 64, {args.samples} samples = {steps} steps, Adam, 1 thread, "
          f"{args.runs} interleaved runs (median), loopback dashboard listening")
    for name, values in times.items():
        m = median(values)
        print(f"  {name:<30} {m * 1e3:8.1f} ms  {m / steps * 1e6:7.1f} us/step")
    pairs = [("own loop + attach", "own loop bare", OWN_LOOP_TARGET)]
    if not args.skip_lightning:
        pairs.insert(0, ("lightning + attach_lightning", "lightning plain", LIGHTNING_TARGET))
    for variant, base, target in pairs:
        # Each run times both sides back to back; the median of those paired ratios is the figure.
        ratio = median([v / b for v, b in zip(times[variant], times[base])])
        verdict = "OK" if ratio <= target else "MISSED"
        print(f"target: {variant} <= {target:.2f}x {base} -> {verdict} ({ratio:.3f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
