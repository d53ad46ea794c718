"""onthefly: watch and steer a running PyTorch training.

The public API is resolved lazily so that `import onthefly` stays cheap and optional
dependencies (scikit-learn, pandas, pyarrow, lightning, transformers, accelerate, rich) load only
when used.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

_LAZY: dict[str, tuple[str, str]] = {
    "Trainer": (".trainer", "Trainer"),
    "OnTheFlySession": (".session.native", "OnTheFlySession"),
    "OnTheFlySessionBase": (".session.base", "OnTheFlySessionBase"),
    "SessionConfig": (".session.config", "SessionConfig"),
    "ConfigError": (".session.config", "ConfigError"),
    "CheckpointError": (".checkpoints", "CheckpointError"),
    "ProtocolError": (".control.errors", "ProtocolError"),
    "DashboardServer": (".client", "DashboardServer"),
    "ProcessDashboard": (".client", "ProcessDashboard"),
    "RequestError": (".client", "RequestError"),
    "export_session": (".session_bundle", "export_session"),
    "import_session": (".session_bundle", "import_session"),
    "verify_bundle": (".session_bundle", "verify_bundle"),
    "BundleError": (".session_bundle", "BundleError"),
    "merge_state_dicts": (".merging", "merge_state_dicts"),
    "MergeError": (".merging", "MergeError"),
    "compute_per_sample_losses": (".data_explorer", "compute_per_sample_losses"),
    "export_subset_table": (".data_explorer", "export_subset_table"),
    "attach": (".attach", "attach"),
    "attach_lightning": (".integrations.lightning", "attach_lightning"),
    "attach_hf": (".integrations.hf.attach", "attach_hf"),
    "HFCallback": (".integrations.hf.callback", "HFCallback"),
    "OnTheFlyExternalSession": (".session.external", "OnTheFlyExternalSession"),
    "FrameworkDelegate": (".session.delegate", "FrameworkDelegate"),
    "TestOutcome": (".session.delegate", "TestOutcome"),
    "SessionClosed": (".session.errors", "SessionClosed"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'onthefly' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module_name, __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
