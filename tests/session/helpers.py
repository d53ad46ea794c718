"""Small deterministic training setups shared by the session tests."""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset


def make_dataset(n: int = 256, dim: int = 8, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(x, y)


def make_model(dim: int = 8, classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, classes))


class CountingLoss(nn.Module):
    """Cross-entropy that can run an action on its n-th call (to trigger commands at an exact step)."""

    def __init__(self, at_call: int | None = None, action: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.calls = 0
        self.at_call = at_call
        self.action = action

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.action is not None and self.calls == self.at_call:
            self.action()
        return F.cross_entropy(outputs, targets)


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.002)
    raise TimeoutError(f"timed out waiting for {what}")


class MemoryDashboard:
    """Drive a session over its MemoryChannel like a dashboard would."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self._n = 0

    def send(self, cmd: str, payload: dict | None = None, *, rid: str | None = None) -> str:
        self._n += 1
        rid = rid or f"r{self._n}"
        self.channel.inject(json.dumps({"id": rid, "cmd": cmd, "payload": payload or {}}))
        return rid

    def messages(self) -> list[dict]:
        return [json.loads(line) for line in list(self.channel.sent)]

    def reply(self, rid: str, timeout: float = 20.0) -> dict:
        def find() -> dict | None:
            for m in self.messages():
                if m.get("id") == rid and "ok" in m:
                    return m
            return None

        return wait_until(find, timeout, f"reply {rid}")

    def request(self, cmd: str, payload: dict | None = None, timeout: float = 20.0) -> Any:
        reply = self.reply(self.send(cmd, payload), timeout)
        if not reply["ok"]:
            raise AssertionError(f"{cmd} failed: {reply}")
        return reply["data"]

    def events(self, type: str | None = None) -> list[dict]:
        return [m for m in self.messages() if "type" in m and (type is None or m["type"] == type)]


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"weights differ at {k}"


def loaders(policy: str, workers: int, n: int = 256, batch: int = 16) -> tuple[DataLoader, DataLoader]:
    ds = make_dataset(n)
    gen = torch.Generator().manual_seed(123) if policy == "user" else None
    train = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, generator=gen)
    test = DataLoader(make_dataset(64, seed=5), batch_size=16, shuffle=True)
    return train, test
