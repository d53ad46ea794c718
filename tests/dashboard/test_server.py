"""The page server without a browser: tokens and 403s, the WebSocket protocol, the hub, the CLI subcommand."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cli_child import CLI

from onthefly.client import DashboardServer
from onthefly.dashboard import CONNECTION_TYPE, STATIC_DIR, PageHub, WebDashboard

from .conftest import REPO, wait_until
from .fake_trainer import WireTrainer

SRC = str(REPO / "src")
FAKE = str(Path(__file__).with_name("fake_trainer.py"))


def http_status(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def served():
    dash = DashboardServer(port=0)
    web = WebDashboard(dash, port=0, describe={"mode": "tcp"})
    web.start()
    dash.start()
    try:
        yield dash, web
    finally:
        dash.close()
        web.close()


async def ws_session(url: str, script):
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url) as ws:
            return await script(ws)


async def receive_until(ws, predicate, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Frames until one satisfies `predicate` (all frames so far returned)."""
    frames = []
    deadline = time.monotonic() + timeout
    while True:
        msg = await asyncio.wait_for(ws.receive(), max(0.01, deadline - time.monotonic()))
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        frames.append(json.loads(msg.data))
        if predicate(frames[-1]):
            return frames


def items_of(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for frame in frames:
        if frame["op"] == "events":
            assert frame["from"] == len(out), "frames must continue exactly where the last one stopped"
            out.extend(frame["items"])
    return out


# ---------------------------------------------------------------- access


def test_page_and_websocket_need_the_token(served):
    dash, web = served
    base = f"http://127.0.0.1:{web.port}"
    assert http_status(base + "/")[0] == 403
    status, body = http_status(base + "/?token=wrong-token-wrong-token")
    assert status == 403 and "wrong token" in body
    status, body = http_status(web.url)
    assert status == 200 and 'src="/static/js/app.js"' in body
    with urllib.request.urlopen(web.url, timeout=10) as response:
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert "default-src 'self'" in response.headers["Content-Security-Policy"]
        assert response.headers["Cache-Control"] == "no-store"
    # The page's own code and the chart library carry no run data: served without the token.
    status, js = http_status(base + "/static/vendor/uplot/uPlot.iife.min.js")
    assert status == 200 and js == (STATIC_DIR / "vendor/uplot/uPlot.iife.min.js").read_text()

    async def refused(url: str, headers: dict[str, str] | None = None) -> int:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                async with session.ws_connect(url, headers=headers):
                    pass
            return info.value.status

    ws_base = f"ws://127.0.0.1:{web.port}/ws"
    assert asyncio.run(refused(ws_base)) == 403
    assert asyncio.run(refused(ws_base + "?token=wrong-token-wrong-token")) == 403
    good = f"{ws_base}?token={web.token}"
    assert asyncio.run(refused(good, {"Origin": "http://evil.example"})) == 403

    # DNS rebinding: a page served under another name is refused even with the token.
    conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=10)
    conn.request("GET", f"/?token={web.token}", headers={"Host": f"evil.example:{web.port}"})
    response = conn.getresponse()
    assert response.status == 403 and "not a loopback name" in response.read().decode()
    conn.close()


def test_tokens_are_random_per_start_and_remote_hosts_need_consent():
    dash = DashboardServer(port=0)
    a, b = WebDashboard(dash, port=0), WebDashboard(dash, port=0)
    assert a.token != b.token and len(a.token) >= 20
    with pytest.raises(ValueError, match="non-loopback"):
        WebDashboard(dash, host="0.0.0.0", port=0)
    assert WebDashboard(dash, host="0.0.0.0", port=0, allow_remote=True).host == "0.0.0.0"
    with pytest.raises(ValueError, match="port"):
        WebDashboard(dash, port=70000)
    dash.close()


def test_a_busy_page_port_is_a_clear_error(served):
    dash, web = served
    other = WebDashboard(dash, port=web.port)
    with pytest.raises(OSError, match=f"cannot serve the dashboard on 127.0.0.1:{web.port}"):
        other.start()


# ---------------------------------------------------------------- the WebSocket protocol


