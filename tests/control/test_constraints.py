"""Payload constraints: Range/Length/SafeName, the finite-float and int64 defaults, and describe()."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Optional, Union

import pytest

from onthefly.control import (
    CommandRouter,
    ConstraintViolation,
    ErrorCode,
    Length,
    ProtocolError,
    Range,
    SafeName,
    UnsafeName,
    check_safe_name,
    parse_request,
    validate_payload,
)
from onthefly.control.names import MAX_NAME_LENGTH, SAFE_NAME_PATTERN

PositiveFloat = Annotated[float, Range(gt=0)]


@dataclass
class Hparams:
    lr: Optional[PositiveFloat] = None
    momentum: Optional[Annotated[float, Range(ge=0, lt=1)]] = None
    betas: Optional[list[Annotated[float, Range(ge=0, lt=1)]]] = None


@dataclass
class Fork:
    run_id: Annotated[str, SafeName] = field(metadata={"aliases": ("runId",)})
    hparams: Optional[Hparams] = None
    ids: Annotated[list[int], Length(max=3)] = field(default_factory=list)
    label: Annotated[str, Length(min=1, max=8)] = "x"
    mode: Literal["all", "region"] = "all"
    steps: int = 0
    extra: Any = None
    raw: dict = field(default_factory=dict)
    either: Union[Annotated[int, Range(ge=0)], str] = 0


def bad(schema: type, payload: Any) -> str:
    with pytest.raises(ProtocolError) as info:
        validate_payload(schema, payload)
    assert info.value.code == ErrorCode.BAD_PAYLOAD
    return info.value.message


# ---- declared constraints ------------------------------------------------------------------------


def test_range_bounds_name_the_field_path_and_rule():
    assert validate_payload(Fork, {"run_id": "r", "hparams": {"lr": 0.5}}).hparams.lr == 0.5
    assert bad(Fork, {"run_id": "r", "hparams": {"lr": -1.0}}) == "payload.hparams.lr: must be > 0, got -1.0"
    assert bad(Fork, {"run_id": "r", "hparams": {"lr": 0}}) == "payload.hparams.lr: must be > 0, got 0.0"
    assert bad(Fork, {"run_id": "r", "hparams": {"momentum": 1.0}}) == "payload.hparams.momentum: must be < 1, got 1.0"
    assert bad(Fork, {"run_id": "r", "hparams": {"momentum": -0.1}}) == (
        "payload.hparams.momentum: must be >= 0, got -0.1"
    )
    assert bad(Fork, {"run_id": "r", "hparams": {"betas": [0.9, 1.0]}}) == (
        "payload.hparams.betas[1]: must be < 1, got 1.0"
    )
    assert validate_payload(Fork, {"run_id": "r", "hparams": {"lr": None}}).hparams.lr is None  # Optional


def test_length_bounds_for_lists_and_strings():
    assert validate_payload(Fork, {"run_id": "r", "ids": [1, 2, 3]}).ids == [1, 2, 3]
    assert bad(Fork, {"run_id": "r", "ids": [1, 2, 3, 4]}) == "payload.ids: must have at most 3 items, got 4"
    assert bad(Fork, {"run_id": "r", "label": ""}) == "payload.label: must have at least 1 characters, got 0"
    assert bad(Fork, {"run_id": "r", "label": "x" * 9}) == "payload.label: must have at most 8 characters, got 9"


def test_safe_name_refuses_rather_than_rewrites():
    assert validate_payload(Fork, {"runId": "fork1"}).run_id == "fork1"
    assert bad(Fork, {"run_id": "/tmp/x"}) == (
        "payload.run_id: '/tmp/x' is not a safe name: it contains the path separator '/'"
    )
    assert bad(Fork, {"runId": "../../x"}).startswith("payload.runId: '../../x' is not a safe name")


def test_a_union_reports_the_constraint_an_arm_of_the_right_type_broke():
    assert validate_payload(Fork, {"run_id": "r", "either": "s"}).either == "s"
    assert bad(Fork, {"run_id": "r", "either": -1}) == "payload.either: must be >= 0, got -1"
    assert bad(Fork, {"run_id": "r", "either": 1.5}) == "payload.either: expected int or str, got float"


def test_constraints_must_sit_on_a_type_they_can_check():
    @dataclass
    class RangeOnStr:
        name: Annotated[str, Range(gt=0)] = "x"

    @dataclass
    class SafeNameOnInt:
        n: Annotated[int, SafeName] = 0

    @dataclass
    class LengthOnFloat:
        x: Annotated[Optional[float], Length(max=2)] = None

    router = CommandRouter()
    for schema, message in (
        (RangeOnStr, "RangeOnStr.name: Range applies to int or float"),
        (SafeNameOnInt, "SafeNameOnInt.n: SafeName applies to str"),
        (LengthOnFloat, "LengthOnFloat.x: Length applies to str, list, tuple or dict"),
    ):
        with pytest.raises(TypeError, match=re.escape(message)):
            router.register("x", lambda p: None, schema=schema, mutating=False)
    with pytest.raises(ValueError, match="needs at least one of ge, gt, le, lt"):
        Range()
    with pytest.raises(ValueError, match="at most one lower bound"):
        Range(ge=0, gt=0)
    with pytest.raises(ValueError, match="must be a finite number"):
        Range(le=float("inf"))
    with pytest.raises(ValueError, match="min 3 is above max 2"):
        Length(min=3, max=2)


# ---- defaults every payload obeys ----------------------------------------------------------------


def test_non_finite_floats_are_refused_everywhere():
    # Python's json turns an out-of-range literal into inf; NaN/Infinity tokens never parse.
    request = parse_request('{"id":"1","cmd":"fork","payload":{"run_id":"r","hparams":{"lr":1e999}}}')
    assert request.payload["hparams"]["lr"] == float("inf")
    assert bad(Fork, request.payload) == "payload.hparams.lr: must be a finite number, got inf"
    for token in ("NaN", "Infinity", "-Infinity"):
        with pytest.raises(ProtocolError) as info:
            parse_request('{"id":"1","cmd":"x","payload":{"lr":%s}}' % token)
        assert info.value.code == ErrorCode.BAD_JSON
    # Untyped parts of a payload are walked too, with the path of the offending number.
    assert bad(Fork, {"run_id": "r", "extra": {"a": [1, float("inf")]}}) == (
        "payload.extra.a[1]: must be a finite number, got inf"
    )
    assert bad(Fork, {"run_id": "r", "raw": {"k": float("-inf")}}) == "payload.raw.k: must be a finite number, got -inf"
    assert bad(Fork, {"run_id": "r", "hparams": {"lr": 10**400}}) == (
        "payload.hparams.lr: must be a finite number; this integer is too large for a float"
    )


def test_ints_must_fit_in_int64():
    assert validate_payload(Fork, {"run_id": "r", "steps": 2**63 - 1}).steps == 2**63 - 1
    assert bad(Fork, {"run_id": "r", "steps": 2**63}) == (
        "payload.steps: must fit in a 64-bit signed integer (-2**63 .. 2**63-1), got 9223372036854775808"
    )
    assert bad(Fork, {"run_id": "r", "steps": -(10**300)}) == (
        "payload.steps: must fit in a 64-bit signed integer (-2**63 .. 2**63-1), "
        "got -an integer of about 301 digits"
    )
    assert bad(Fork, {"run_id": "r", "extra": [2**64]}).startswith("payload.extra[0]: must fit in a 64-bit")


def test_schema_less_commands_get_the_defaults_too():
    router = CommandRouter()
    router.register("raw", lambda p: p, mutating=False)
    request = parse_request('{"id":"7","cmd":"raw","payload":{"x":[1e999]}}')
    with pytest.raises(ProtocolError) as info:
        router.validate(request)
    assert (info.value.code, info.value.request_id) == (ErrorCode.BAD_PAYLOAD, "7")
    assert info.value.message == "payload.x[0]: must be a finite number, got inf"


def test_internal_exceptions_of_post_init_are_bad_payload():
    @dataclass
    class Picky:
        ids: list[int] = field(default_factory=list)

        def __post_init__(self) -> None:
            self.first = self.ids[0]  # IndexError on []
            self.inverse = 1 / (self.first - 1.0)  # ZeroDivisionError is not caught: a real bug
            float(10**400 if self.first == 2 else 0)  # OverflowError

    assert bad(Picky, {"ids": []}) == "payload: list index out of range"
    assert bad(Picky, {"ids": [2]}) == "payload: int too large to convert to float"


def test_deeply_nested_untyped_values_do_not_exhaust_the_stack():
    deep: Any = 1.0
    for _ in range(50_000):
        deep = [deep]
    assert validate_payload(Fork, {"run_id": "r", "extra": deep}).extra is deep
    deep_bad: Any = float("nan")
    for _ in range(50_000):
        deep_bad = [deep_bad]
    assert bad(Fork, {"run_id": "r", "extra": deep_bad}).endswith("must be a finite number, got nan")


# ---- the one safe-name rule ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, rule",
    [
        ("", "it is empty"),
        (".", "'.' and '..' name folders"),
        ("..", "'.' and '..' name folders"),
        ("a/b", "path separator '/'"),
        ("a\\b", "path separator '\\\\'"),
        ("a\x00b", "NUL byte"),
        ("a\nb", "control character '\\n'"),
        ("a\x7fb", "control character"),
        (".bashrc", "starts with '.'"),
        ("-rf", "starts with '-'"),
        ("run.", "ends with '.'"),
        ("x" * (MAX_NAME_LENGTH + 1), "121 characters long, at most 120"),
        ("my run", "contains ' '"),
        ("r\u00e9sum\u00e9", "contains '\u00e9'"),
        ("a:b", "contains ':'"),
        ("NUL", "device name on Windows"),
        ("com1.txt", "device name on Windows"),
        (5, "expected a string, got int"),
    ],
)
def test_check_safe_name_refuses(value, rule):
    with pytest.raises(UnsafeName) as info:
        check_safe_name(value, "payload.run_id")
    error = info.value
    assert isinstance(error, ConstraintViolation) and isinstance(error, ValueError)
    assert error.code == ErrorCode.BAD_PAYLOAD and error.field == "payload.run_id"
    assert error.message.startswith("payload.run_id: ") and rule in error.message
    assert re.fullmatch(SAFE_NAME_PATTERN, value if isinstance(value, str) else "") is None or rule.startswith("device")


@pytest.mark.parametrize("value", ["baseline", "fork12", "merge-3", "a.b", "x" * MAX_NAME_LENGTH, "_x", "v1+2"])
def test_check_safe_name_accepts_and_returns_unchanged(value):
    assert check_safe_name(value, "payload.run_id") is value
    assert re.fullmatch(SAFE_NAME_PATTERN, value)


# ---- describe(): every command's payload as JSON Schema ------------------------------------------


@dataclass
class Node:
    name: str
    children: list["Node"] = field(default_factory=list)


def test_describe_renders_types_required_defaults_enums_aliases_and_constraints():
    router = CommandRouter()
    router.register("fork", lambda p: p, schema=Fork, mutating=True, description="fork a run")
    router.register("status", lambda p: p, mutating=False)
    router.register("tree", lambda p: p, schema=Node, mutating=False)
    described = router.describe()
    assert list(described) == ["fork", "status", "tree"]
    fork = described["fork"]
    assert fork["description"] == "fork a run" and fork["mutating"] is True
    schema = fork["payload"]
    assert schema["type"] == "object" and schema["required"] == ["run_id"]
    props = schema["properties"]
    assert props["run_id"]["x-aliases"] == ["runId"] and props["run_id"]["x-safe-name"] is True
    assert props["run_id"]["pattern"] == SAFE_NAME_PATTERN and props["run_id"]["maxLength"] == 120
    assert props["mode"] == {"enum": ["all", "region"], "type": "string", "default": "all"}
    assert props["ids"] == {"type": "array", "items": {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1},
                            "maxItems": 3, "default": []}
    assert props["label"] == {"type": "string", "minLength": 1, "maxLength": 8, "default": "x"}
    assert props["steps"]["default"] == 0 and props["steps"]["type"] == "integer"
    assert props["extra"] == {"default": None}
    hparams = schema["$defs"]["Hparams"]["properties"]
    lr = hparams["lr"]["anyOf"]
    assert lr == [{"type": "number", "exclusiveMinimum": 0}, {"type": "null"}]
    assert hparams["momentum"]["anyOf"][0] == {"type": "number", "minimum": 0, "exclusiveMaximum": 1}
    assert hparams["betas"]["anyOf"][0]["items"] == {"type": "number", "minimum": 0, "exclusiveMaximum": 1}
    assert props["hparams"]["anyOf"][0] == {"$ref": "#/$defs/Hparams"}
    assert props["either"]["anyOf"][0] == {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}
    assert described["status"]["payload"]["type"] == "object"
    tree = described["tree"]["payload"]
    assert tree["properties"]["children"]["items"] == {"$ref": "#/$defs/Node"}  # recursion by reference
    document = router.json_schema()
    assert document["$schema"].endswith("2020-12/schema") and document["commands"] == described
    json.dumps(document, allow_nan=False)  # plain, strict JSON
