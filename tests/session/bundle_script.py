"""Run by test_bundle_resume in fresh interpreters.

`original OUT ROOT BUNDLE`: baseline -> two forks -> merge, export the session, then keep training
the merged run and save its final weights. `resume OUT ROOT BUNDLE`: import the bundle in a fresh
process, resume the merged run, train the same amount, and save its final weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from onthefly import OnTheFlySession, SessionConfig, Trainer
from tests.session.helpers import make_dataset, make_model


def objects():
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loader = DataLoader(make_dataset(160), batch_size=16, shuffle=True)
    return model, opt, loader


def original(out: str, root: str, bundle: str) -> dict:
    torch.manual_seed(0)
    model, opt, loader = objects()
    session = OnTheFlySession(SessionConfig(project="bundle", max_epochs=1, transport="off", save_dir=root, seed=0,
                                          allowed_paths=(str(Path(bundle).parent),)))
    try:
        session.bind(model=model, optimizer=opt, loss_fn=torch.nn.CrossEntropyLoss(), train_loader=loader,
                     model_factory=make_model)
        session.train()
        session.call("fork", {"selection": {"kind": "quantile", "from": 0.8, "to": 1.0}, "hparams": {"lr": 5e-3}})
        session.train()
        session.call("fork", {"parent_run_id": "baseline", "selection": {"kind": "indices", "ids": list(range(40))}})
        session.train()
        merged = session.call("merge", {"parents": ["fork1", "fork2"], "strategy": "swa"})
        exported = session.call("prepare_export", {"dir": bundle})
        session.cfg.max_epochs = 2
        session.train()
        torch.save(model.state_dict(), out)
        return {"merge": merged["new_run"], "bundle": exported["bundle"], "step": session.state.step}
    finally:
        session.close()


def resume(out: str, root: str, bundle: str) -> dict:
    model, opt, loader = objects()
    trainer = Trainer(project="bundle", max_epochs=2, transport="off", save_dir=root)
    session = trainer.fit(model=model, optimizer=opt, loss_fn=torch.nn.CrossEntropyLoss(), train_loader=loader,
                          seed=123, resume_from=bundle, resume_run="merge1", model_factory=make_model)
    torch.save(model.state_dict(), out)
    return {"run": session.cfg.run_name, "step": session.state.step,
            "runs": sorted(session.known_runs())}


if __name__ == "__main__":
    mode, out, root, bundle = sys.argv[1:5]
    print(json.dumps((original if mode == "original" else resume)(out, root, bundle)))