def test_history_then_live_events_exactly_once_and_resume_from_an_index(served):
    dash, web = served
    trainer = WireTrainer(dash.port)
    dash.wait_connected(10)
    for step in range(1, 51):
        trainer.proto.emit("trainStep", step=step, loss=1.0 / step)
    wait_until(lambda: web.hub.trainer_events >= 50, 10, "50 events in the hub")
    url = f"ws://127.0.0.1:{web.port}/ws?token={web.token}"

    async def first_page(ws):
        hello = json.loads((await ws.receive()).data)
        assert hello["op"] == "hello" and hello["mode"] == "tcp" and hello["from"] == 0 and not hello["reset"]
        frames = await receive_until(ws, lambda f: f["op"] == "events" and f["from"] + len(f["items"]) >= 51)
        # live events after the history, on the same socket
        for step in range(51, 61):
            trainer.proto.emit("trainStep", step=step, loss=1.0 / step)
        frames += await receive_until(ws, lambda f: f["op"] == "events" and f["from"] + len(f["items"]) >= 61)
        return hello, items_of(frames)

    hello, items = asyncio.run(ws_session(url, first_page))
    assert items[0] == {"type": CONNECTION_TYPE, "connected": True, "ts": items[0]["ts"]}
    steps = [i["step"] for i in items if i["type"] == "trainStep"]
    assert steps == list(range(1, 61))
    assert [i["event_seq"] for i in items[1:]] == list(range(1, 61))

    async def resumed(ws):
        hello = json.loads((await ws.receive()).data)
        frames = await receive_until(ws, lambda f: f["op"] == "events")
        return hello, frames[-1]

    hello2, frame = asyncio.run(ws_session(f"{url}&instance={hello['instance']}&from=40", resumed))
    assert hello2["from"] == 40 and not hello2["reset"]
    assert frame["from"] == 40 and frame["items"][0]["event_seq"] == 40
    # A page that remembers another server instance starts over, and is told so.
    hello3, frame = asyncio.run(ws_session(f"{url}&instance=someone-else&from=40", resumed))
    assert hello3["from"] == 0 and hello3["reset"] and frame["from"] == 0
    trainer.close()


def test_the_websocket_refuses_compression(served):
    """Deflating megabytes of JSON a second on loopback would only cost CPU the training shares."""
    dash, web = served

    async def negotiated() -> int:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"ws://127.0.0.1:{web.port}/ws?token={web.token}", compress=15) as ws:
                hello = json.loads((await ws.receive()).data)
                assert hello["op"] == "hello"
                return ws.compress

    assert asyncio.run(negotiated()) == 0


def test_commands_reply_with_data_or_code_and_message(served):
    dash, web = served
    url = f"ws://127.0.0.1:{web.port}/ws?token={web.token}"

    async def talk(ws):
        await ws.receive()  # hello
        out = {}

        async def ask(request: dict[str, Any] | str) -> dict[str, Any]:
            await ws.send_str(request if isinstance(request, str) else json.dumps(request))
            frames = await receive_until(ws, lambda f: f["op"] in ("reply", "error"))
            return frames[-1]

        out["early"] = await ask({"op": "cmd", "id": 1, "cmd": "status", "payload": {}})
        trainer = WireTrainer(dash.port)
        dash.wait_connected(10)
        out["status"] = await ask({"op": "cmd", "id": "two", "cmd": "status"})
        out["boom"] = await ask({"op": "cmd", "id": 3, "cmd": "boom", "payload": {}})
        out["unknown"] = await ask({"op": "cmd", "id": 4, "cmd": "nope", "payload": {}})
        out["bad_op"] = await ask({"op": "hack", "id": 5})
        out["bad_payload"] = await ask({"op": "cmd", "id": 6, "cmd": "status", "payload": [1]})
        out["not_json"] = await ask("{nope")
        trainer.close()
        return out

    out = asyncio.run(ws_session(url, talk))
    assert out["early"] == {"op": "reply", "id": 1, "cmd": "status", "ok": False, "code": "disconnected",
                            "error": "no trainer connected"}
    assert out["status"]["ok"] and out["status"]["id"] == "two" and out["status"]["data"]["paused"] is False
    assert out["boom"] == {"op": "reply", "id": 3, "cmd": "boom", "ok": False, "code": "failed",
                           "error": "boom failed: RuntimeError: on purpose"}
    assert out["unknown"]["code"] == "unknown_command" and "'nope'" in out["unknown"]["error"]
    assert out["bad_op"] == {"op": "error", "code": "bad_request", "error": "op must be 'cmd', got 'hack'"}
    assert out["bad_payload"]["error"] == "payload of 'status' must be an object, got list"
    assert out["not_json"]["code"] == "bad_request" and "not JSON" in out["not_json"]["error"]


