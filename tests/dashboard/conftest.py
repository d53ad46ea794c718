"""Fixtures for the web dashboard tests: a live native training behind a WebDashboard, and headless Chromium.

The training is the real `onthefly.Trainer` (tiny MLP on a TensorDataset) on a thread, connecting
over loopback TCP to a `DashboardServer` on an OS-chosen port; the page server also takes port 0.
Chromium is Debian's (`/usr/bin/chromium` with `/usr/bin/chromedriver`); selenium is never
allowed to fetch a driver of its own.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aiohttp", reason="the web dashboard needs the [dashboard] extra (aiohttp)")

from onthefly.client import DashboardServer  # noqa: E402
from onthefly.dashboard import WebDashboard  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT = 30.0
REPO = Path(__file__).resolve().parents[2]


def wait_until(predicate: Callable[[], Any], timeout: float = WAIT, what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy; TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what} (last value: {last!r})")


def artifacts_dir() -> Path:
    """Where test runs leave files for a reviewer: $ONTHEFLY_ARTIFACTS, else tests/artifacts/."""
    folder = Path(os.environ.get("ONTHEFLY_ARTIFACTS") or REPO / "tests" / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class LiveTraining:
    """A native Trainer on a thread, steered through `dash`, with the web page served by `web`."""

    def __init__(self, dash: DashboardServer, web: WebDashboard, thread: threading.Thread, errors: list[BaseException]) -> None:
        self.dash = dash
        self.web = web
        self.thread = thread
        self.errors = errors

    @property
    def url(self) -> str:
        return self.web.url

    def train_steps(self, run_id: str | None = None) -> list[int]:
        """The steps of every trainStep the client engine delivered (optionally of one run)."""
        return [
            e["step"]
            for e in self.dash.history()
            if e.get("type") == "trainStep" and (run_id is None or e.get("run_id") == run_id)
        ]

    def start_dashboard(self) -> None:
        """Start listening for the trainer (when the trainer was started first)."""
        self.dash.start()

    def wait_step(self, step: int, timeout: float = WAIT) -> None:
        self.dash.wait_for_event(lambda e: e.get("type") == "trainStep" and e.get("step", 0) >= step, timeout=timeout)


def build_training(n: int = 256, dim: int = 8, classes: int = 3, seed: int = 0, loss_fn: Any = None) -> dict[str, Any]:
    """fit() arguments for a tiny, learnable problem (one labelling rule for train and val)."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, classes, generator=g)
    x = torch.randn(n, dim, generator=g)
    vx = torch.randn(64, dim, generator=g)
    tx = torch.randn(64, dim, generator=g)
    torch.manual_seed(seed)

    def make_model() -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(dim, 32), nn.ReLU(), nn.Linear(32, classes))

    model = make_model()
    return dict(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01),
        loss_fn=loss_fn if loss_fn is not None else nn.CrossEntropyLoss(),
        train_loader=DataLoader(TensorDataset(x, (x @ w).argmax(1)), batch_size=16, shuffle=True),
        val_loader=DataLoader(TensorDataset(vx, (vx @ w).argmax(1)), batch_size=32),
        test_loader=DataLoader(TensorDataset(tx, (tx @ w).argmax(1)), batch_size=32),
        seed=seed,
        model_factory=make_model,
    )


def free_port() -> int:
    """A port nobody listens on right now (for a trainer that starts before its dashboard)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def live_training(
    tmp_path: Path, *, dashboard_first: bool = True, loss_fn: Any = None, **settings: Any
) -> Iterator[LiveTraining]:
    """DashboardServer + WebDashboard on free ports, and a Trainer thread that connects to them.

    With `dashboard_first=False` the trainer starts first and the dashboard only listens once
    the caller calls `live.start_dashboard()`.
    """
    import torch

    from onthefly import Trainer

    # One intra-op thread: on a small shared machine a tiny MLP trains ~5x faster this way.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    port = 0 if dashboard_first else free_port()
    dash = DashboardServer(port=port)
    web = WebDashboard(dash, port=0, describe={"mode": "tcp"})
    web.start()
    if dashboard_first:
        dash.start()
        port = dash.port
    web.describe["trainer"] = f"{dash.host}:{port}"
    errors: list[BaseException] = []
    config: dict[str, Any] = dict(
        project="web", max_epochs=10_000, dashboard_port=port, transport="tcp",
        save_dir=str(tmp_path / "store"), allowed_paths=(str(tmp_path),), log_every_n_steps=1,
    )
    config.update(settings)
    trainer = Trainer(**config)

    def fit() -> None:
        try:
            trainer.fit(**build_training(loss_fn=loss_fn))
        except BaseException as exc:  # reported by the test, never swallowed
            errors.append(exc)

    thread = threading.Thread(target=fit, name="test-trainer", daemon=True)
    live = LiveTraining(dash, web, thread, errors)
    try:
        thread.start()
        yield live
    finally:
        if thread.is_alive() and dash.connected:
            try:
                dash.request("stop", timeout=10)
            except Exception as exc:  # the run may already have stopped; the join below decides
                print(f"stopping the test trainer: {exc}")
        if thread.is_alive():
            thread.join(30)
        dash.close()
        web.close()
        torch.set_num_threads(threads)
        for exc in errors:  # shown even when the test body failed first
            traceback.print_exception(exc)
    assert not errors, f"the training thread failed: {errors[0]!r}"


def chromium_driver(user_data_dir: str) -> Any:
    """Headless Chromium through Debian's chromedriver (selenium never downloads a driver)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1600,1000", f"--user-data-dir={user_data_dir}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """One headless Chromium for the whole run (each test opens its own page in it)."""
    pytest.importorskip("selenium", reason="browser tests need selenium (in the dev extra)")
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        pytest.skip(f"browser tests need Debian's chromium and chromium-driver (missing {', '.join(missing)}); "
                    "scripts/test.sh installs them")
    profile = tempfile.mkdtemp(prefix="onthefly-chromium-")
    driver = chromium_driver(profile)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
