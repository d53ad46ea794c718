"""One rank of a 2-rank test job, launched by torchrun (gloo, CPU): a normal DDP script plus onthefly.

    torchrun --standalone --nproc_per_node 2 -m tests.distributed.worker RUNTIME OUT STORE
        [--port P] [--epochs E] [--delay S] [--resume PATH] [--ckpt-every N] [--die-at STEP]

RUNTIME is `trainer` (Trainer.fit), `own_loop` (onthefly.attach and the session's batches) or
`lightning` (a LightningModule, `strategy="ddp"`: Lightning starts the process group and adds the
`DistributedSampler` itself).
Every rank saves its final weights to OUT/rank<R>.pt (rank 0 also the session folder). With
`--die-at N`, rank 1 kills itself (SIGKILL) when it fetches batch N+1, as a crashed rank would.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import onthefly

N_SAMPLES = 1001
BATCH = 8


def dataset() -> TensorDataset:
    """The same 1,001 samples on every rank: 6 features, 3 classes from one labelling rule."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_SAMPLES, 6, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return TensorDataset(x, y)


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))


def session_settings(args: argparse.Namespace) -> dict:
    return dict(project="ddp", run_name="baseline", save_dir=args.store, ckpt_every_steps=args.ckpt_every,
                transport="tcp" if args.port else "off", dashboard_port=args.port,
                allowed_paths=(str(Path(args.out)),), dist_sync_every_steps=4, dist_timeout_s=120.0)


def slow_collate(delay: float):
    def collate(items):
        if delay:
            time.sleep(delay)
        return torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items])

    return collate


def save_result(out: Path, rank: int, weights: dict, session) -> None:
    torch.save({"weights": {k: v.detach().clone() for k, v in weights.items()}, "folder": str(session.storage.folder),
                "step": session.state.step, "session_id": session.session_id}, out / f"rank{rank}.pt")


def lightning_main(args: argparse.Namespace) -> None:
    import lightning.pytorch as pl

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = build_model()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    rank = int(os.environ["RANK"])
    module = Lit()
    torch.manual_seed(100 + rank)  # each rank draws its own dropout masks
    loader = DataLoader(dataset(), batch_size=BATCH, shuffle=True, collate_fn=slow_collate(args.delay))
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=2, strategy="ddp", deterministic=True,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=args.store)
    session = onthefly.attach_lightning(trainer=trainer, model=module, loss_fn=nn.CrossEntropyLoss(),
                                        resume_from=args.resume, **session_settings(args))
    trainer.fit(module, loader)
    save_result(Path(args.out), rank, module.net.state_dict(), session)
    session.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runtime", choices=("trainer", "own_loop", "lightning"))
    parser.add_argument("out")
    parser.add_argument("store")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--ckpt-every", type=int, default=0)
    parser.add_argument("--die-at", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.runtime == "lightning":
        return lightning_main(args)
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    data = dataset()
    sampler = DistributedSampler(data, shuffle=True, seed=0)

    batches = [0]

    def collate(items):  # slow when asked (so a dashboard can pause mid-epoch), numerics unchanged
        batches[0] += 1
        if args.die_at is not None and rank == 1 and batches[0] > args.die_at:
            os.kill(os.getpid(), signal.SIGKILL)  # a rank that crashes mid-epoch
        if args.delay:
            time.sleep(args.delay)
        return torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items])

    loader = DataLoader(data, batch_size=BATCH, sampler=sampler, collate_fn=collate)
    model = DistributedDataParallel(build_model())
    torch.manual_seed(100 + rank)  # each rank draws its own dropout masks: its RNG must be saved on its own
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    settings = session_settings(args)
    if args.runtime == "trainer":
        trainer = onthefly.Trainer(max_epochs=args.epochs, **settings)
        trainer.fit(model, optimizer, loss_fn, loader, resume_from=args.resume)
        session = trainer.session
    else:
        session = onthefly.attach(model=model, optimizer=optimizer, loss_fn=loss_fn, train_loader=loader,
                                  resume_from=args.resume, **settings)
        for _ in session.epochs(args.epochs):
            for x, y in session.batches():
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                loss.backward()
                optimizer.step()
                if not session.step(loss):
                    break
        session.finish()
    save_result(Path(args.out), rank, model.module.state_dict(), session)
    session.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