def test_hub_records_connections_and_rejects_bad_items():
    dash = DashboardServer(port=0)
    hub = PageHub(dash)
    dash.start()
    try:
        trainer = WireTrainer(dash.port)
        dash.wait_connected(10)
        trainer.proto.emit("log", text="hi")
        wait_until(lambda: hub.size() >= 2, 10, "two hub items")
        trainer.close()
        dash.wait_disconnected(10)
        wait_until(lambda: hub.size() >= 3, 10, "the disconnection item")
        kinds = [(i["type"], i.get("connected")) for i in hub.decoded()]
        assert kinds == [(CONNECTION_TYPE, True), ("log", None), (CONNECTION_TYPE, False)]
        assert hub.read(1, 5)[0].startswith('{"type":"log"')
        with pytest.raises(ValueError, match="string 'type'"):
            hub.publish({"no": "type"})
        with pytest.raises(ValueError, match="start must be >= 0"):
            hub.read(-1, 1)
    finally:
        dash.close()


# ---------------------------------------------------------------- the `onthefly dashboard` command


def cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_cli_serves_the_page_and_listens_for_trainers(tmp_path):
    url_file, port_file = tmp_path / "url", tmp_path / "port"
    proc = subprocess.Popen(
        [*CLI, "dashboard", "--port", "0", "--http-port", "0",
         "--url-file", str(url_file), "--port-file", str(port_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
    )
    try:
        wait_until(lambda: url_file.exists() and port_file.exists(), 30, "the URL and port files")
        url = url_file.read_text().strip()
        assert url.startswith("http://127.0.0.1:") and "/?token=" in url
        assert http_status(url)[0] == 200
        assert http_status(url.split("?")[0])[0] == 403
        trainer = WireTrainer(int(port_file.read_text()))
        trainer.proto.emit("log", text="hello from a trainer")
        time.sleep(0.5)
        trainer.close()
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert lines[0] == f"dashboard: {url}"
    assert lines[1].startswith(f"trainers connect to 127.0.0.1:{port_file.read_text().strip()}")
    assert "trainer connected" in out and "[log] hello from a trainer" in out


def test_cli_run_starts_the_script_and_reports_its_exit(tmp_path):
    url_file = tmp_path / "url"
    proc = subprocess.Popen(
        [sys.executable, "-m", "onthefly.cli", "dashboard", "--http-port", "0", "--url-file", str(url_file),
         "--exit-with-script", "--run", FAKE, "25"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
    )
    try:
        wait_until(url_file.exists, 30, "the URL file")
        url = url_file.read_text().strip()
        ws_url = url.replace("http://", "ws://").replace("/?token=", "/ws?token=")

        async def steer(ws):
            hello = json.loads((await ws.receive()).data)
            frames = await receive_until(
                ws, lambda f: f["op"] == "events" and any(i.get("step") == 25 for i in f["items"]))
            await ws.send_str(json.dumps({"op": "cmd", "id": 1, "cmd": "stop", "payload": {}}))
            frames += await receive_until(
                ws, lambda f: f["op"] == "events" and any(i["type"] == "dashboard.process_exit" for i in f["items"]))
            return hello, frames

        hello, frames = asyncio.run(ws_session(ws_url, steer))
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert hello["mode"] == "process" and hello["argv"][-2:] == [FAKE, "25"]
    replies = [f for f in frames if f["op"] == "reply"]
    assert replies == [{"op": "reply", "id": 1, "cmd": "stop", "ok": True, "data": {"status": "stopping"}}]
    items = items_of(frames)
    assert [i["step"] for i in items if i["type"] == "trainStep"] == list(range(1, 26))
    assert items[-1]["type"] == "dashboard.process_exit" and items[-1]["returncode"] == 3
    assert proc.returncode == 3, err
    assert f"{FAKE} exited with code 3" in out


def test_cli_without_the_extra_says_how_to_install_it():
    code = (
        "import sys; sys.modules['aiohttp'] = None\n"
        "from onthefly.cli import main\n"
        "sys.exit(main(['dashboard', '--port', '0', '--http-port', '0']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=60)
    assert result.returncode == 2
    assert "pip install 'onthefly[dashboard]'" in result.stderr


def test_importing_onthefly_and_its_cli_never_loads_the_web_server():
    code = (
        "import sys, json\nimport onthefly, onthefly.cli, onthefly.client\n"
        "onthefly.DashboardServer\nonthefly.cli.build_parser()\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('aiohttp', 'selenium') "
        "or m.startswith('onthefly.dashboard'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_every_static_file_ships_in_the_wheel():
    """pyproject's package-data globs cover every file of the page (a new file cannot be left out)."""
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["onthefly.dashboard"]
    package = STATIC_DIR.parent
    shipped = {p for g in globs for p in package.glob(g) if p.is_file()}
    present = {p for p in STATIC_DIR.rglob("*") if p.is_file()}
    assert present == shipped, sorted(str(p.relative_to(package)) for p in present ^ shipped)
    assert (STATIC_DIR / "vendor" / "uplot" / "LICENSE").read_text().startswith("The MIT License")
