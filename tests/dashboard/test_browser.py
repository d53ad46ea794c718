"""The dashboard page in real headless Chromium, steering a real native Trainer over loopback TCP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from torch import nn

from onthefly.client import DashboardServer
from onthefly.dashboard import WebDashboard

from .conftest import WAIT, artifacts_dir, live_training, wait_until

pytest.importorskip("selenium", reason="browser tests need selenium (in the dev extra)")

from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402


def js(browser: Any, expression: str) -> Any:
    return browser.execute_script(f"return ({expression});")


def text(browser: Any, element_id: str) -> str:
    return browser.find_element(By.ID, element_id).text


def open_page(browser: Any, url: str) -> None:
    browser.get(url)
    wait_until(lambda: js(browser, "!!(window.onthefly && window.onthefly.conn.state === 'live')"), WAIT, "the page to go live")


def loss_points(browser: Any) -> int:
    return int(browser.find_element(By.CSS_SELECTOR, ".chart-loss").get_attribute("data-points"))


def page_steps(browser: Any, run_id: str) -> list[int]:
    return js(browser, f"(() => {{ const s = onthefly.store.viewSession; const r = s && s.runs.get({run_id!r});"
                       " return r ? r.metrics.loss.step.slice() : []; })()")


def click(browser: Any, element_id: str) -> None:
    browser.find_element(By.ID, element_id).click()


def click_css(browser: Any, selector: str) -> None:
    """Click the element `selector` names, finding it again if the page re-rendered it meanwhile.

    The run tree is rebuilt whenever a run changes, so an element found a moment ago may be gone
    by the click; a stale element was not clicked, so finding it again and clicking is safe.
    """
    def attempt() -> bool:
        try:
            browser.find_element(By.CSS_SELECTOR, selector).click()
            return True
        except StaleElementReferenceException:
            return False
    wait_until(attempt, WAIT, f"a click on {selector}")


def type_into(browser: Any, element_id: str, value: str) -> None:
    box = browser.find_element(By.ID, element_id)
    box.clear()
    box.send_keys(value, Keys.TAB)  # TAB: the change event


def save_screenshot(browser: Any, name: str) -> Path:
    path = artifacts_dir() / name
    browser.save_screenshot(str(path))
    print(f"screenshot of the dashboard: {path}")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    return path


def test_wrong_token_gets_403_in_the_browser(browser):
    with DashboardServer(port=0) as dash, WebDashboard(dash, port=0) as web:
        browser.get(web.url.split("?")[0] + "?token=not-the-token-at-all")
        assert "403 forbidden: missing or wrong token" in browser.find_element(By.TAG_NAME, "body").text
        assert js(browser, "typeof window.onthefly") == "undefined"
        browser.get(web.url.split("?")[0])
        assert "403 forbidden" in browser.find_element(By.TAG_NAME, "body").text


def test_live_chart_grows_pause_and_resume_steer_the_run(browser, tmp_path):
    with live_training(tmp_path) as live:
        live.wait_step(5)
        open_page(browser, live.url)
        wait_until(lambda: text(browser, "trainer-link") == "trainer: connected", WAIT, "the trainer badge")
        first = wait_until(lambda: loss_points(browser), WAIT, "a first loss point")
        wait_until(lambda: loss_points(browser) > first + 20, WAIT, "the loss chart to grow")
        assert text(browser, "st-run") == "baseline"
        assert js(browser, "onthefly.charts.panels[0].u.data[0].length") > 0

        mark = live.dash.delivered_count
        click(browser, "btn-pause")
        paused = live.dash.wait_for_event("paused", since=mark, timeout=WAIT)
        wait_until(lambda: text(browser, "st-activity") == "paused", WAIT, "the paused badge")
        wait_until(lambda: js(browser, f"onthefly.store.viewSession.markers.some(m => m.kind === 'pause' && m.step === {paused['step']})"),
                   WAIT, "the pause marker")
        assert live.dash.request("status")["paused"] is True

        type_into(browser, "hp-lr", "0.005")
        type_into(browser, "hp-wd", "0.02")
        click(browser, "btn-hparams")
        changed = live.dash.wait_for_event("hparams_changed", since=mark, timeout=WAIT)
        assert changed["changes"] == {"lr": 0.005, "weight_decay": 0.02}
        wait_until(lambda: js(browser, "onthefly.store.viewSession.markers.some(m => m.kind === 'edit')"), WAIT, "the edit marker")

        click(browser, "btn-resume")
        live.dash.wait_for_event("resumed", since=mark, timeout=WAIT)
        live.wait_step(paused["step"] + 30)
        wait_until(lambda: text(browser, "st-activity") == "running", WAIT, "the running badge")
        wait_until(lambda: js(browser, "onthefly.store.status.lr") == 0.005, WAIT, "the new lr in the status")
        save_screenshot(browser, "dashboard-training.png")
        assert not browser.find_element(By.ID, "errors").is_displayed()

        click(browser, "btn-test")
        done = live.dash.wait_for_event(lambda e: e.get("type") == "test_complete" and e.get("label") == "dashboard",
                                        since=mark, timeout=WAIT)
        assert done["avg_loss"] > 0
        wait_until(lambda: js(browser, "onthefly.store.viewSession.markers.some(m => m.kind === 'test')"), WAIT, "the test marker")
        check_chart_controls(browser)


def check_chart_controls(browser: Any) -> None:
    """Smoothing, wall-time axis, log scale and a drag-zoom shared by every chart."""
    series = "onthefly.charts.panels[0].u.series.findIndex(s => s.label === 'baseline loss{}')"
    browser.execute_script("const e = document.getElementById('ema'); e.value = '0'; e.dispatchEvent(new Event('input'));")
    wait_until(lambda: js(browser, f"""(() => {{ const u = onthefly.charts.panels[0].u;
        const raw = u.data[{series.format('')}], smooth = u.data[{series.format(' (smoothed)')}];
        return onthefly.charts.alpha === 0 && raw.length > 10 && raw.every((v, i) => v === smooth[i]); }})()"""),
        WAIT, "alpha 0: the smoothed line is the raw one")
    Select(browser.find_element(By.ID, "x-axis")).select_by_value("ts")
    wait_until(lambda: js(browser, "onthefly.charts.panels[0].u.scales.x.time === true && onthefly.charts.panels[0].u.data[0][0] > 1e9"),
               WAIT, "wall-time x axis")
    Select(browser.find_element(By.ID, "x-axis")).select_by_value("step")
    browser.find_element(By.CSS_SELECTOR, ".chart-loss .log-toggle").click()
    wait_until(lambda: js(browser, "onthefly.charts.panels[0].u.scales.y.distr === 3 && onthefly.charts.panels[0].u.scales.x.time === false"),
               WAIT, "log y scale on steps")
    over = browser.find_element(By.CSS_SELECTOR, ".chart-loss .u-over")
    width = over.size["width"]
    ActionChains(browser).move_to_element_with_offset(over, int(-width * 0.3), 0).click_and_hold() \
        .move_by_offset(int(width * 0.3), 0).release().perform()
    view = wait_until(lambda: js(browser, "onthefly.charts.view"), WAIT, "a zoom window")
    scales = js(browser, "onthefly.charts.panels.filter(p => p.u).map(p => [p.u.scales.x.min, p.u.scales.x.max])")
    assert all(s == pytest.approx(view) for s in scales) and len(scales) >= 3
    click(browser, "btn-reset-zoom")
    assert js(browser, "onthefly.charts.view") is None


def test_report_brush_fork_merge_export_and_switch(browser, tmp_path):
    with live_training(tmp_path) as live:
        live.wait_step(20)
        open_page(browser, live.url)
        mark = live.dash.delivered_count
        click(browser, "btn-pause")
        live.dash.wait_for_event("paused", since=mark, timeout=WAIT)

        click(browser, "btn-report")
        histogram = browser.find_element(By.ID, "histogram")
        wait_until(lambda: histogram.get_attribute("data-samples") == "256", WAIT, "the loss histogram")
        over = histogram.find_element(By.CSS_SELECTOR, ".u-over")
        width = over.size["width"]
        # From inside the second of 40 bins to the right edge: the lowest loss (first bin) is
        # left out and the highest is in, so 0 < count < 256 whatever the losses are.
        start = int(-width * 0.46)
        ActionChains(browser).move_to_element_with_offset(over, start, 0).click_and_hold() \
            .move_by_offset(int(width / 2) - 1 - start, 0).release().perform()
        wait_until(lambda: browser.find_element(By.ID, "selection").is_displayed(), WAIT, "the brushed selection")
        count = int(text(browser, "sel-count"))
        lo = float(browser.find_element(By.ID, "sel-min").get_attribute("value"))
        hi = float(browser.find_element(By.ID, "sel-max").get_attribute("value"))
        region = live.dash.request("get_selected_region_indices", {"min_loss": lo, "max_loss": hi})
        assert region["count"] == count and 0 < count < 256, (lo, hi, count)
        assert hi == js(browser, "onthefly.samples.hist.max")  # the brush reached the right edge

        type_into(browser, "fork-lr", "0.001")
        click(browser, "btn-fork")
        new_run = live.dash.wait_for_event("newRun", since=mark, timeout=WAIT)
        assert new_run["run_id"] == "fork1" and new_run["parents"] == ["baseline"]
        assert new_run["meta"]["kind"] == "fork" and new_run["meta"]["subset_count"] == count
        assert new_run["meta"]["region"] == {"minLoss": lo, "maxLoss": hi}
        child = "#run-tree li[data-run='baseline'] li[data-run='fork1']"
        wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, child), WAIT, "fork1 under baseline in the tree")

        # An empty region: the trainer's error is shown with its code and message.
        type_into(browser, "sel-max", "2000")
        type_into(browser, "sel-min", "1000")
        assert text(browser, "sel-count") == "0"
        click(browser, "btn-fork")
        errors = browser.find_element(By.ID, "errors")
        wait_until(errors.is_displayed, WAIT, "the error box")
        assert "bad_payload" in errors.text and "matched no samples" in errors.text, [
            (e["type"], e.get("step"), e.get("text")) for e in live.dash.history()[mark:]]

        type_into(browser, "sel-min", repr(lo))
        type_into(browser, "sel-max", repr(hi))
        out = tmp_path / "hard.csv"
        Select(browser.find_element(By.ID, "export-format")).select_by_visible_text("csv")
        type_into(browser, "export-path", str(out))
        click(browser, "btn-export")
        wait_until(lambda: "exported" in text(browser, "samples-result"), WAIT, "the export result")
        assert out.exists() and len(out.read_text().strip().splitlines()) == count + 1  # header + rows

        click(browser, "btn-resume")
        wait_until(lambda: "fork1" in browser.find_element(By.CSS_SELECTOR, ".chart-loss").get_attribute("data-runs").split(","),
                   WAIT, "fork1 on the loss chart")
        # The child's line starts at its branch point, on the parent's value there.
        first_x = js(browser, """(() => { const u = onthefly.charts.panels[0].u;
            const i = u.series.findIndex(s => s.label === 'fork1 loss (smoothed)');
            const k = u.data[i].findIndex(v => v !== null && v !== undefined); return u.data[0][k]; })()""")
        assert first_x == new_run["meta"]["at_step"]
        save_screenshot(browser, "dashboard-fork.png")

        mark = live.dash.delivered_count
        click(browser, "btn-pause")
        live.dash.wait_for_event("paused", since=mark, timeout=WAIT)
        for run_id in ("baseline", "fork1"):
            click_css(browser, f"#run-tree li[data-run='{run_id}'] > .run-row .run-select")
        Select(browser.find_element(By.ID, "merge-strategy")).select_by_value("swa")
        click(browser, "btn-merge")
        merged = live.dash.wait_for_event("newRun", since=mark, timeout=WAIT)
        assert merged["run_id"] == "merge1" and merged["parents"] == ["baseline", "fork1"]
        assert merged["meta"]["kind"] == "merge" and merged["meta"]["strategy"] == "swa"
        wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "#run-tree li[data-run='merge1']"), WAIT, "merge1 in the tree")

        click_css(browser, "#run-tree li[data-run='fork1'] > .run-row .run-switch")
        wait_until(lambda: live.dash.request("status")["run_id"] == "fork1", WAIT, "the switch to fork1")
        wait_until(lambda: text(browser, "st-run") == "fork1", WAIT, "fork1 in the status bar")


def test_page_opened_after_1000_steps_shows_every_one_once(browser, tmp_path):
    calls = {"n": 0}

    class CountingLoss(nn.CrossEntropyLoss):
        def forward(self, outputs, targets):
            calls["n"] += 1
            return super().forward(outputs, targets)

    with live_training(tmp_path, dashboard_first=False, loss_fn=CountingLoss(), val_every_n_epochs=10_000) as live:
        # Nobody listens yet: the trainer keeps every event in its durable log.
        wait_until(lambda: calls["n"] >= 1000, 120, "1,000 training steps")
        live.start_dashboard()
        live.dash.wait_connected(WAIT)
        paused = live.dash.request("pause")
        total = paused["step"]
        assert total >= 1000
        live.wait_step(total)
        assert live.train_steps("baseline") == list(range(1, total + 1))  # replayed from the log, from seq 1

        open_page(browser, live.url)
        wait_until(lambda: len(page_steps(browser, "baseline")) >= total, WAIT, "every step in the page")
        assert page_steps(browser, "baseline") == list(range(1, total + 1))
        assert js(browser, "onthefly.store.outOfOrder") == 0
        wait_until(lambda: js(browser, "onthefly.store.items") == live.web.hub.size(), WAIT, "the whole history")
        wait_until(lambda: loss_points(browser) == total, WAIT, "the chart to count every point")
        shown = int(browser.find_element(By.CSS_SELECTOR, ".chart-loss").get_attribute("data-shown"))
        assert 0 < shown <= total


def test_reconnects_of_the_trainer_and_the_page_lose_and_repeat_nothing(browser, tmp_path):
    with live_training(tmp_path) as live:
        live.wait_step(10)
        open_page(browser, live.url)
        wait_until(lambda: len(page_steps(browser, "baseline")) >= 10, WAIT, "steps in the page")
        connections = live.dash.connection_count
        assert live.dash.drop_connection()
        wait_until(lambda: live.dash.connection_count > connections and live.dash.connected, WAIT, "the trainer to reconnect")
        before = live.train_steps()[-1]
        live.wait_step(before + 20)
        js(browser, "onthefly.conn.ws.close()")  # the page's own socket drops: it resumes where it stopped
        wait_until(lambda: js(browser, "onthefly.conn.state === 'live'"), WAIT, "the page to come back")
        live.wait_step(before + 40)
        paused = live.dash.request("pause")
        live.wait_step(paused["step"])
        expected = live.train_steps("baseline")
        assert expected == list(range(1, paused["step"] + 1))
        wait_until(lambda: len(page_steps(browser, "baseline")) >= len(expected), WAIT, "the page to catch up")
        assert page_steps(browser, "baseline") == expected
        assert js(browser, "onthefly.store.outOfOrder") == 0
        log = js(browser, "onthefly.store.log.map(l => l.text)")
        assert "trainer disconnected" in log and log.count("trainer connected") >= 2
        assert text(browser, "trainer-link") == "trainer: connected"

        mark = live.dash.delivered_count
        click(browser, "btn-stop")  # the first click only arms the button
        assert text(browser, "btn-stop") == "Confirm stop"
        click(browser, "btn-stop")
        live.dash.wait_for_event("stopping", since=mark, timeout=WAIT)
        finished = live.dash.wait_for_event("trainingFinished", since=mark, timeout=WAIT)
        assert finished["status"] == "stopped"
        wait_until(lambda: text(browser, "st-activity") == "finished (stopped)", WAIT, "the finished badge")



def test_series_math_runs_in_the_browser(browser):
    """The page's own downsampling, smoothing and histogram code, run by Chromium itself."""
    with DashboardServer(port=0) as dash, WebDashboard(dash, port=0) as web:
        open_page(browser, web.url)
        out = browser.execute_async_script(
            """
            const done = arguments[arguments.length - 1];
            import('/static/js/series.js').then((m) => {
              const xs = Array.from({length: 10000}, (_, i) => i);
              const ys = xs.map((i) => Math.sin(i / 50));
              ys[5000] = 100; ys[7000] = -100;
              const [dx, dy] = m.downsample(xs, ys, 100);
              const [wx] = m.downsample(xs, ys, 100, 2000, 3000);
              const ema = {alpha: null, out: [], acc: 0, n: 0};
              const e1 = m.emaInto(ema, [2, 4], 0.5).slice();
              const e2 = m.emaInto(ema, [2, 4, 6], 0.5).slice();
              const s = new m.Series(); [[1, 10], [3, 30], [5, 50]].forEach(([x, v]) => s.push(x, x * 10, v));
              done({n: dx.length, max: Math.max(...dy), min: Math.min(...dy), asc: dx.every((x, i) => !i || x > dx[i - 1]),
                    w0: wx[0], w1: wx[wx.length - 1], wn: wx.length, small: m.downsample([1, 2], [3, 4], 100),
                    same: m.emaInto({alpha: null, out: [], acc: 0, n: 0}, [1, 5, 2], 0), e1, e2,
                    hist: m.histogram([0, 1, 2, 3, null, 4], 4), count: m.countInRange([0, 1, 2, 3, null, 4], 1, 3),
                    latest: m.latestPerX([1, 2, 3, 2], [10, 20, 30, 25]),
                    at: [s.pointAtOrBefore('step', 4), s.pointAtOrBefore('ts', 0), s.rewound]});
            }).catch((err) => done('failed: ' + err));
            """
        )
    assert not isinstance(out, str), out
    assert out["n"] <= 200 and out["max"] == 100 and out["min"] == -100 and out["asc"]
    assert 1999 <= out["w0"] <= 2000 and 3000 <= out["w1"] <= 3001 and out["wn"] <= 202
    assert out["small"] == [[1, 2], [3, 4]]
    assert out["same"] == [1, 5, 2]
    assert out["e1"] == [2, pytest.approx(10 / 3)] and out["e2"][2] == pytest.approx(4.25 / 0.875)
    assert out["hist"]["counts"] == [1, 1, 1, 2] and out["hist"]["n"] == 5 and out["hist"]["edges"] == [0, 1, 2, 3, 4]
    assert out["count"] == 3
    assert out["latest"] == [[1, 2, 3], [10, 25, 30]]
    assert out["at"] == [{"index": 1, "step": 3, "ts": 30, "val": 30}, None, False]
