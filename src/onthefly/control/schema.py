"""Payload schemas as data: a dataclass's wire fields, and the JSON Schema that describes them.

The router validates payloads against dataclasses; this module reads those dataclasses
(`payload_fields`) and renders them as JSON Schema (draft 2020-12) with everything the router
enforces: types, required fields, defaults, enums from `Literal`, aliases, and the `Annotated`
constraints of `constraints`. Fuzzers and agents read it through `CommandRouter.describe()`.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Annotated, Any, Literal, Union

from .constraints import INT64_MAX, INT64_MIN, Length, Range, SafeName, is_constraint
from .jsonsafe import to_jsonable
from .names import MAX_NAME_LENGTH, SAFE_NAME_PATTERN

__all__ = ["JSON_SCHEMA_DIALECT", "payload_fields", "payload_json_schema"]

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
_NoneType = type(None)


@functools.lru_cache(maxsize=None)
def payload_fields(schema: type) -> tuple[tuple[str, Any], ...]:
    """`(name, annotation)` of every init field of dataclass `schema`, annotations resolved."""
    try:
        hints = typing.get_type_hints(schema, include_extras=True)
    except (NameError, TypeError) as exc:
        raise TypeError(f"cannot resolve the annotations of payload schema {schema.__name__}: {exc}") from exc
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(schema) if f.init)


def payload_json_schema(schema: type | None) -> dict[str, Any]:
    """The JSON Schema of a payload dataclass; `None` (a schema-less command) is any object."""
    if schema is None:
        return {"type": "object", "description": "any object; handed to the command as is"}
    defs: dict[str, Any] = {}
    names: dict[type, str] = {}
    document = _object_schema(schema, defs, names)
    if defs:
        document["$defs"] = defs
    return document


def _object_schema(schema: type, defs: dict[str, Any], names: dict[type, str]) -> dict[str, Any]:
    names.setdefault(schema, _def_name(schema, names))
    fields = {f.name: f for f in dataclasses.fields(schema)}
    properties: dict[str, Any] = {}
    required: list[str] = []
    extra: dict[str, Any] | None = None
    for name, hint in payload_fields(schema):
        field = fields[name]
        if field.metadata.get("extra_keys"):
            # Its keys are the payload's own undeclared keys: describe them as additionalProperties.
            extra = _type_schema(hint, defs, names).get("additionalProperties", {})
            if field.metadata.get("description"):
                extra = {**extra, "description": field.metadata["description"]}
            continue
        prop = _type_schema(hint, defs, names)
        aliases = list(field.metadata.get("aliases", ()))
        if aliases:
            prop["x-aliases"] = aliases
        if field.metadata.get("description"):
            prop["description"] = str(field.metadata["description"])
        if field.default is not dataclasses.MISSING:
            prop["default"] = to_jsonable(field.default)
        elif field.default_factory is not dataclasses.MISSING:
            prop["default"] = to_jsonable(field.default_factory())
        else:
            required.append(name)
        properties[name] = prop
    document: dict[str, Any] = {"type": "object", "title": schema.__name__, "properties": properties}
    if required:
        document["required"] = required
    # Unknown keys (e.g. the extension's `_trace`) are ignored, or handed to the extra-keys field.
    document["additionalProperties"] = True if extra is None else extra
    doc = (schema.__doc__ or "").strip()
    if doc and not doc.startswith(f"{schema.__name__}("):  # not the signature dataclass generates
        document["description"] = doc.splitlines()[0]
    return document


def _def_name(schema: type, names: dict[type, str]) -> str:
    taken = set(names.values())
    name = schema.__name__
    if name in taken:
        name = f"{schema.__module__}.{schema.__qualname__}"
    return name


def _type_schema(hint: Any, defs: dict[str, Any], names: dict[type, str]) -> dict[str, Any]:
    if hint is Any:
        return {}
    if hint is _NoneType or hint is None:
        return {"type": "null"}
    if hint is bool:
        return {"type": "boolean"}
    if hint is int:
        return {"type": "integer", "minimum": INT64_MIN, "maximum": INT64_MAX}
    if hint is float:
        return {"type": "number"}
    if hint is str:
        return {"type": "string"}
    if hint is dict:
        return {"type": "object"}
    if hint in (list, tuple):
        return {"type": "array"}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if hint not in names:
            names[hint] = _def_name(hint, names)
            defs[names[hint]] = {}  # placeholder first: a schema may refer to itself
            defs[names[hint]] = _object_schema(hint, defs, names)
        return {"$ref": f"#/$defs/{names[hint]}"}
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Annotated:
        schema = _type_schema(args[0], defs, names)
        for meta in hint.__metadata__:
            if is_constraint(meta):
                _constrain(schema, meta)
        return schema
    if origin is Literal:
        schema = {"enum": list(args)}
        kinds = {_json_type(option) for option in args}
        if len(kinds) == 1:
            schema["type"] = kinds.pop()
        return schema
    if origin in (Union, types.UnionType):
        return {"anyOf": [_type_schema(arg, defs, names) for arg in args]}
    if origin is list:
        return {"type": "array", "items": _type_schema(args[0], defs, names)}
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": _type_schema(args[0], defs, names)}
        return {
            "type": "array",
            "prefixItems": [_type_schema(arg, defs, names) for arg in args],
            "minItems": len(args),
            "maxItems": len(args),
        }
    if origin is dict:
        return {"type": "object", "additionalProperties": _type_schema(args[1], defs, names)}
    raise TypeError(f"no JSON Schema for annotation {hint!r}")


def _constrain(schema: dict[str, Any], meta: Any) -> None:
    """Add a constraint's keywords to `schema` (to every non-null arm of a union)."""
    if "anyOf" in schema:
        for arm in schema["anyOf"]:
            if arm.get("type") != "null":
                _constrain(arm, meta)
        return
    if isinstance(meta, Range):
        bounds = meta.json_schema()
        if "exclusiveMinimum" in bounds or "minimum" in bounds:
            schema.pop("minimum", None)
        if "exclusiveMaximum" in bounds or "maximum" in bounds:
            schema.pop("maximum", None)
        schema.update(bounds)
    elif isinstance(meta, Length):
        schema.update(meta.json_schema(schema.get("type", "array")))
    elif meta is SafeName or isinstance(meta, SafeName):
        schema.update({"pattern": SAFE_NAME_PATTERN, "minLength": 1, "maxLength": MAX_NAME_LENGTH,
                       "x-safe-name": True})


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "null" if value is None else "object"
