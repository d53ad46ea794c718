"""set_hparams beyond the typed keys: any param-group key, per group, validated against the real optimizer,
all or nothing; and the router's extra-keys field that lets it see keys it does not declare."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

import pytest
import torch

from onthefly.control.constraints import Range
from onthefly.control.errors import ProtocolError
from onthefly.control.router import CommandRouter, validate_payload
from onthefly.control.schema import payload_json_schema
from onthefly.session.native import OnTheFlySession


@dataclass
class WithExtras:
    name: str = "x"
    rest: dict[str, Annotated[float, Range(ge=0)]] = field(default_factory=dict, metadata={"extra_keys": True})


def test_the_extra_keys_field_gets_every_undeclared_key_checked():
    built = validate_payload(WithExtras, {"name": "y", "alpha": 1, "beta": 2.5, "_trace": "ignored"})
    assert built.name == "y" and built.rest == {"alpha": 1.0, "beta": 2.5}
    with pytest.raises(ProtocolError, match=r"payload.alpha: must be >= 0, got -1.0"):
        validate_payload(WithExtras, {"alpha": -1})
    with pytest.raises(ProtocolError, match=r"payload.beta: expected float, got str"):
        validate_payload(WithExtras, {"beta": "fast"})
    schema = payload_json_schema(WithExtras)
    assert "rest" not in schema["properties"] and schema["additionalProperties"] == {"type": "number", "minimum": 0}


def test_a_schema_with_a_bad_extra_keys_field_is_refused_at_registration():
    @dataclass
    class Bad:
        rest: list = field(default_factory=list, metadata={"extra_keys": True})

    with pytest.raises(TypeError, match="extra-keys field must be a dict"):
        CommandRouter().register("bad", lambda p: p, schema=Bad, mutating=False)


class TwoKnobs(torch.optim.Optimizer):
    """A custom optimizer with its own keys: a float `gain` and an integer `every`."""

    def __init__(self, params: Any, lr: float = 0.1, gain: float = 1.0, every: int = 1) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        super().__init__(params, {"lr": lr, "gain": gain, "every": every})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"] * group["gain"])
        return loss


@pytest.fixture
def session(tmp_path):
    with OnTheFlySession(transport="off", save_dir=str(tmp_path)) as s:
        yield s


def bind(session: OnTheFlySession, optimizer: torch.optim.Optimizer, model: torch.nn.Module, scheduler=None) -> None:
    session.model, session.optimizer, session.scheduler = model, optimizer, scheduler


def test_per_group_edits_and_scales_on_two_groups(session):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW([{"params": model[0].parameters(), "lr": 0.1},
                             {"params": model[1].parameters(), "lr": 0.01, "weight_decay": 0.5}])
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    bind(session, opt, model, scheduler)
    reply = session.call("set_hparams", {"group": 1, "lr": 0.002, "eps": 1e-6})
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.002] and opt.param_groups[1]["eps"] == 1e-6
    assert opt.param_groups[0]["eps"] == 1e-8 and reply["param_groups"][1]["lr"] == 0.002
    assert scheduler.base_lrs == [0.1, 0.002]  # the schedule continues from the new values
    session.call("set_hparams", {"lr_scale": 0.5})
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.001]
    session.call("set_hparams", {"betas": [0.8, 0.99], "group": 0})
    assert opt.param_groups[0]["betas"] == (0.8, 0.99) and opt.param_groups[1]["betas"] == (0.9, 0.999)


def test_custom_optimizer_keys_are_validated_against_their_kind_and_the_constructor(session):
    model = torch.nn.Linear(4, 2)
    opt = TwoKnobs(model.parameters())
    bind(session, opt, model)
    assert session.call("set_hparams", {"gain": 2, "every": 3})["param_groups"][0] == {
        "lr": 0.1, "gain": 2.0, "every": 3}
    for payload, words in (({"every": 2.5}, "holds an integer"), ({"every": 0}, "every must be >= 1"),
                           ({"gain": [1, 2]}, "holds a number"), ({"momentum": 0.9}, "has no 'momentum'"),
                           ({"gain": 3.0, "every": 0}, "every must be >= 1")):
        with pytest.raises(ProtocolError, match=words) as caught:
            session.call("set_hparams", payload)
        assert caught.value.code == "bad_payload"
    assert opt.param_groups[0]["gain"] == 2.0 and opt.param_groups[0]["every"] == 3  # nothing half-applied


def test_tensor_values_and_implementation_keys_are_refused(session):
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01), foreach=False)
    bind(session, opt, model)
    for payload, words in (({"lr": 0.1}, "holds a tensor"), ({"lr_scale": 0.5}, "tensor lr"),
                           ({"foreach": True}, "implementation"), ({"initial_lr": 0.3}, "cannot change")):
        with pytest.raises(ProtocolError, match=words):
            session.call("set_hparams", payload)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.01)


def test_set_hparams_without_an_optimizer_is_not_found(session):
    with pytest.raises(ProtocolError) as caught:
        session.call("set_hparams", {"lr": 0.1})
    assert caught.value.code == "not_found"
