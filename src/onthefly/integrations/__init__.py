"""Framework integrations, imported lazily: Lightning (`attach_lightning`), Hugging Face (`attach_hf`).

`from onthefly.integrations import attach_lightning` imports Lightning only at that moment (and
`attach_hf` / `HFCallback` import transformers only then), so the core never depends on them.
The protocol every integration implements, `FrameworkDelegate`, lives in the session layer
(`onthefly.session.delegate`).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, tuple[str, str]] = {
    "attach_lightning": (".lightning", "attach_lightning"),
    "LightningDelegate": (".lightning", "LightningDelegate"),
    "OnTheFlyCallback": (".lightning", "OnTheFlyCallback"),
    "attach_hf": (".hf.attach", "attach_hf"),
    "HFCallback": (".hf.callback", "HFCallback"),
    "HFDelegate": (".hf.delegate", "HFDelegate"),
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'onthefly.integrations' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module_name, __name__), attr)
    globals()[name] = value
    return value
