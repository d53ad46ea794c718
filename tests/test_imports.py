"""Importing onthefly stays cheap: no torch in the control plane, no optional libraries up front."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("sklearn", "pandas", "pyarrow", "lightning", "pytorch_lightning", "rich")


def loaded_after(statement: str) -> set[str]:
    code = f"import sys, json\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_control_plane_imports_no_torch():
    modules = loaded_after("import onthefly.control, onthefly.client, onthefly.cli")
    assert "torch" not in modules and "numpy" not in modules
    assert not any(m.split(".")[0] in HEAVY for m in modules)


def test_package_and_trainer_import_no_optional_libraries():
    modules = loaded_after("import onthefly; from onthefly import Trainer, OnTheFlySession; import onthefly.data_explorer")
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert heavy == []


def test_public_names_resolve():
    import onthefly

    for name in onthefly.__all__:
        assert getattr(onthefly, name) is not None, name
