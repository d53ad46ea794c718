"""The trainer's commands as tool descriptions an agent (an LLM or a script) can call without the docs.

`describe_commands` answers with every command's description, whether it mutates the run, and
its payload as a JSON Schema (draft 2020-12). `tool_specs` turns that into the shape tool-calling
APIs take — `{"name", "description", "input_schema"}` — and `check_arguments` checks a call's
arguments against the schema's top level before it is sent (the trainer validates them fully
anyway; this catches a misspelt or missing field early, with the same kind of message).
Pure Python: no torch, no session.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ToolArgumentError", "check_arguments", "tool_specs"]

_JSON_TYPES = {"string": str, "boolean": bool, "object": dict, "array": list, "null": type(None)}


class ToolArgumentError(ValueError):
    """A tool call's arguments do not fit the command's payload schema; the message names the field."""


def tool_specs(described: dict[str, Any], *, include_mutating: bool = True) -> list[dict[str, Any]]:
    """One tool per command: `{"name", "description", "input_schema", "mutating"}`, sorted by name."""
    commands = described.get("commands", described)
    tools = []
    for name, spec in sorted(commands.items()):
        if not include_mutating and spec.get("mutating"):
            continue
        schema = dict(spec.get("payload") or {"type": "object"})
        schema.pop("title", None)
        effect = "changes the run (runs at the next batch boundary)" if spec.get("mutating") else "read-only"
        tools.append({"name": name, "description": f"{spec.get('description', '')} [{effect}]".strip(),
                      "input_schema": schema, "mutating": bool(spec.get("mutating"))})
    return tools


def check_arguments(tool: dict[str, Any], arguments: dict[str, Any]) -> None:
    """Raise `ToolArgumentError` for a missing required field, an unknown one, or a wrong top-level type."""
    schema = tool["input_schema"]
    if not isinstance(arguments, dict):
        raise ToolArgumentError(f"{tool['name']}: arguments must be an object, got {type(arguments).__name__}")
    properties = schema.get("properties", {})
    for name in schema.get("required", []):
        aliases = properties.get(name, {}).get("x-aliases", ())
        if name not in arguments and not any(alias in arguments for alias in aliases):
            raise ToolArgumentError(f"{tool['name']}: payload.{name}: required field is missing")
    extra_allowed = schema.get("additionalProperties", True)
    for key, value in arguments.items():
        prop = properties.get(key)
        if prop is None:
            prop = next((p for p in properties.values() if key in p.get("x-aliases", ())), None)
        if prop is None:
            if extra_allowed is True and not key.startswith("_"):
                known = ", ".join(sorted(properties)) or "none"
                raise ToolArgumentError(f"{tool['name']}: payload.{key}: not a field of this command (fields: {known})")
            continue
        if not _fits(value, prop, schema.get("$defs", {})):
            raise ToolArgumentError(f"{tool['name']}: payload.{key}: {value!r} does not fit {_describe(prop)}")


def _fits(value: Any, prop: dict[str, Any], defs: dict[str, Any]) -> bool:
    if "$ref" in prop:
        return isinstance(value, dict)
    if "anyOf" in prop:
        return any(_fits(value, arm, defs) for arm in prop["anyOf"])
    if "enum" in prop:
        return value in prop["enum"]
    kind = prop.get("type")
    if kind is None:
        return True
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _JSON_TYPES.get(kind, object))


def _describe(prop: dict[str, Any]) -> str:
    if "anyOf" in prop:
        return " or ".join(_describe(arm) for arm in prop["anyOf"])
    if "enum" in prop:
        return f"one of {prop['enum']}"
    return str(prop.get("type", "any value"))
