"""Close every Lightning session a test attached, so no connector or writer thread outlives its test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import onthefly


@pytest.fixture(autouse=True)
def close_lightning_sessions(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    created = []
    original = onthefly.attach_lightning

    def attach_and_remember(**kwargs):
        session = original(**kwargs)
        created.append(session)
        return session

    monkeypatch.setattr(onthefly, "attach_lightning", attach_and_remember)
    yield
    for session in created:
        session.close()
