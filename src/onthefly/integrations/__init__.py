"""Framework integrations: `FrameworkDelegate` (the protocol) and, imported lazily, Lightning.

`from onthefly.integrations import attach_lightning` imports Lightning only at that moment, so
the core never depends on it.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import FrameworkDelegate, TestOutcome

_LAZY: dict[str, tuple[str, str]] = {
    "attach_lightning": (".lightning", "attach_lightning"),
    "LightningDelegate": (".lightning", "LightningDelegate"),
    "OnTheFlyCallback": (".lightning", "OnTheFlyCallback"),
}

__all__ = ["FrameworkDelegate", "TestOutcome", *_LAZY]


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'onthefly.integrations' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module_name, __name__), attr)
    globals()[name] = value
    return value
