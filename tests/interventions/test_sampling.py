"""Data weights and dropped samples: the weighted sampler, the plan in checkpoints under every data-order
policy, named sources, and loops the edits cannot reach."""

from __future__ import annotations

import threading

import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset

import onthefly
from onthefly import Trainer
from onthefly.control.errors import ProtocolError
from onthefly.mixins.sampling import SamplingPlan, WeightedEpochSampler

from session.helpers import MemoryDashboard, make_dataset, make_model, wait_until, weights


def test_the_weighted_sampler_depends_only_on_seed_epoch_and_weights():
    w = torch.tensor([0.0, 1.0, 3.0, 0.0, 1.0])
    a = WeightedEpochSampler(w, num_samples=40, seed=7)
    b = WeightedEpochSampler(w.clone(), num_samples=40, seed=7)
    torch.manual_seed(123)  # the global RNG plays no part
    assert list(a) == list(b) and len(list(a)) == 40
    assert {0, 3}.isdisjoint(set(a))
    b.set_epoch(1)
    assert list(a) != list(b)
    full = a.order().tolist()
    a.skip(15)
    assert len(a) == 25 and list(a) == full[15:] and len(a) == 40  # a skip applies to one iterator
    c = WeightedEpochSampler(torch.ones(6), num_samples=6, replacement=False, seed=0)
    assert sorted(c) == list(range(6))
    with pytest.raises(ValueError, match="at most 2"):
        WeightedEpochSampler(torch.tensor([1.0, 1.0, 0.0]), num_samples=3, replacement=False)
    with pytest.raises(ValueError, match="not all zero"):
        WeightedEpochSampler(torch.zeros(3), num_samples=3)


def test_a_plan_survives_its_checkpoint_form():
    plan = SamplingPlan([2, 5, 9], weights=None)
    plan.dropped[1] = True
    plan.weights = plan.dropped.astype(float) + 0.5
    back = SamplingPlan.from_state(plan.state())
    assert back.kept().tolist() == [2, 9] and back.kept_weights().tolist() == [0.5, 0.5]
    assert back.describe()["dropped"] == [5] and back.draws() == 2


def paused_trainer(tmp_path, policy: str, **settings):
    trainer = Trainer(project="sampling", max_epochs=3, transport="memory", save_dir=str(tmp_path),
                      data_order_policy=policy, log_every_n_steps=1, **settings)
    session = trainer.session
    session.channel.connect()
    dash = MemoryDashboard(session.channel)
    model = make_model()
    loader = DataLoader(make_dataset(128), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(3))
    args = dict(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=0.01),
                loss_fn=torch.nn.CrossEntropyLoss(), train_loader=loader, seed=0, progress=False)
    return trainer, session, dash, model, args


@pytest.mark.parametrize("policy", ["user", "epoch_reseed", "fixed_order"])
def test_weights_and_drops_resume_bit_exactly_from_a_mid_epoch_checkpoint(tmp_path, policy):
    trainer, session, dash, model, args = paused_trainer(tmp_path / "reference", policy)
    dash.send("pause")
    thread = threading.Thread(target=trainer.fit, kwargs=args, daemon=True)
    thread.start()
    wait_until(lambda: session.gate.paused, 20, "the first pause")
    assert dash.request("drop_samples", {"indices": list(range(0, 128, 4))})["kept"] == 96
    dash.request("set_data_weights", {"indices": list(range(1, 128, 4)), "weight": 5.0})
    assert dash.request("pause", {"at_step": 9})["status"] == "scheduled"  # exactly there, however busy the machine
    dash.request("resume")
    wait_until(lambda: session.gate.paused and session.state.step == 9, 20, "the pause at step 9")
    saved = dash.request("save_ckpt")
    assert session.state.batch_in_epoch == 3  # mid-epoch: 96 kept samples make 6 batches
    dash.request("resume")
    thread.join(60)
    reference = weights(model)

    again, _, _, model2, args2 = paused_trainer(tmp_path / "resumed", policy)
    resumed = again.fit(**{**args2, "resume_from": saved["path"]})
    assert resumed.sampling_plan is not None and resumed.sampling_plan.kept().size == 96
    for key, value in weights(model2).items():
        assert torch.equal(value, reference[key]), key


def test_named_sources_from_a_concat_dataset_and_from_the_python_api(tmp_path):
    parts = [TensorDataset(torch.randn(n, 8), torch.randint(0, 3, (n,))) for n in (20, 30)]
    parts[1].name = "web"
    model = make_model()
    session = onthefly.attach(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                              train_loader=DataLoader(ConcatDataset(parts), batch_size=10, shuffle=True),
                              transport="off", save_dir=str(tmp_path))
    with session:
        for x, y in session.batches():  # commands run inside step(), while the loop iterates session.batches()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            session.step()
            assert session.call("data_sampling")["sources"] == ["source0", "web"]
            reply = session.call("set_data_weights", {"sources": {"web": 0.0}})
            assert reply["takes_effect"] == "now"
            assert session.sampling_plan.weights[20:].tolist() == [0.0] * 30
            with pytest.raises(ProtocolError, match="unknown source; known: \\['source0', 'web'\\]"):
                session.call("set_data_weights", {"sources": {"books": 1.0}})
            session.define_data_sources({"odd": range(1, 50, 2)})
            session.call("set_data_weights", {"reset": True, "sources": {"odd": 3.0}})
            assert session.sampling_plan.weights.tolist()[:4] == [1.0, 3.0, 1.0, 3.0]
            break


def test_a_loop_that_iterates_its_own_loader_is_told_data_edits_cannot_reach_it(tmp_path):
    model = make_model()
    loader = DataLoader(make_dataset(64), batch_size=16)
    session = onthefly.attach(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                              train_loader=loader, transport="off", save_dir=str(tmp_path))
    with session:
        for x, y in loader:
            torch.nn.functional.cross_entropy(model(x), y).backward()
            session.step()
            with pytest.raises(ProtocolError, match="iterate session.batches") as caught:
                session.call("drop_samples", {"indices": [1, 2]})
            assert caught.value.code == "failed" and session.sampling_plan is None
            break
