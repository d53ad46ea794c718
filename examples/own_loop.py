"""Your own PyTorch loop, steerable from a dashboard, with two added lines.

Run it with a dashboard listening (e.g. `onthefly listen` in another terminal, or the VS Code
extension): pause, resume, test, save and stop act on this loop between two optimizer steps.
With none it trains anyway and keeps every event on disk.

    python examples/own_loop.py [--epochs 3] [--samples 4096]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import onthefly


def make_data(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    w = torch.randn(20, 4, generator=g)
    y = (x @ w + 0.3 * torch.randn(n, 4, generator=g)).argmax(dim=1)
    return TensorDataset(x, y)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--project", default="own-loop")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    train = DataLoader(make_data(args.samples, seed=1), batch_size=64, shuffle=True)
    val = DataLoader(make_data(1024, seed=2), batch_size=256)
    test = DataLoader(make_data(1024, seed=3), batch_size=256)

    # Line 1: attach. The test loader is what the dashboard's "Test now" runs.
    session = onthefly.attach(model=model, optimizer=optimizer, loss_fn=loss_fn, train_loader=train,
                              test_loader=test, project=args.project)
    with session:
        for _ in range(args.epochs):
            model.train()
            for x, y in train:
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                loss.backward()
                optimizer.step()
                # Line 2: report the step; pending commands run here, and a pause holds here.
                if not session.step(loss):
                    break
            else:
                model.eval()
                with torch.no_grad():
                    val_loss = sum(float(loss_fn(model(x), y)) for x, y in val) / len(val)
                session.end_epoch(val_loss=val_loss)  # optional: adds the validation loss to epoch_end
                continue
            break  # the dashboard sent stop

    print(f"finished: {session.state.status} at step {session.state.step}, val_loss={session.state.last_val_loss}")
    print(f"session folder : {session.storage.folder}")
    print(f"event log      : {session.storage.events_db} ({session.bus.last_seq()} events)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
