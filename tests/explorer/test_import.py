"""`import onthefly.data_explorer` stays light, and missing extras are named."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_import_loads_no_optional_dependency_and_no_session_code() -> None:
    code = textwrap.dedent(
        """
        import sys
        import onthefly.data_explorer
        heavy = ("sklearn", "pandas", "pyarrow", "onthefly.session", "onthefly.control")
        print(",".join(m for m in heavy if m in sys.modules))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == ""
