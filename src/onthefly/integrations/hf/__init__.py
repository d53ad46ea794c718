"""Hugging Face Transformers: `attach_hf`, the `HFCallback`, the delegate, and per-sample losses.

    trainer = transformers.Trainer(model=model, args=args, train_dataset=train, eval_dataset=val)
    onthefly.attach_hf(trainer, project="ft", run_name="base", test_dataset=test)
    trainer.train()                                   # unchanged

or, without touching the Trainer afterwards, `Trainer(..., callbacks=[onthefly.HFCallback(project="ft")])`.

The names are resolved lazily: `onthefly.integrations.hf.losses` (`ModelOutputLoss`) needs only
torch, everything else imports transformers when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, tuple[str, str]] = {
    "attach_hf": (".attach", "attach_hf"),
    "HFCallback": (".callback", "HFCallback"),
    "HFDelegate": (".delegate", "HFDelegate"),
    "HFSession": (".session", "HFSession"),
    "ModelOutputLoss": (".losses", "ModelOutputLoss"),
    "per_sample_loss": (".losses", "per_sample_loss"),
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'onthefly.integrations.hf' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module_name, __name__), attr)
    globals()[name] = value
    return value
