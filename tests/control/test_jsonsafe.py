"""jsonsafe: every value the training side may hand us becomes one strict JSON line."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import types

import numpy as np
import pytest

from onthefly.control.jsonsafe import encode_line, to_jsonable


def strict_loads(line: bytes) -> object:
    """Decode one wire line, refusing NaN/Infinity and anything but exactly one line."""
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    def refuse(name: str) -> None:
        raise AssertionError(f"non-standard constant {name} on the wire")

    return json.loads(line.decode("utf-8"), parse_constant=refuse)


@dataclasses.dataclass
class Point:
    x: float
    tags: tuple


def test_non_finite_floats_become_null_at_any_depth():
    obj = {"a": float("nan"), "b": [1.0, float("inf"), {"c": -math.inf}], "d": (float("nan"),)}
    assert to_jsonable(obj) == {"a": None, "b": [1.0, None, {"c": None}], "d": [None]}
    assert strict_loads(encode_line(obj)) == {"a": None, "b": [1.0, None, {"c": None}], "d": [None]}


def test_numpy_scalars_and_arrays_become_python_values():
    obj = {
        "f32": np.float32(1.5),
        "f64": np.float64(2.25),
        "i64": np.int64(7),
        "flag": np.bool_(True),
        "arr": np.array([[1.0, np.nan], [np.inf, 4.0]]),
        "zero_d": np.array(3),
    }
    expected = {"f32": 1.5, "f64": 2.25, "i64": 7, "flag": True, "arr": [[1.0, None], [None, 4.0]], "zero_d": 3}
    assert to_jsonable(obj) == expected
    decoded = strict_loads(encode_line(obj))
    assert decoded == expected
    assert type(decoded["i64"]) is int and type(decoded["flag"]) is bool


def test_torch_tensors_become_python_values():
    torch = pytest.importorskip("torch")  # installed with the package; only this test imports it
    obj = {
        "scalar": torch.tensor(0.5),
        "vec": torch.tensor([1, 2, 3]),
        "bad": torch.tensor([1.0, float("inf"), float("nan")]),
        "nested": [torch.tensor(2)],
    }
    expected = {"scalar": 0.5, "vec": [1, 2, 3], "bad": [1.0, None, None], "nested": [2]}
    assert to_jsonable(obj) == expected
    assert strict_loads(encode_line(obj)) == expected


def test_containers_paths_bytes_dataclasses_and_unknown_objects():
    class Thing:
        def __str__(self) -> str:
            return "a thing"

    obj = {
        "dc": Point(x=float("nan"), tags=("a", "b")),
        "proxy": types.MappingProxyType({"k": 1}),
        "set": {3},
        "frozen": frozenset({4}),
        "path": pathlib.Path("/tmp/x.pt"),
        "bytes": b"ok\xff",
        "thing": Thing(),
        2: "int key",
        None: "none key",
        True: "bool key",
    }
    expected = {
        "dc": {"x": None, "tags": ["a", "b"]},
        "proxy": {"k": 1},
        "set": [3],
        "frozen": [4],
        "path": "/tmp/x.pt",
        "bytes": "ok\ufffd",
        "thing": "a thing",
        "2": "int key",
        "null": "none key",
        "true": "bool key",
    }
    assert to_jsonable(obj) == expected
    assert strict_loads(encode_line(obj)) == expected


def test_encode_line_is_compact_utf8_and_one_line():
    line = encode_line({"text": "héllo\nworld €", "n": 1})
    assert line == '{"text":"héllo\\nworld €","n":1}\n'.encode("utf-8")


def test_fast_path_output_matches_plain_json_dumps():
    obj = {"type": "trainStep", "step": 3, "loss": 0.25, "ok": True, "none": None, "l": [1, 2]}
    expected = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
    assert encode_line(obj) == expected


def test_cyclic_event_becomes_an_error_log_keeping_its_seq():
    event: dict = {"type": "trainStep", "event_seq": 42, "run_id": "r1", "ts": 1.5}
    event["self"] = event
    decoded = strict_loads(encode_line(event))
    assert decoded["type"] == "log" and decoded["level"] == "error"
    assert "unserialisable 'trainStep' event" in decoded["text"]
    assert (decoded["event_seq"], decoded["run_id"], decoded["ts"]) == (42, "r1", 1.5)


def test_cyclic_reply_becomes_an_error_reply_for_the_same_id():
    data: list = []
    data.append(data)
    decoded = strict_loads(encode_line({"id": "req-1", "ok": True, "data": data}))
    assert decoded["id"] == "req-1" and decoded["ok"] is False and decoded["code"] == "failed"
    assert decoded["error"].startswith("unserialisable reply")


def test_broken_str_and_tolist_do_not_raise():
    class BadStr:
        def __str__(self) -> str:
            raise RuntimeError("no str for you")

    class BadToList:
        def tolist(self):
            raise RuntimeError("device lost")

    decoded = strict_loads(encode_line({"a": BadStr(), "b": BadToList()}))
    assert decoded["a"] == "<unprintable BadStr: RuntimeError: no str for you>"
    assert decoded["b"] == "<unprintable BadToList: RuntimeError: device lost>"


def test_lone_surrogates_are_escaped_so_the_line_stays_valid_utf8():
    line = encode_line({"path": "bad\udcff.txt"})
    line.decode("utf-8")  # strict: raises if the bytes are not UTF-8
    assert strict_loads(line) == {"path": "bad\udcff.txt"}


def test_top_level_scalars_and_objects_with_tolist_returning_self():
    class SelfList:
        def tolist(self):
            return self

        def __str__(self) -> str:
            return "selfish"

    assert encode_line(float("inf")) == b"null\n"
    assert encode_line(SelfList()) == b'"selfish"\n'
    assert to_jsonable(SelfList()) == "selfish"
