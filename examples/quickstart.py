"""onthefly quickstart: train a small classifier on synthetic data with a live, steerable session.

Run it with a dashboard listening (e.g. `onthefly listen` in another terminal, or the VS Code
extension) to watch and steer it; with none it trains anyway and keeps every event on disk.

    python examples/quickstart.py [--epochs 3] [--steps-per-epoch N]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from onthefly import Trainer


# One labelling rule for every split: a fixed linear "teacher" with a little label noise.
TEACHER = torch.randn(20, 4, generator=torch.Generator().manual_seed(1234))


def make_data(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    y = (x @ TEACHER + 0.3 * torch.randn(n, 4, generator=g)).argmax(dim=1)
    return TensorDataset(x, y)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--project", default="quickstart")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train = DataLoader(make_data(args.samples, seed=1), batch_size=64, shuffle=True)
    val = DataLoader(make_data(1024, seed=2), batch_size=256)
    test = DataLoader(make_data(1024, seed=3), batch_size=256)

    trainer = Trainer(project=args.project, run_name="baseline", max_epochs=args.epochs,
                      do_test_after=True, val_every_n_epochs=1, ckpt_every_steps=100)
    session = trainer.fit(model=model, optimizer=optimizer, loss_fn=nn.CrossEntropyLoss(),
                          train_loader=train, val_loader=val, test_loader=test, seed=0,
                          model_factory=lambda: nn.Sequential(nn.Linear(20, 64), nn.ReLU(),
                                                              nn.Dropout(0.1), nn.Linear(64, 4)),
                          progress=True)
    latest = session.ring().latest()
    val = session.state.last_val_loss
    print(f"finished: {session.state.status} at step {session.state.step}, "
          f"val_loss={'n/a' if val is None else f'{val:.4f}'}")
    print(f"session folder : {session.storage.folder}")
    print(f"event log      : {session.storage.events_db} ({session.bus.last_seq()} events)")
    print(f"checkpoints    : {session.ring().directory} (latest: {latest.path.name if latest else 'none'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
