"""Value constraints on payload fields, declared with `typing.Annotated`, and the wire-wide defaults.

A payload schema says more than a type: `Annotated[float, Range(gt=0)]` for a learning rate,
`Annotated[list[int], Length(max=1_000_000)]` for an index list, `Annotated[str, SafeName]` for a
run id that becomes a folder name. The router checks them after converting the value, and every
violation is a `bad_payload` naming the field path and the rule (`payload.hparams.lr: must be
> 0, got -1.0`).

Two defaults hold for every payload, declared or not: floats are finite (JSON has no NaN or
Infinity, but Python's parser turns `1e999` into `inf`), and integers fit in a signed 64-bit
integer (what torch, numpy and SQLite can hold), so no handler ever meets an `OverflowError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import ConstraintViolation
from .names import check_safe_name

__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "ConstraintViolation",
    "Length",
    "Range",
    "SafeName",
    "check_json_numbers",
    "check_number",
    "is_constraint",
]

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
_SHOWN_DIGITS = 24


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Range:
    """Bounds on an int or float field: `ge` (>=), `gt` (>), `le` (<=), `lt` (<); any subset."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __post_init__(self) -> None:
        bounds = {name: getattr(self, name) for name in ("ge", "gt", "le", "lt")}
        given = {name: bound for name, bound in bounds.items() if bound is not None}
        if not given:
            raise ValueError("Range() needs at least one of ge, gt, le, lt")
        for name, bound in given.items():
            if not _is_number(bound) or not math.isfinite(bound):
                raise ValueError(f"Range.{name} must be a finite number, got {bound!r}")
        if self.ge is not None and self.gt is not None or self.le is not None and self.lt is not None:
            raise ValueError("Range: give at most one lower bound (ge or gt) and one upper bound (le or lt)")
        low = self.ge if self.ge is not None else self.gt
        high = self.le if self.le is not None else self.lt
        if low is not None and high is not None and low > high:
            raise ValueError(f"Range: the lower bound {low} is above the upper bound {high}")

    def check(self, value: Any, path: str) -> None:
        """Raise `ConstraintViolation` unless `value` lies within the bounds."""
        for symbol, bound, ok in (
            (">=", self.ge, lambda b: value >= b),
            (">", self.gt, lambda b: value > b),
            ("<=", self.le, lambda b: value <= b),
            ("<", self.lt, lambda b: value < b),
        ):
            if bound is not None and not ok(bound):
                raise ConstraintViolation(path, f"must be {symbol} {_number(bound)}, got {_number(value)}")

    def json_schema(self) -> dict[str, Any]:
        keys = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}
        return {keys[name]: getattr(self, name) for name in keys if getattr(self, name) is not None}


@dataclass(frozen=True)
class Length:
    """Bounds on the length of a str (characters), list/tuple (items) or object (keys)."""

    min: int | None = None
    max: int | None = None

    def __post_init__(self) -> None:
        if self.min is None and self.max is None:
            raise ValueError("Length() needs min, max or both")
        for name in ("min", "max"):
            bound = getattr(self, name)
            if bound is not None and (not isinstance(bound, int) or isinstance(bound, bool) or bound < 0):
                raise ValueError(f"Length.{name} must be an integer >= 0, got {bound!r}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"Length: min {self.min} is above max {self.max}")

    def check(self, value: Any, path: str) -> None:
        """Raise `ConstraintViolation` unless `len(value)` lies within the bounds."""
        unit = "characters" if isinstance(value, str) else "keys" if isinstance(value, dict) else "items"
        size = len(value)
        if self.min is not None and size < self.min:
            raise ConstraintViolation(path, f"must have at least {self.min} {unit}, got {size}")
        if self.max is not None and size > self.max:
            raise ConstraintViolation(path, f"must have at most {self.max} {unit}, got {size}")

    def json_schema(self, json_type: str) -> dict[str, Any]:
        low, high = {"string": ("minLength", "maxLength"), "object": ("minProperties", "maxProperties")}.get(
            json_type, ("minItems", "maxItems")
        )
        schema: dict[str, Any] = {}
        if self.min is not None:
            schema[low] = self.min
        if self.max is not None:
            schema[high] = self.max
        return schema


class SafeName:
    """Marks a str field whose value becomes one file-system path component (see `names`).

    Use the class itself or an instance: `Annotated[str, SafeName]`.
    """

    @staticmethod
    def check(value: Any, path: str) -> None:
        check_safe_name(value, path)


def is_constraint(meta: Any) -> bool:
    """True for the `Annotated` metadata the router enforces (other metadata is left alone)."""
    return isinstance(meta, (Range, Length, SafeName)) or meta is SafeName


def check_number(value: Any, path: str) -> None:
    """The defaults for one number: a float must be finite, an int must fit in int64."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConstraintViolation(path, f"must be a finite number, got {value}")
    elif isinstance(value, int) and not isinstance(value, bool):
        if not INT64_MIN <= value <= INT64_MAX:
            raise ConstraintViolation(
                path, f"must fit in a 64-bit signed integer (-2**63 .. 2**63-1), got {_number(value)}"
            )


def check_json_numbers(value: Any, path: str) -> None:
    """Apply `check_number` to every number inside an untyped (`Any`, `dict`, `list`) value.

    Iterative, so a deeply nested value the JSON parser accepted cannot exhaust the stack here.
    """
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, dict):
            stack.extend((child, f"{where}.{key}") for key, child in item.items())
        elif isinstance(item, (list, tuple)):
            stack.extend((child, f"{where}[{index}]") for index, child in enumerate(item))
        elif _is_number(item):
            check_number(item, where)


def _number(value: Any) -> str:
    """A number as a message shows it; huge integers by their size, not their 4,000 digits."""
    if isinstance(value, int) and not isinstance(value, bool):
        if abs(value) < 10**_SHOWN_DIGITS:
            return str(value)
        digits = int(abs(value).bit_length() * math.log10(2)) + 1
        return f"{'-' if value < 0 else ''}an integer of about {digits} digits"
    return repr(value)
