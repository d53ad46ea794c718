"""router: registration, one place for payload validation, and handler failures as `failed`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import pytest

from onthefly.control.envelope import Request
from onthefly.control.errors import CommandError, ErrorCode, ProtocolError
from onthefly.control.router import CommandRouter, CommandSpec, validate_payload


@dataclass
class Selection:
    ids: list[int] = field(default_factory=list)
    quantile: Optional[tuple[float, float]] = None


@dataclass
class ForkPayload:
    parent_run_id: str = field(default="", metadata={"aliases": ("parentRunId", "runId")})
    selection: Selection = field(default_factory=Selection)
    hparams: dict[str, float] = field(default_factory=dict)
    mode: Literal["region", "all"] = "all"


@dataclass
class Everything:
    name: str
    count: int
    lr: float
    flag: bool
    anything: Any = None
    raw: dict = field(default_factory=dict)
    items: list = field(default_factory=list)
    maybe: int | None = None
    either: Union[int, str] = 0
    number: int | float = 0
    betas: tuple[float, ...] = ()


@dataclass
class Positive:
    steps: int = 1

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


@dataclass
class Node:
    name: str
    children: list["Node"] = field(default_factory=list)


def bad_payload(schema: type, payload: Any) -> str:
    with pytest.raises(ProtocolError) as info:
        validate_payload(schema, payload)
    assert info.value.code == ErrorCode.BAD_PAYLOAD
    return info.value.message


# ---- registration ---------------------------------------------------------------------------------


def test_register_spec_names_and_decorator():
    router = CommandRouter()
    router.register("status", lambda p: {"ok": True}, mutating=False, description="state")

    @router.command("fork", schema=ForkPayload, mutating=True)
    def fork(payload: ForkPayload) -> dict:
        return {"parent": payload.parent_run_id}

    assert fork(ForkPayload(parent_run_id="x")) == {"parent": "x"}  # returned unchanged
    assert router.names() == ["fork", "status"] and "fork" in router and len(router) == 2
    spec = router.spec("fork")
    assert isinstance(spec, CommandSpec) and spec.mutating and spec.schema is ForkPayload
    assert router.spec("status").description == "state"
    with pytest.raises(ValueError, match="command 'status' is already registered"):
        router.register("status", lambda p: None, mutating=False)
    with pytest.raises(ProtocolError) as info:
        router.spec("frok")
    assert info.value.code == ErrorCode.UNKNOWN_COMMAND
    assert info.value.message == "unknown command 'frok'; known: fork, status"


def test_register_rejects_bad_definitions():
    router = CommandRouter()
    with pytest.raises(ValueError, match="command name must be a non-empty string"):
        router.register("", lambda p: None, mutating=False)
    with pytest.raises(TypeError, match="handler for 'x' must be callable"):
        router.register("x", "nope", mutating=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="payload schema must be a dataclass type"):
        router.register("x", lambda p: None, schema=dict, mutating=False)

    @dataclass
    class Unsupported:
        when: set[int]

    with pytest.raises(TypeError, match="Unsupported.when: unsupported annotation"):
        router.register("x", lambda p: None, schema=Unsupported, mutating=False)

    @dataclass
    class IntKeys:
        table: dict[int, str]

    with pytest.raises(TypeError, match="dict keys must be str"):
        router.register("y", lambda p: None, schema=IntKeys, mutating=False)
    assert router.names() == []


# ---- validation -----------------------------------------------------------------------------------


def test_valid_payload_builds_the_dataclass_with_conversions():
    value = validate_payload(
        Everything,
        {
            "name": "n", "count": 3, "lr": 1, "flag": False, "anything": [1, {"a": None}],
            "raw": {"k": [1]}, "items": [1, "two"], "maybe": None, "either": "s", "number": 2,
            "betas": [0.9, 1], "_trace": "ignored extra key",
        },
    )
    assert value == Everything(
        name="n", count=3, lr=1.0, flag=False, anything=[1, {"a": None}], raw={"k": [1]},
        items=[1, "two"], maybe=None, either="s", number=2, betas=(0.9, 1.0),
    )
    assert type(value.lr) is float and type(value.number) is int  # int | float keeps an int an int


def test_nested_paths_are_named_in_errors():
    message = bad_payload(ForkPayload, {"selection": {"ids": [1, 2, 3, "4"]}})
    assert message == "payload.selection.ids[3]: expected int, got str"
    assert bad_payload(ForkPayload, {"selection": []}) == "payload.selection: expected object (Selection), got array"
    assert bad_payload(ForkPayload, {"hparams": {"lr": "fast"}}) == "payload.hparams.lr: expected float, got str"
    assert bad_payload(ForkPayload, {"selection": {"quantile": [0.1]}}) == (
        "payload.selection.quantile: expected [float, float], got an array of 1"
    )
    assert bad_payload(ForkPayload, {"selection": {"quantile": [0.1, True]}}) == (
        "payload.selection.quantile[1]: expected float, got bool"
    )
    assert bad_payload(ForkPayload, {"mode": "some"}) == "payload.mode: expected one of ['region', 'all'], got 'some'"


def test_scalar_type_rules():
    base = {"name": "n", "count": 1, "lr": 0.1, "flag": True}
    assert bad_payload(Everything, {**base, "count": 1.0}) == "payload.count: expected int, got float"
    assert bad_payload(Everything, {**base, "count": True}) == "payload.count: expected int, got bool"
    assert bad_payload(Everything, {**base, "lr": True}) == "payload.lr: expected float, got bool"
    assert bad_payload(Everything, {**base, "lr": "0.1"}) == "payload.lr: expected float, got str"
    assert bad_payload(Everything, {**base, "lr": 10**400}).endswith("is too large for a float")
    assert bad_payload(Everything, {**base, "flag": 1}) == "payload.flag: expected bool, got int"
    assert bad_payload(Everything, {**base, "name": None}) == "payload.name: expected str, got null"
    assert bad_payload(Everything, {**base, "raw": []}) == "payload.raw: expected object, got array"
    assert bad_payload(Everything, {**base, "items": {}}) == "payload.items: expected array, got object"
    assert bad_payload(Everything, {**base, "maybe": "x"}) == "payload.maybe: expected int, got str"
    assert bad_payload(Everything, {**base, "either": 1.5}) == "payload.either: expected int or str, got float"
    assert bad_payload(Everything, {**base, "betas": [0.9, "x"]}) == "payload.betas[1]: expected float, got str"


def test_required_fields_aliases_and_non_object_payloads():
    assert bad_payload(Everything, {"count": 1, "lr": 0.1, "flag": True}) == "payload.name: required field is missing"
    assert validate_payload(ForkPayload, {"runId": "r7"}).parent_run_id == "r7"
    assert validate_payload(ForkPayload, {"parentRunId": "a", "runId": "b"}).parent_run_id == "a"
    assert validate_payload(ForkPayload, {"parent_run_id": "c", "runId": "b"}).parent_run_id == "c"
    assert bad_payload(ForkPayload, {"runId": 5}) == "payload.runId: expected str, got int"
    assert bad_payload(ForkPayload, [1]) == "payload: expected object (ForkPayload), got array"

    @dataclass
    class NeedsRun:
        run_id: str = field(metadata={"aliases": ("runId",)})

    assert bad_payload(NeedsRun, {}) == "payload.run_id: required field is missing (also accepted as runId)"


def test_post_init_value_errors_are_bad_payload():
    assert validate_payload(Positive, {"steps": 2}).steps == 2
    assert bad_payload(Positive, {"steps": 0}) == "payload: steps must be >= 1, got 0"


def test_recursive_schema():
    tree = validate_payload(Node, {"name": "a", "children": [{"name": "b", "children": [{"name": "c"}]}]})
    assert tree.children[0].children[0] == Node("c")
    assert bad_payload(Node, {"name": "a", "children": [{"name": 1}]}) == "payload.children[0].name: expected str, got int"


# ---- validate + execute ---------------------------------------------------------------------------


def test_validate_carries_the_request_id_and_schema_less_payloads_pass_as_dicts():
    router = CommandRouter()
    router.register("fork", lambda p: p, schema=ForkPayload, mutating=True)
    router.register("status", lambda p: p, mutating=False)
    spec, payload = router.validate(Request("r1", "status", {"x": 1}))
    assert spec.name == "status" and payload == {"x": 1}
    spec, payload = router.validate(Request("r2", "fork", {"runId": "p"}))
    assert payload == ForkPayload(parent_run_id="p")
    for request, code in (
        (Request("r3", "fork", {"mode": 1}), ErrorCode.BAD_PAYLOAD),
        (Request("r4", "nope", {}), ErrorCode.UNKNOWN_COMMAND),
    ):
        with pytest.raises(ProtocolError) as info:
            router.validate(request)
        assert (info.value.code, info.value.request_id) == (code, request.id)


def test_execute_runs_handlers_and_wraps_failures():
    router = CommandRouter()
    router.register("ok", lambda p: {"echo": p}, mutating=False)
    router.register("boom", lambda p: 1 / 0, mutating=False)

    def not_paused(payload: dict) -> None:
        raise CommandError("model must be paused before report", ErrorCode.NOT_PAUSED)

    router.register("report", not_paused, mutating=False)
    assert router.execute(router.spec("ok"), {"a": 1}) == {"echo": {"a": 1}}
    with pytest.raises(ProtocolError) as info:
        router.execute(router.spec("boom"), {})
    assert info.value.code == ErrorCode.FAILED
    assert info.value.message == "boom failed: ZeroDivisionError: division by zero"
    assert isinstance(info.value.__cause__, ZeroDivisionError)  # kept for a debug traceback
    with pytest.raises(CommandError) as info:
        router.execute(router.spec("report"), {})
    assert info.value.code == ErrorCode.NOT_PAUSED
