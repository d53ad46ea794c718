"""The intervention commands, the same payloads and assertions on every runtime, over the real wire:
set_hparams on any key, layer_op / list_modules, data weights and drops, rollback, the autopilot's
rules, describe_commands, and the ledger every mutating command lands in.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from onthefly.checkpoints import load_checkpoint
from onthefly.mixins.sampling import WeightedEpochSampler

from .runtimes import BATCH, N_TRAIN, WAIT, make_problem, weights


def module_path(dash, suffix: str) -> str:
    """The `named_modules` path ending in `suffix` (Lightning wraps the net: `net.head`)."""
    found = []

    def walk(node):
        if node["path"] == suffix or node["path"].endswith("." + suffix):
            found.append(node)
        for child in node.get("children", []):
            walk(child)

    reply = dash.request("list_modules", {})
    walk(reply["tree"])
    assert len(found) == 1, found
    return found[0]["path"], found[0], reply


def test_describe_commands_and_set_hparams_on_any_key(live, runtime):
    dash, run = live
    described = dash.request("describe_commands")
    assert described["$schema"].startswith("https://json-schema.org/") and described["runtime"] == runtime
    assert set(described["commands"]) == set(dash.request("server_info")["capabilities"])
    hp_schema = described["commands"]["set_hparams"]
    assert hp_schema["mutating"] is True and hp_schema["payload"]["additionalProperties"]["description"]
    assert described["commands"]["layer_op"]["payload"]["properties"]["op"]["enum"] == [
        "reset_parameters", "freeze", "unfreeze", "set_dropout"]

    session = run.session
    dash.request("resume")
    dash.wait_steps("baseline", 2)
    dash.request("pause")  # every runtime has optimizer state now
    group = session.optimizer.param_groups[0]
    reply = dash.request("set_hparams", {"decoupled_weight_decay": True, "group": 0})  # a key no typed field names
    assert group["decoupled_weight_decay"] is True and reply["param_groups"][0]["decoupled_weight_decay"] is True
    err = dash.error("set_hparams", {"amsgrad": True})  # Adam's state has no max_exp_avg_sq yet: refused
    assert err.code == "bad_payload" and "state" in str(err) and "max_exp_avg_sq" in str(err)
    assert group["amsgrad"] is False
    dash.request("set_hparams", {"lr_scale": 0.5})
    assert group["lr"] == 0.005
    for payload, words in (({"lrr": 0.1}, ["lrr", "Adam", "its settings are"]),
                           ({"lr": 0.1, "amsgrad": "yes"}, ["amsgrad", "bool"]),
                           ({"params": []}, ["params"]),
                           ({"lr": 0.1, "lr_scale": 2.0}, ["lr_scale"]),
                           ({"group": 5, "lr": 0.1}, ["param_group"]),
                           ({}, ["nothing to change"])):
        err = dash.error("set_hparams", payload)
        assert err.code == "bad_payload" and all(w in str(err) for w in words), (payload, str(err))
    assert group["lr"] == 0.005 and group["amsgrad"] is False  # nothing half-applied

    clipped = dash.request("set_hparams", {"grad_clip_norm": 0.25})
    assert clipped["grad_clip_norm"] == 0.25
    if runtime == "lightning":
        assert dash.request("set_hparams", {"accumulate_grad_batches": 2})["accumulate_grad_batches"] == 2
        assert run.session.framework.trainer.accumulate_grad_batches == 2
        assert run.session.framework.trainer.gradient_clip_val == 0.25
        dash.request("set_hparams", {"accumulate_grad_batches": 1})
    else:
        err = dash.error("set_hparams", {"accumulate_grad_batches": 2})
        assert err.code == "bad_payload" and runtime in str(err) and "accumulate_grad_batches" in str(err)
    # Clipping reaches the optimizer step: the gradients the last step used have at most that norm.
    # (Seen right after each optimizer step: some loops zero the gradients before the next boundary.)
    dash.request("set_hparams", {"grad_clip_norm": 0.01})
    norms: list[float] = []

    def after_step(optimizer, args, kwargs):
        grads = [p.grad.norm() for p in run.model.parameters() if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0)

    hook = session.optimizer.register_step_post_hook(after_step)
    try:
        dash.request("resume")
        dash.wait_steps("baseline", dash.request("status")["step"] + 3)
        dash.request("pause")
    finally:
        hook.remove()
    assert len(norms) >= 3 and all(0 < norm <= 0.01 * 1.001 for norm in norms), norms
    dash.request("set_hparams", {"grad_clip_norm": 0})
    assert dash.request("set_hparams", {"lr": 0.01})["grad_clip_norm"] is None
    entries = [e for e in dash.events("ledger_entry") if e["cmd"] == "set_hparams"]
    assert entries and all(e["origin"] == "wire" and e["replay"] == "edit" for e in entries)
    refused = 7 + (runtime != "lightning")  # the refused ones are on record too
    assert [e["ok"] for e in entries].count(False) == refused


def test_list_modules_and_layer_ops(live, runtime):
    dash, run = live
    head, node, tree = module_path(dash, "head")
    assert node["type"] == "Linear" and node["params"] == 32 * 3 + 3 and node["resettable"] is True
    assert tree["total_params"] == sum(p.numel() for p in run.model.parameters())
    body, _, _ = module_path(dash, "body")
    drop, drop_node, _ = module_path(dash, "drop")
    assert drop_node["dropout_p"] == 0.1

    params = dict(run.model.named_parameters())
    head_weight = params[f"{head}.weight"].detach().clone()
    reset = dash.request("layer_op", {"path": head, "op": "reset_parameters", "seed": 3})
    assert reset["modules"] == [head] and reset["params"] == 99
    assert not torch.equal(params[f"{head}.weight"], head_weight)
    torch.manual_seed(3)
    expected = torch.nn.Linear(32, 3).weight
    assert torch.equal(params[f"{head}.weight"].detach(), expected.detach())  # drawn from the given seed

    frozen = dash.request("layer_op", {"path": body, "op": "freeze"})
    assert frozen["parameters"] == 2 and not params[f"{body}.weight"].requires_grad
    assert dash.request("layer_op", {"path": drop, "op": "set_dropout", "p": 0.3})["p"] == 0.3
    modules = dict(run.model.named_modules())
    assert modules[drop].p == 0.3
    assert dash.wait("layer_changed", op="set_dropout")["modules"] == [drop]

    for payload, code, words in (({"path": "nope", "op": "freeze"}, "not_found", ["nope"]),
                                 ({"path": head[:-1] + "x", "op": "freeze"}, "not_found", ["did you mean"]),
                                 ({"path": head, "op": "set_dropout", "p": 0.2}, "bad_payload", ["no dropout"]),
                                 ({"path": drop, "op": "set_dropout"}, "bad_payload", ["payload.p"]),
                                 ({"path": drop, "op": "set_dropout", "p": 1.0}, "bad_payload", ["payload.p"]),
                                 ({"path": drop, "op": "reset_parameters"}, "bad_payload", ["reset_parameters"]),
                                 ({"path": head, "op": "explode"}, "bad_payload", ["op"])):
        err = dash.error("layer_op", payload)
        assert err.code == code and all(w in str(err) for w in words), (payload, str(err))
    assert modules[drop].p == 0.3 and not params[f"{body}.weight"].requires_grad

    body_weight = params[f"{body}.weight"].detach().clone()
    head_weight = params[f"{head}.weight"].detach().clone()
    dash.request("resume")
    dash.wait_steps("baseline", dash.request("status")["step"] + 3)
    dash.request("pause")
    assert torch.equal(params[f"{body}.weight"], body_weight)  # frozen: untouched by training
    assert not torch.equal(params[f"{head}.weight"], head_weight)

    # What state_dict does not hold is in the checkpoint: a load brings the freezing and dropout back.
    saved = dash.request("save_ckpt")
    document = load_checkpoint(saved["path"])
    assert document["layers"]["dropout"] == {drop: 0.3}
    assert document["layers"]["requires_grad"][f"{body}.weight"] is False
    dash.request("layer_op", {"path": body, "op": "unfreeze"})
    dash.request("layer_op", {"path": drop, "op": "set_dropout", "p": 0.0})
    assert params[f"{body}.weight"].requires_grad and modules[drop].p == 0.0
    dash.request("load_ckpt", {"path": saved["path"]})
    assert not params[f"{body}.weight"].requires_grad and modules[drop].p == 0.3
    dash.request("resume")
    dash.wait_steps("baseline", dash.request("status")["step"] + 2)


def epoch_steps(dash, after_seq: int) -> int:
    """Steps of the first whole epoch that starts after event `after_seq`."""
    first = dash.server.wait_for_event(lambda e: e.get("type") == "epoch_end" and e["event_seq"] > after_seq, WAIT)
    second = dash.server.wait_for_event(lambda e: e.get("type") == "epoch_end" and e.get("epoch") == first["epoch"] + 1,
                                        WAIT)
    return len({e["step"] for e in dash.events("trainStep", run_id="baseline")
                if first["event_seq"] < e["event_seq"] < second["event_seq"]})


def test_data_weights_drops_and_restores(live, runtime, tmp_path):
    dash, run = live
    train = make_problem().train_indices
    session = run.session
    assert dash.request("data_sampling")["samples"] == N_TRAIN
    expected_timing = "next_epoch" if runtime in ("lightning", "hf") else "now"

    for payload, words in (({"weights": [1.0] * 3}, ["one weight per sample", str(N_TRAIN)]),
                           ({"indices": train[:3], "weights": [1.0, 2.0]}, ["one weight per index"]),
                           ({"indices": train[:2], "weight": -1.0}, ["payload.weight", ">= 0"]),
                           ({"weights": [-1.0] + [1.0] * (N_TRAIN - 1)}, ["payload.weights[0]", ">= 0"]),
                           ({"weights": [0.0] * N_TRAIN}, ["weight 0"]),
                           ({"indices": [100_000], "weight": 2.0}, ["100000", "not samples"]),
                           ({"sources": {"web": 2.0}}, ["unknown source"]),
                           ({}, ["give weights"])):
        err = dash.error("set_data_weights", payload)
        assert err.code == "bad_payload" and all(w in str(err) for w in words), (payload, str(err))
    assert session.sampling_plan is None  # nothing half-applied

    heavy = train[:40]
    weighted = dash.request("set_data_weights", {"indices": heavy, "weight": 0.0})
    assert weighted["weighted"] is True and weighted["takes_effect"] == expected_timing
    sampler = session.train_loader.sampler
    assert isinstance(sampler, WeightedEpochSampler) and int((sampler.weights == 0).sum()) == 40
    drawn = {int(session.train_loader.dataset.indices[i]) for i in sampler.order(0).tolist()}
    assert drawn.isdisjoint(heavy)  # weight 0: never drawn

    dropped = train[40:100]
    reply = dash.request("drop_samples", {"indices": dropped, "reason": "mislabelled"})
    assert reply["kept"] == N_TRAIN - 60 and reply["newly_dropped"] == 60
    assert set(session.train_loader.dataset.indices).isdisjoint(dropped)
    for payload, code in (({"indices": [100_000]}, "bad_payload"), ({"indices": train}, "bad_payload")):
        assert dash.error("drop_samples", payload).code == code
    assert dash.error("restore_samples", {}).code == "bad_payload"
    state = dash.request("data_sampling")
    assert state["dropped"] == sorted(dropped) and state["weights"]["values"] == [0.0] * 40
    assert state["takes_effect"] == expected_timing
    dash.request("set_data_weights", {"reset": True})  # uniform again; the drops stay
    assert session.sampling_plan.weights is None and session.sampling_plan.kept().size == N_TRAIN - 60

    # A whole epoch now has ceil(kept / batch) steps.
    mark = dash.server.history()[-1]["event_seq"] if dash.server.history() else 0
    dash.request("resume")
    assert epoch_steps(dash, mark) == math.ceil((N_TRAIN - 60) / BATCH)
    dash.request("pause")
    saved = dash.request("save_ckpt")
    plan = load_checkpoint(saved["path"])["data"]["sampling"]
    assert int(plan["dropped"].sum()) == 60 and plan["weights"] is None

    restored = dash.request("restore_samples", {"indices": dropped[:10]})
    assert restored["restored"] == 10 and restored["kept"] == N_TRAIN - 50
    assert dash.request("restore_samples", {"all": True})["kept"] == N_TRAIN
    assert session.sampling_plan is None  # nothing dropped, no weights: the user's loader again
    assert [e["cmd"] for e in dash.events("ledger_entry") if e["ok"]].count("drop_samples") == 1
    dash.request("resume")
    dash.wait_steps("baseline", dash.request("status")["step"] + 2)


def test_rollback_and_autopilot_rules(live, runtime):
    dash, run = live
    dash.request("resume")
    dash.wait_steps("baseline", 3)
    dash.request("pause")
    saved = dash.request("save_ckpt")
    saved_weights = load_checkpoint(saved["path"])["model"]
    dash.request("resume")
    dash.wait_steps("baseline", saved["step"] + 4)
    dash.request("pause")
    step = dash.request("status")["step"]
    assert any(not torch.equal(saved_weights[k], v) for k, v in weights(run.model).items())
    rolled = dash.request("rollback", {"before_step": saved["step"]})
    assert rolled["step"] == saved["step"] and rolled["at_step"] == step and Path(rolled["path"]) == Path(saved["path"])
    assert all(torch.equal(saved_weights[k], v) for k, v in weights(run.model).items())
    assert dash.request("status")["step"] == step  # the run keeps its position
    assert dash.wait("rolled_back")["step"] == saved["step"]
    for payload, code in (({}, "bad_payload"), ({"step": 1, "before_step": 1}, "bad_payload"),
                          ({"step": 99_999}, "not_found"), ({"path": "no-such.pt"}, "not_found")):
        assert dash.error("rollback", payload).code == code, payload

    rules = dash.request("autopilot", {"action": "set", "rules": [
        {"name": "spike", "kind": "loss_spike", "factor": 50.0}, {"name": "flat", "kind": "val_plateau"}]})
    assert [r["name"] for r in rules["rules"]] == ["spike", "flat"] and rules["watching"] is True
    off = dash.request("autopilot", {"action": "disable", "rule": "flat"})
    assert [r["enabled"] for r in off["rules"]] == [True, False]
    assert dash.request("autopilot", {"action": "list"})["rules"][1]["enabled"] is False
    assert dash.error("autopilot", {"action": "enable", "rule": "nope"}).code == "not_found"
    assert dash.error("autopilot", {"action": "set", "rules": [{"name": "x", "kind": "magic"}]}).code == "bad_payload"
    assert dash.error("autopilot", {"action": "set"}).code == "bad_payload"
    dash.request("resume")
    dash.wait_steps("baseline", step + 3)
    assert dash.request("autopilot", {"action": "clear"})["rules"] == []
    assert not [e for e in dash.events("ledger_entry") if e["origin"] == "autopilot"]  # nothing spiked
