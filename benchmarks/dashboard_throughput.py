"""Web dashboard benchmark: a run emitting ~10,000 events/s, with the page open in headless Chromium or not.

The trainer runs in its own process (the native `Trainer`, `log_every_n_steps=1`, a custom step
that reports a precomputed loss, so a step costs what the library and the loader cost, ~0.1 ms
on a quiet core): every step is one `trainStep` event. It times its own loop from the
first step to the last. This process hosts the trainer-facing `DashboardServer` and the page's
`WebDashboard`, as `onthefly dashboard` does. Three conditions, alternated and repeated:

  off          no dashboard at all (ONTHEFLY_TRANSPORT=off; events still go to the event log)
  page closed  `onthefly dashboard` connected, no page open
  page open    the same, with the page open in headless Chromium (Debian's chromium + chromedriver)

Printed: training steps/s per condition, the overhead ratios (page open / page closed, and each
vs off), the events/s the browser took in while training ran, and how long after the last step
the page held every event.

Run: python benchmarks/dashboard_throughput.py [--steps 30000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from onthefly.client import DashboardServer
from onthefly.dashboard import WebDashboard

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

TRAINER = textwrap.dedent(
    """
    import json, sys, time
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from onthefly import Trainer

    steps, save_dir = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    # Each "batch" is the step's loss itself (a decaying noisy curve): the step does no tensor
    # work, so the loop runs as fast as the library lets it and the wire carries ~10k events/s.
    curve = (torch.linspace(2.0, 0.1, steps) + 0.05 * torch.rand(steps)).unsqueeze(1)
    loader = DataLoader(TensorDataset(curve), batch_size=None, shuffle=False)
    trainer = Trainer(project="bench", max_steps=steps, max_epochs=1, log_every_n_steps=1, val_every_n_epochs=10**9,
                      save_dir=save_dir, serve_after_training=False)
    marks = {}

    @trainer.training_step
    def step(batch, state):
        if "first" not in marks:
            marks["first"] = time.perf_counter()
        marks["last"] = time.perf_counter()
        return {"loss": batch[0][0]}

    trainer.fit(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1e-3),
                loss_fn=torch.nn.MSELoss(), train_loader=loader)
    print(json.dumps({"steps": steps, "seconds": marks["last"] - marks["first"], "end": time.time()}))
    """
)


def run_trainer(steps: int, env: dict[str, str]) -> dict[str, Any]:
    save_dir = tempfile.mkdtemp(prefix="onthefly-bench-")
    _, children_before = own_cpu_s()
    try:
        out = subprocess.run(
            [sys.executable, "-c", TRAINER, str(steps), save_dir],
            env={**os.environ, **env}, capture_output=True, text=True, check=True, timeout=600,
        )
    finally:
        shutil.rmtree(save_dir, ignore_errors=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["steps_per_s"] = result["steps"] / result["seconds"]
    result["trainer_cpu_s"] = own_cpu_s()[1] - children_before  # the whole process, start-up included
    return result


def open_browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="onthefly-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1600,1000", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.onthefly_profile = profile  # type: ignore[attr-defined]
    return driver


def chromium_cpu_s(profile: str) -> float | None:
    """CPU seconds used so far by the Chromium processes of `profile` (Linux /proc; None elsewhere)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if profile.encode() not in (entry / "cmdline").read_bytes():
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


def own_cpu_s() -> tuple[float, float]:
    """(CPU seconds of this process, of its finished children)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def page_events(driver: Any) -> int:
    return int(driver.execute_script("return window.onthefly ? window.onthefly.store.trainerEvents : -1;"))


def one_dashboard_run(steps: int, driver: Any | None) -> dict[str, Any]:
    """A fresh `onthefly dashboard` (server + page server); optionally a page; one training run."""
    dash = DashboardServer(port=0)
    web = WebDashboard(dash, port=0)
    web.start()
    dash.start()
    try:
        if driver is not None:
            driver.get(web.url)
            deadline = time.monotonic() + 30
            while driver.execute_script("return !!(window.onthefly && window.onthefly.conn.state === 'live')") is not True:
                if time.monotonic() > deadline:
                    raise TimeoutError("the page did not go live")
                time.sleep(0.05)
        browser_before = chromium_cpu_s(driver.onthefly_profile) if driver is not None else None
        self_before, _ = own_cpu_s()
        result = run_trainer(steps, {"ONTHEFLY_TRANSPORT": "tcp", "ONTHEFLY_DASHBOARD_PORT": str(dash.port)})
        expected = web.hub.trainer_events
        if driver is not None:
            # The trainer has exited; its last events are in the hub. How long until the page holds them all?
            deadline = time.monotonic() + 120
            while page_events(driver) < expected:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the page got {page_events(driver)} of {expected} events")
                time.sleep(0.02)
            caught_up = time.time()
            result["catch_up_s"] = max(0.0, caught_up - result["end"])
            result["page_events"] = page_events(driver)
            result["page_events_per_s"] = result["page_events"] / (result["seconds"] + result["catch_up_s"])
            browser_after = chromium_cpu_s(driver.onthefly_profile)
            if browser_before is not None and browser_after is not None:
                result["browser_cpu_s"] = browser_after - browser_before
        result["dashboard_cpu_s"] = own_cpu_s()[0] - self_before
        result["events"] = expected
        return result
    finally:
        dash.close()
        web.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30_000, help="training steps (= trainStep events) per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per condition (medians are printed)")
    args = parser.parse_args()
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        print("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)", file=sys.stderr)
        return 2
    driver = open_browser()
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "closed": [], "open": []}
    try:
        for _ in range(args.repeats):
            runs["off"].append(run_trainer(args.steps, {"ONTHEFLY_TRANSPORT": "off"}))
            runs["closed"].append(one_dashboard_run(args.steps, None))
            runs["open"].append(one_dashboard_run(args.steps, driver))
            driver.get("about:blank")
    finally:
        driver.quit()
        shutil.rmtree(driver.onthefly_profile, ignore_errors=True)

    def med(cond: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[cond])

    off, closed, opened = (med(c, "steps_per_s") for c in ("off", "closed", "open"))
    print(f"dashboard throughput: {args.steps:,} steps/run, one trainStep event per step, median of {args.repeats}")
    print(f"  training steps/s, no dashboard (transport off)   {off:10,.0f}")
    print(f"  training steps/s, dashboard, page closed          {closed:10,.0f}   (= events/s emitted)")
    print(f"  training steps/s, dashboard, page open            {opened:10,.0f}")
    print(f"  overhead ratio page open / page closed (time)     {closed / opened:10.3f}")
    print(f"  overhead ratio page closed / no dashboard (time)  {off / closed:10.3f}")
    print(f"  events/s delivered to the browser                 {med('open', 'page_events_per_s'):10,.0f}")
    print(f"  page holds every event this long after the last step: {med('open', 'catch_up_s'):.2f} s")
    per_k = 1000 / args.steps
    print(f"  CPU per 1,000 events: dashboard process {med('closed', 'dashboard_cpu_s') * per_k * 1000:.0f} ms (page closed), "
          f"{med('open', 'dashboard_cpu_s') * per_k * 1000:.0f} ms (page open)", end="")
    if all("browser_cpu_s" in r for r in runs["open"]):
        print(f"; browser {med('open', 'browser_cpu_s') * per_k * 1000:.0f} ms", end="")
    print(f"; on {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    missing = [r for r in runs["open"] if r["page_events"] != r["events"]]
    print(f"  every event reached the page: {'yes' if not missing else 'NO'}")
    return 0 if not missing else 1


if __name__ == "__main__":
    sys.exit(main())
