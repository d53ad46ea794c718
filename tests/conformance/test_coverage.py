"""The conformance suite sends every command a session offers (checked from the suite's source)."""

from __future__ import annotations

import re
from pathlib import Path

from onthefly.session.native import OnTheFlySession


def test_every_capability_is_driven_by_the_conformance_suite(tmp_path):
    with OnTheFlySession(transport="off", save_dir=str(tmp_path)) as session:
        capabilities = set(session.router.names())
    source = "\n".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py") if p.name != Path(__file__).name)
    sent = set(re.findall(r'(?:request|error)\(\s*"([a-z_]+)"', source))
    sent |= set(re.findall(r'^    \("([a-z_]+)", \{', source, flags=re.M))  # the bad-payload table
    sent |= {cmd for tuple_ in re.findall(r"HEALTH = \(([^)]*)\)", source) for cmd in re.findall(r'"([a-z_]+)"', tuple_)}
    assert capabilities - sent == set(), f"commands no conformance test sends: {sorted(capabilities - sent)}"
