"""What the interventions cost: the autopilot's rules on a run, the ledger per command, the final digest.

    python benchmarks/interventions_cost.py [--runs 7] [--samples 20000]

1. Autopilot. The same MLP (32-256-256-10, batch 64, Adam, one thread) trains one epoch with
   `Trainer.fit`, without and with `autopilot=True` (three rules judged on their own thread from
   the event log). Runs alternate ABBA; the figure is the median of the per-pair time ratios.
   The training thread does no extra work per step: what the rules cost is the watcher thread
   (a read of the event log every 0.1 s), which competes for the interpreter lock.
2. Ledger. The time `session.call("set_hparams", ...)` takes on a paused session after 0, 1,000
   and 5,000 earlier entries (each entry rewrites the run's manifest, in the background thread,
   but serialises it on the caller's): commands are rare, so this is per command, not per step.
3. Digest. `weights_digest` (SHA-256 over the state dict, at the end of every training) for a
   10M- and a 50M-parameter model.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from onthefly import Trainer  # noqa: E402
from onthefly.mixins.ledger import weights_digest  # noqa: E402


def one_epoch(samples: int, autopilot: bool, folder: str) -> float:
    torch.manual_seed(0)
    x = torch.randn(samples, 32)
    y = torch.randint(0, 10, (samples,))
    model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    trainer = Trainer(project="bench", max_epochs=1, transport="off", save_dir=folder, autopilot=autopilot or None)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    started = time.perf_counter()
    trainer.fit(model, torch.optim.Adam(model.parameters(), lr=1e-3), nn.CrossEntropyLoss(), loader,
                seed=0, progress=False)
    return time.perf_counter() - started


def autopilot_ratio(runs: int, samples: int, folder: str) -> tuple[float, float, float]:
    one_epoch(samples // 4, False, folder)  # warm-up
    ratios = []
    for i in range(runs):
        order = (False, True) if i % 2 == 0 else (True, False)
        times = {flag: one_epoch(samples, flag, folder) for flag in order}
        ratios.append(times[True] / times[False])
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return statistics.median(ratios), quartiles[0], quartiles[2]


def ledger_cost(folder: str) -> dict[int, float]:
    trainer = Trainer(project="bench-ledger", transport="off", save_dir=folder)
    session = trainer.session
    model = nn.Linear(32, 10)
    session.bind(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=nn.CrossEntropyLoss(),
                 train_loader=DataLoader(TensorDataset(torch.randn(64, 32), torch.randint(0, 10, (64,)))))
    session.before_training()
    costs: dict[int, float] = {}
    done = 0
    for target in (0, 1000, 5000):
        while done < target:
            session.call("set_hparams", {"lr": 0.1})
            done += 1
        started = time.perf_counter()
        for _ in range(20):
            session.call("set_hparams", {"lr": 0.1})
        done += 20
        costs[target] = (time.perf_counter() - started) / 20
    session.after_training("completed")
    session.close()
    return costs


def digest_cost(params: int) -> float:
    model = nn.Linear(params // 1000, 1000)
    started = time.perf_counter()
    weights_digest(model)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--samples", type=int, default=20000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        median, low, high = autopilot_ratio(args.runs, args.samples, folder)
        print(f"autopilot=True / no autopilot, one epoch of {args.samples} samples: {median:.3f}x "
              f"(IQR {low:.3f}-{high:.3f}, {args.runs} runs)")
        for entries, seconds in ledger_cost(folder).items():
            print(f"set_hparams with {entries:>5} earlier ledger entries: {seconds * 1e3:.2f} ms per command")
    for params in (10_000_000, 50_000_000):
        print(f"weights_digest of {params // 1_000_000}M parameters: {digest_cost(params):.3f} s")


if __name__ == "__main__":
    main()
