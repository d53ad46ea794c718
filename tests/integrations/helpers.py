"""Small deterministic setups and a loopback dashboard shared by the integration tests."""

from __future__ import annotations

import random
import threading
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from onthefly.client import DashboardServer

WAIT = 20.0


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_dataset(n: int = 256, dim: int = 8, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, dim, generator=g), torch.randint(0, classes, (n,), generator=g))


def make_net(dim: int = 8, classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, classes))


def make_loaders(workers: int = 0, n: int = 256, batch: int = 16) -> tuple[DataLoader, DataLoader]:
    train = DataLoader(make_dataset(n), batch_size=batch, shuffle=True, num_workers=workers)
    test = DataLoader(make_dataset(64, seed=5), batch_size=16, shuffle=True)
    return train, test


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"weights differ at {k}"


def wait_until(predicate: Callable[[], Any], timeout: float = WAIT, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.002)
    raise TimeoutError(f"timed out waiting for {what}")


def dashboard() -> DashboardServer:
    """A dashboard listening on a loopback port chosen by the OS."""
    return DashboardServer(port=0).start()


def events(server: DashboardServer, type_: str | None = None) -> list[dict]:
    return [e for e in server.history() if type_ is None or e.get("type") == type_]


class Driver:
    """Runs a script of dashboard requests on its own thread (the training thread must not wait on replies)."""

    def __init__(self, server: DashboardServer, script: Callable[[DashboardServer, dict], None]) -> None:
        self.results: dict[str, Any] = {}
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(server, script), daemon=True)
        self._thread.start()

    def _run(self, server: DashboardServer, script: Callable[[DashboardServer, dict], None]) -> None:
        try:
            script(server, self.results)
        except BaseException as exc:  # re-raised on the test thread by join()
            self.error = exc

    def join(self, timeout: float = WAIT) -> dict[str, Any]:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("the dashboard script did not finish")
        if self.error is not None:
            raise self.error
        return self.results


def pause_script(server: DashboardServer, results: dict) -> None:
    """What a dashboard does around a pause: pause, look, test, save, resume."""
    results["paused"] = server.request("pause", {"reason": "test"}, timeout=WAIT)
    results["status"] = server.request("status", timeout=WAIT)
    results["test"] = server.request("test_now", {"label": "mid"}, timeout=WAIT)
    results["save"] = server.request("save_ckpt", timeout=WAIT)
    results["resumed"] = server.request("resume", timeout=WAIT)
