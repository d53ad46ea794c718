"""Run by test_checkpoint_resume in a fresh interpreter: train (or resume) and save final weights."""

from __future__ import annotations

import json
import sys

import torch
from torch.utils.data import DataLoader

from onthefly import Trainer
from tests.session.helpers import CountingLoss, make_dataset, make_model


def main() -> None:
    out, save_dir, policy, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    resume = sys.argv[5] if len(sys.argv) > 5 else None
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train = DataLoader(make_dataset(200), batch_size=16, shuffle=True, num_workers=workers)
    trainer = Trainer(project="resume", max_epochs=3, transport="off", save_dir=save_dir,
                      ckpt_every_steps=0 if resume else 7, ckpt_keep=50)
    session = trainer.fit(model=model, optimizer=opt, loss_fn=CountingLoss(), train_loader=train,
                          scheduler=sched, seed=3, data_order_policy=policy, resume_from=resume)
    torch.save(model.state_dict(), out)
    print(json.dumps({"ckpt_dir": str(session.ring().directory), "step": session.state.step}))


if __name__ == "__main__":
    main()
