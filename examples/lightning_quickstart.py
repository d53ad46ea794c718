"""A Lightning `Trainer` steered from a dashboard: one added call, `trainer.fit` unchanged.

Run it with a dashboard listening (e.g. `onthefly listen` in another terminal, or the VS Code
extension). "Test now" runs this module's own `test_step` through Lightning's real test loop;
pause, save and stop act between two optimizer steps.

    python examples/lightning_quickstart.py [--epochs 3] [--samples 4096]
"""

from __future__ import annotations

import argparse
import os

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import onthefly


# One labelling rule for every split: a fixed linear "teacher" with a little label noise.
TEACHER = torch.randn(20, 4, generator=torch.Generator().manual_seed(1234))


def make_data(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    y = (x @ TEACHER + 0.3 * torch.randn(n, 4, generator=g)).argmax(dim=1)
    return TensorDataset(x, y)


class Classifier(pl.LightningModule):
    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        # Logged values reach the dashboard as they are (train_loss -> loss, train_acc -> accuracy).
        self.log("train_loss", loss)
        self.log("train_acc", (logits.argmax(dim=1) == y).float().mean())
        return loss

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def on_test_end(self) -> None:
        print(f"test run {os.environ.get('ONTHEFLY_TEST_LABEL')} finished")

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--project", default="lightning-quickstart")
    args = parser.parse_args(argv)

    pl.seed_everything(0)
    model = Classifier()
    train = DataLoader(make_data(args.samples, seed=1), batch_size=64, shuffle=True)
    val = DataLoader(make_data(1024, seed=2), batch_size=256)
    test = DataLoader(make_data(1024, seed=3), batch_size=256)

    trainer = pl.Trainer(max_epochs=args.epochs, deterministic=True, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False)
    session = onthefly.attach_lightning(trainer=trainer, model=model, project=args.project,
                                        test_loader=test, do_test_after=True)
    trainer.fit(model, train, val)  # unchanged

    print(f"finished: {session.state.status} at step {session.state.step}, val_loss={session.state.last_val_loss}")
    print(f"session folder : {session.storage.folder}")
    session.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
