"""The command router: one handler per command, each with a declared payload schema.

Payloads are validated here, in one place, against a dataclass, so every command reports a bad
payload the same way: `bad_payload` naming the field path, what was expected and what was got
(`payload.selection.ids[3]: expected int, got str`), or the rule a value broke (`payload.lr:
must be > 0, got -1.0`; see `constraints` for `Range`, `Length`, `SafeName` and the defaults
every payload obeys). Handler failures become `failed`. `describe()` publishes every command's
payload as JSON Schema, for fuzzers and agents.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Union

from .constraints import ConstraintViolation, Length, Range, SafeName, check_json_numbers, check_number, is_constraint
from .envelope import Request, json_type_name
from .errors import ErrorCode, ProtocolError
from .schema import JSON_SCHEMA_DIALECT, payload_fields, payload_json_schema

__all__ = ["CommandRouter", "CommandSpec", "validate_payload"]

_NoneType = type(None)
_Annotated = Annotated
_SIMPLE = (str, int, float, bool, dict, list, tuple)


@dataclass(frozen=True)
class CommandSpec:
    """A registered command: its handler, payload schema and where it must run."""

    name: str
    handler: Callable[[Any], Any]
    schema: type | None
    mutating: bool
    description: str = ""


class CommandRouter:
    """Maps command names to `CommandSpec`s; validates payloads and runs handlers."""

    def __init__(self) -> None:
        self._specs: dict[str, CommandSpec] = {}

    def register(
        self,
        name: str,
        handler: Callable[[Any], Any],
        *,
        schema: type | None = None,
        mutating: bool,
        description: str = "",
    ) -> None:
        """Register `handler` for `name`; a second registration of a name is a `ValueError`."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"command name must be a non-empty string, got {name!r}")
        if not callable(handler):
            raise TypeError(f"handler for {name!r} must be callable, got {type(handler).__name__}")
        if not isinstance(mutating, bool):
            raise TypeError(f"mutating for {name!r} must be a bool, got {mutating!r}")
        if schema is not None:
            check_schema(schema)
        if name in self._specs:
            raise ValueError(f"command {name!r} is already registered")
        self._specs[name] = CommandSpec(name, handler, schema, mutating, description)

    def command(
        self, name: str, *, schema: type | None = None, mutating: bool, description: str = ""
    ) -> Callable[[Callable[[Any], Any]], Callable[[Any], Any]]:
        """Decorator form of `register`; returns the function unchanged."""

        def decorate(handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
            self.register(name, handler, schema=schema, mutating=mutating, description=description)
            return handler

        return decorate

    def spec(self, name: str) -> CommandSpec:
        """The spec for `name`; `unknown_command` naming the known ones when there is none."""
        try:
            return self._specs[name]
        except KeyError:
            known = ", ".join(sorted(self._specs)) or "(none)"
            raise ProtocolError(
                ErrorCode.UNKNOWN_COMMAND, f"unknown command {name!r}; known: {known}"
            ) from None

    def validate(self, request: Request) -> tuple[CommandSpec, Any]:
        """The spec and validated payload for `request`; errors carry the request id."""
        try:
            spec = self.spec(request.cmd)
            if spec.schema is None:
                check_json_numbers(request.payload, "payload")
                return spec, dict(request.payload)
            return spec, validate_payload(spec.schema, request.payload)
        except ProtocolError as exc:
            exc.request_id = request.id
            raise

    def execute(self, spec: CommandSpec, payload: Any) -> Any:
        """Run the handler; a non-protocol exception becomes `failed` (original as `__cause__`)."""
        try:
            return spec.handler(payload)
        except ProtocolError:
            raise
        except Exception as exc:
            raise ProtocolError(
                ErrorCode.FAILED, f"{spec.name} failed: {type(exc).__name__}: {exc}"
            ) from exc

    def names(self) -> list[str]:
        """Registered command names, sorted."""
        return sorted(self._specs)

    def describe(self) -> dict[str, dict[str, Any]]:
        """Every command: `{description, mutating, payload}`, `payload` being its JSON Schema.

        The schema carries what validation enforces: types, `required`, `default`s, `enum`s
        (from `Literal`), `x-aliases`, numeric bounds, lengths and the safe-name `pattern`.
        """
        return {
            name: {
                "description": spec.description,
                "mutating": spec.mutating,
                "payload": payload_json_schema(spec.schema),
            }
            for name, spec in sorted(self._specs.items())
        }

    def json_schema(self) -> dict[str, Any]:
        """`describe()` as one JSON Schema document: `{"$schema", "commands": {name: ...}}`."""
        return {"$schema": JSON_SCHEMA_DIALECT, "commands": self.describe()}

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __len__(self) -> int:
        return len(self._specs)


# ---- payload validation ---------------------------------------------------------------------


def validate_payload(schema: type, payload: Mapping[str, Any]) -> Any:
    """Build an instance of dataclass `schema` from `payload`, checking every field's type.

    Required fields (no default) must be present; unknown keys are ignored, unless one field
    has `metadata={"extra_keys": True}` (a `dict[str, T]`): it then receives every undeclared
    key not starting with `_`, each checked as a `T`. A field's `metadata={"aliases": (...)}`
    names keys that fill it when the canonical key is absent.
    `Annotated` constraints are checked after conversion, and every float must be finite and
    every int fit in int64. A `ValueError`, `TypeError`, `OverflowError` or `IndexError` raised
    by the schema's `__post_init__` is reported as `bad_payload` too: validation never lets an
    internal exception out for a value that came from the wire.
    """
    check_schema(schema)
    try:
        return _build(schema, payload, "payload")
    except RecursionError:
        raise ProtocolError(ErrorCode.BAD_PAYLOAD, "payload: nested too deeply") from None
    except ProtocolError:
        raise
    except (OverflowError, TypeError, IndexError, ValueError) as exc:  # last line of defence
        raise ProtocolError(
            ErrorCode.BAD_PAYLOAD, f"payload: could not be validated ({type(exc).__name__}: {exc})"
        ) from exc


def check_schema(schema: type) -> None:
    """Raise `TypeError` unless `schema` is a dataclass whose annotations we can validate."""
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        raise TypeError(f"a payload schema must be a dataclass type, got {schema!r}")
    if schema not in _CHECKED:
        _check_fields(schema, set())
        _CHECKED.add(schema)


_CHECKED: set[type] = set()


def _check_fields(schema: type, seen: set[type]) -> None:
    seen.add(schema)  # a schema may refer to itself (a tree); check each one once
    extra = [f for f in dataclasses.fields(schema) if f.metadata.get("extra_keys")]
    if len(extra) > 1:
        raise TypeError(f"{schema.__name__}: only one field may collect the extra keys, got "
                        f"{[f.name for f in extra]}")
    for name, hint in payload_fields(schema):
        if extra and name == extra[0].name and typing.get_origin(_strip_annotated(hint)) is not dict \
                and _strip_annotated(hint) is not dict:
            raise TypeError(f"{schema.__name__}.{name}: the extra-keys field must be a dict[str, ...], got {hint!r}")
        _check_annotation(hint, f"{schema.__name__}.{name}", seen)


def _strip_annotated(hint: Any) -> Any:
    return typing.get_args(hint)[0] if typing.get_origin(hint) is _Annotated else hint


def _check_annotation(hint: Any, where: str, seen: set[type]) -> None:
    if hint is Any or hint is _NoneType or hint is None or any(hint is t for t in _SIMPLE):
        return
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if hint not in seen:
            _check_fields(hint, seen)
        return
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is _Annotated:
        _check_annotation(args[0], where, seen)
        for meta in hint.__metadata__:
            if is_constraint(meta):
                _check_constraint_target(meta, args[0], where)
    elif origin is Literal:
        return
    elif origin in (Union, types.UnionType) or origin in (list, tuple):
        for arg in args:
            if arg is not Ellipsis:
                _check_annotation(arg, where, seen)
    elif origin is dict:
        if args and args[0] is not str:
            raise TypeError(f"{where}: dict keys must be str (JSON object keys), got {args[0]!r}")
        if args:
            _check_annotation(args[1], where, seen)
    else:
        raise TypeError(f"{where}: unsupported annotation {hint!r} in a payload schema")


def _check_constraint_target(meta: Any, hint: Any, where: str) -> None:
    """A constraint must sit on a type it can check (`Range` on numbers, ...); `TypeError` if not."""
    bases = _non_null_arms(hint)
    if isinstance(meta, Range):
        wanted, ok = "int or float", all(base in (int, float) for base in bases)
    elif isinstance(meta, Length):
        wanted = "str, list, tuple or dict"
        ok = all(base in (str, list, tuple, dict) or typing.get_origin(base) in (list, tuple, dict) for base in bases)
    else:  # SafeName
        wanted, ok = "str", all(base is str for base in bases)
    if not ok:
        name = type(meta).__name__ if meta is not SafeName else "SafeName"
        raise TypeError(f"{where}: {name} applies to {wanted}, not {hint!r}")


def _non_null_arms(hint: Any) -> list[Any]:
    """The non-None types of an annotation (`Optional[int | float]` → [int, float])."""
    if typing.get_origin(hint) is _Annotated:
        return _non_null_arms(typing.get_args(hint)[0])
    if typing.get_origin(hint) in (Union, types.UnionType):
        return [arm for arg in typing.get_args(hint) for arm in _non_null_arms(arg)]
    return [] if hint is _NoneType or hint is None else [hint]


def _build(schema: type, payload: Any, path: str) -> Any:
    if not isinstance(payload, Mapping):
        raise _bad(path, f"object ({schema.__name__})", payload)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    values: dict[str, Any] = {}
    extra = extra_keys_field(schema)
    for name, hint in payload_fields(schema):
        field = fields[name]
        if name == extra:
            values[name] = _convert(hint, _undeclared_keys(schema, payload), path)
            continue
        key = name
        if key not in payload:
            key = next((alias for alias in field.metadata.get("aliases", ()) if alias in payload), "")
        if key:
            values[name] = _convert(hint, payload[key], f"{path}.{key}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            aliases = tuple(field.metadata.get("aliases", ()))
            also = f" (also accepted as {', '.join(aliases)})" if aliases else ""
            raise ProtocolError(ErrorCode.BAD_PAYLOAD, f"{path}.{name}: required field is missing{also}")
    try:
        return schema(**values)
    except ProtocolError:
        raise
    except (ValueError, TypeError, OverflowError, IndexError) as exc:  # a schema's own __post_init__ check
        raise ProtocolError(ErrorCode.BAD_PAYLOAD, f"{path}: {exc}") from exc


def extra_keys_field(schema: type) -> str | None:
    """The field that collects a payload's undeclared keys (`metadata={"extra_keys": True}`), if any."""
    for f in dataclasses.fields(schema):
        if f.metadata.get("extra_keys"):
            return f.name
    return None


def _undeclared_keys(schema: type, payload: Mapping[str, Any]) -> dict[str, Any]:
    """Keys of `payload` no field (or alias) declares; keys starting with `_` (`_trace`) stay ignored."""
    declared: set[str] = set()
    for f in dataclasses.fields(schema):
        declared.add(f.name)
        declared.update(f.metadata.get("aliases", ()))
    return {key: value for key, value in payload.items()
            if key not in declared and not (isinstance(key, str) and key.startswith("_"))}


def _convert(hint: Any, value: Any, path: str) -> Any:
    """`value` checked (and, for float/tuple/dataclass, converted) against `hint`."""
    if hint is Any:
        check_json_numbers(value, path)
        return value
    if hint is _NoneType or hint is None:
        if value is None:
            return None
        raise _bad(path, "null", value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _bad(path, "bool", value)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            check_number(value, path)
            return value
        raise _bad(path, "int", value)
    if hint is float:
        if isinstance(value, float):
            check_number(value, path)
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                raise ConstraintViolation(path, "must be a finite number; this integer is too large for a float") from None
        raise _bad(path, "float", value)
    if hint is str:
        if isinstance(value, str):
            return value
        raise _bad(path, "str", value)
    if hint is dict:
        if isinstance(value, dict):
            check_json_numbers(value, path)
            return value
        raise _bad(path, "object", value)
    if hint is list:
        if isinstance(value, list):
            check_json_numbers(value, path)
            return value
        raise _bad(path, "array", value)
    if hint is tuple:
        if isinstance(value, (list, tuple)):
            check_json_numbers(value, path)
            return tuple(value)
        raise _bad(path, "array", value)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is _Annotated:
        converted = _convert(args[0], value, path)
        if converted is not None:
            for meta in hint.__metadata__:
                if is_constraint(meta):
                    meta.check(converted, path)
        return converted
    if origin is Literal:
        if any(value == option and type(value) is type(option) for option in args):
            return value
        raise ProtocolError(
            ErrorCode.BAD_PAYLOAD, f"{path}: expected one of {list(args)!r}, got {value!r}"
        )
    if origin in (Union, types.UnionType):
        return _convert_union(hint, args, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise _bad(path, describe(hint), value)
        return [_convert(args[0], item, f"{path}[{i}]") for i, item in enumerate(value)]
    if origin is tuple:
        return _convert_tuple(hint, args, value, path)
    if origin is dict:
        if not isinstance(value, dict):
            raise _bad(path, describe(hint), value)
        return {key: _convert(args[1], item, f"{path}.{key}") for key, item in value.items()}
    raise TypeError(f"{path}: unsupported annotation {hint!r} in a payload schema")


def _convert_union(hint: Any, args: tuple, value: Any, path: str) -> Any:
    if value is None and _NoneType in args:
        return None
    arms = [arg for arg in args if arg is not _NoneType]
    if len(arms) == 1:  # Optional[T]: T's own error is the most precise one
        if value is None:
            raise _bad(path, describe(hint), value)
        return _convert(arms[0], value, path)
    # Try arms in order so `int | float` keeps an int an int. A value of an arm's type that
    # breaks the arm's constraint is reported as that violation, not as a type mismatch.
    violation: ConstraintViolation | None = None
    for arm in arms:
        try:
            return _convert(arm, value, path)
        except ConstraintViolation as exc:
            violation = violation or exc
        except ProtocolError:
            continue
    if violation is not None:
        raise violation
    raise _bad(path, describe(hint), value)


def _convert_tuple(hint: Any, args: tuple, value: Any, path: str) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise _bad(path, describe(hint), value)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_convert(args[0], item, f"{path}[{i}]") for i, item in enumerate(value))
    if len(value) != len(args):
        raise ProtocolError(
            ErrorCode.BAD_PAYLOAD, f"{path}: expected {describe(hint)}, got an array of {len(value)}"
        )
    return tuple(_convert(arg, item, f"{path}[{i}]") for i, (arg, item) in enumerate(zip(args, value)))


def describe(hint: Any) -> str:
    """A short, JSON-flavoured name for an annotation, as used in error messages."""
    for simple, label in _DESCRIPTIONS:
        if hint is simple:
            return label
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return f"object ({hint.__name__})"
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is _Annotated:
        return describe(args[0])
    if origin is Literal:
        return "one of " + repr(list(args))
    if origin in (Union, types.UnionType):
        return " or ".join(describe(arg) for arg in args)
    if origin is list:
        return f"list[{describe(args[0])}]"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list[{describe(args[0])}]"
        return "[" + ", ".join(describe(arg) for arg in args) + "]"
    if origin is dict:
        return f"object of {describe(args[1])}"
    return repr(hint)


_DESCRIPTIONS = (
    (str, "str"), (int, "int"), (float, "float"), (bool, "bool"), (dict, "object"), (list, "array"),
    (tuple, "array"), (_NoneType, "null"), (None, "null"), (Any, "any"),
)


def _bad(path: str, expected: str, value: Any) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_PAYLOAD, f"{path}: expected {expected}, got {json_type_name(value)}")
