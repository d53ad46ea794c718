"""Training dynamics recorded by the session on every runtime's epoch ends, used by reports and forks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import onthefly
from onthefly import OnTheFlySession, ProtocolError, SessionConfig
from onthefly.data_explorer import DynamicsRecorder

from .helpers import make_dataset, make_model


def native(tmp_path, **settings) -> OnTheFlySession:
    cfg = SessionConfig(project="dyn", transport="off", save_dir=str(tmp_path), seed=0, max_epochs=3, **settings)
    session = OnTheFlySession(cfg)
    model = make_model()
    session.bind(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=nn.CrossEntropyLoss(),
                 train_loader=DataLoader(make_dataset(96), batch_size=16, shuffle=True))
    return session


def test_the_native_loop_records_every_epoch_end_and_reports_read_the_views(tmp_path):
    with native(tmp_path, dynamics_every_epochs=1) as session:
        session.train()
        recorder = DynamicsRecorder(session.storage.run_dir("baseline") / "dynamics")
        assert [r.step for r in recorder.records] == [6, 12, 18] and recorder.records[0].samples == 96
        report = session.call("generate_report", {"subset_on": "train", "metric": "mislabel",
                                                  "suggest_cutoff": True})
        assert report["meta"]["metric"] == "mislabel" and report["meta"]["records"] == 3
        assert sorted(report["sample_indices"]) == list(range(96))
        mean_loss = recorder.summary().mean_loss
        np.testing.assert_allclose(report["losses"], recorder.summary().mislabel, rtol=1e-6)
        assert np.isfinite(mean_loss).all()
        assert set(report["cutoff"]["flagged"]) <= set(range(96))
        # a fork on the most suspect fifth of the samples, ranked by a dynamics view
        fork = session.call("fork", {"selection": {"kind": "quantile", "from": 0.8, "to": 1.0,
                                                   "metric": "mislabel"}})
        scores = dict(zip(report["sample_indices"], report["losses"]))
        cut = np.quantile(report["losses"], 0.8)
        assert sorted(fork["subset_indices"]) == sorted(i for i, v in scores.items() if v >= cut)


def test_recording_does_not_change_training(tmp_path):
    with native(tmp_path / "a") as plain:
        plain.train()
    with native(tmp_path / "b", dynamics_every_epochs=1, dynamics_every_steps=4) as recorded:
        recorded.train()
        for key, value in plain.model.state_dict().items():
            assert torch.equal(value, recorded.model.state_dict()[key]), key
        records = DynamicsRecorder(recorded.storage.run_dir("baseline") / "dynamics").records
        assert [r.step for r in records] == [4, 6, 8, 12, 16, 18]  # step 12 is both: recorded once


def test_a_dynamics_report_needs_records(tmp_path):
    with native(tmp_path) as session:
        session.train()
        with pytest.raises(ProtocolError, match="dynamics_every_epochs") as info:
            session.call("generate_report", {"subset_on": "train", "metric": "variability"})
        assert info.value.code == "bad_payload"


def test_an_own_loop_records_at_its_epoch_ends(tmp_path):
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(make_dataset(64), batch_size=16, shuffle=True)
    with onthefly.attach(model=model, optimizer=opt, loss_fn=nn.CrossEntropyLoss(), train_loader=loader,
                         transport="off", save_dir=str(tmp_path), dynamics_every_epochs=1) as session:
        for _ in session.epochs(2):
            for x, y in session.batches():
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                session.step(loss)
        recorder = DynamicsRecorder(session.storage.run_dir("baseline") / "dynamics")
        assert [r.epoch for r in recorder.records] == [0, 1] and [r.step for r in recorder.records] == [4, 8]
