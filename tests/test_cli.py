"""Tests for the `onthefly` command: typed-command parsing, formatting, views, and listen/run end to end."""

from __future__ import annotations

import io
import json
import os
import queue
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cli_child import CLI

from onthefly import __version__
from onthefly.cli import (
    CommandSyntaxError,
    PlainView,
    RichView,
    TypedCommand,
    exit_status,
    format_event,
    format_reply,
    format_train_step,
    main,
    parse_command,
    script_argv,
    write_text_atomic,
)

WAIT = 10.0
SRC = str(Path(__file__).resolve().parents[1] / "src")


# ---------------------------------------------------------------- typed commands


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("pause", TypedCommand("pause")),
        ("  resume \n", TypedCommand("resume")),
        ("test", TypedCommand("test_now")),
        ("test final", TypedCommand("test_now", {"label": "final"})),
        ("save", TypedCommand("save_ckpt")),
        ("stop", TypedCommand("stop")),
        ("status", TypedCommand("status")),
        ("info", TypedCommand("server_info")),
        ("runs", TypedCommand("list_runs")),
        ("lr 0.01", TypedCommand("set_hparams", {"lr": 0.01})),
        ("LR 1e-3", TypedCommand("set_hparams", {"lr": 0.001})),
        ("help", TypedCommand("help", local=True)),
        ("quit", TypedCommand("quit", local=True)),
        ("exit", TypedCommand("quit", local=True)),
        ('set_hparams {"weight_decay": 0.1}', TypedCommand("set_hparams", {"weight_decay": 0.1})),
        ("list_checkpoints", TypedCommand("list_checkpoints")),
        ('{"cmd": "fork", "payload": {"mode": "loss"}}', TypedCommand("fork", {"mode": "loss"})),
        ('{"cmd": "events_since"}', TypedCommand("events_since")),
        ("", None),
        ("   ", None),
        ("# a comment", None),
    ],
)
def test_parse_command(line, expected):
    assert parse_command(line) == expected


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("lr", "lr needs a value"),
        ("lr fast", "lr needs a number, got 'fast'"),
        ("lr -1", "lr must be a finite number >= 0"),
        ("lr nan", "lr must be a finite number >= 0"),
        ("set_hparams {lr: 1}", "the payload of 'set_hparams' is not valid JSON"),
        ("set_hparams [1]", "must be a JSON object, got list"),
        ('{"payload": {}}', 'needs a "cmd" string'),
        ('{"cmd": "x", "payload": 3}', '"payload" must be a JSON object, got int'),
        ("{not json", "not valid JSON"),
    ],
)
def test_parse_command_errors(line, message):
    with pytest.raises(CommandSyntaxError, match=message.replace("[", r"\[").replace("(", r"\(")):
        parse_command(line)


# ---------------------------------------------------------------- formatting


def test_format_train_step():
    event = {"type": "trainStep", "step": 120, "epoch": 1, "loss": 0.43121, "val_loss": 0.50109,
             "throughput": 2345.4, "event_seq": 9}
    assert format_train_step(event) == "step 120  epoch 1  loss 0.4312  val 0.5011  2,345 samples/s"
    assert format_train_step({"type": "trainStep", "step": 3, "loss": None, "val_loss": None,
                              "throughput": None}) == "step 3"
    assert format_event({"type": "trainStep", "step": 2, "loss": 1.5e-6}) == "step 2  loss 1.500e-06"


def test_format_event_lines():
    assert format_event({"type": "log", "text": "epoch 1"}) == "[log] epoch 1"
    assert format_event({"type": "log", "level": "stderr", "text": "oops"}) == "[stderr] oops"
    assert format_event({"type": "paused", "step": 7, "ckpt": "/c/step-7.pt"}) == "paused at step 7 (checkpoint /c/step-7.pt)"
    assert format_event({"type": "resumed", "step": 7}) == "resumed at step 7"
    assert format_event({"type": "session_started", "project": "p", "run_name": "baseline"}) == \
        "session started: project p, run baseline"
    assert format_event({"type": "newRun", "run_id": "fork1", "parents": ["baseline"],
                         "meta": {"kind": "fork"}}) == "new run fork1 from baseline (fork)"
    assert format_event({"type": "epoch_end", "epoch": 2, "val_loss": 0.25}) == "epoch 2 done  val 0.2500"
    assert format_event({"type": "trainingFinished", "status": "completed", "step": 50}) == \
        "training finished (completed) at step 50"
    assert format_event({"type": "testStep", "step": 1, "loss": 0.1}) is None
    assert format_event({"type": "custom", "a": 1, "event_seq": 4, "ts": 1.0}) == "custom: a=1"


def test_format_reply_lines():
    assert format_reply("pause", {"status": "paused", "step": 12, "ckpt": None}) == "paused at step 12"
    assert format_reply("resume", {"status": "resumed", "step": 12}) == "resumed at step 12"
    assert format_reply("status", {"run_id": "r", "step": 5, "epoch": 1, "paused": True,
                                   "last_metrics": {"loss": 0.5}}) == \
        "status: paused  run r  step 5  epoch 1  loss 0.5000"
    assert format_reply("save_ckpt", {"path": "/x/step-5.pt", "step": 5}) == "checkpoint saved at step 5: /x/step-5.pt"
    assert format_reply("save_ckpt", {"path": None, "step": 5}) == "no checkpoint written at step 5 (pause first)"
    assert format_reply("server_info", {"version": "0.2.0", "device": "cpu", "capabilities": ["pause", "fork"]}) == \
        "server: onthefly 0.2.0  device cpu  capabilities: pause, fork"
    assert format_reply("set_hparams", {"lr": 0.01}) == "hyperparameters now: lr=0.01"
    assert format_reply("set_hparams", {"param_groups": [{"lr": 0.01, "momentum": 0.9}], "grad_clip_norm": None}) == \
        "hyperparameters now:\n  group 0: lr=0.01  momentum=0.9\n  grad_clip_norm=null"
    assert format_event({"type": "hparams_changed", "changes": {"lr": 0.01}, "hparams": {}}) == \
        "hyperparameters changed: lr=0.01"
    assert format_reply("list_runs", {"runs": [{"run_id": "a", "status": "running"}]}) == \
        "runs (1):\n  a  status=running"
    assert format_reply("spill_all", []) == "spill_all: []"
    assert format_reply("clean_disk", None) == "clean_disk: ok"


# ---------------------------------------------------------------- views


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_view_rate_limits_steps_and_shows_the_latest():
    out = io.StringIO()
    clock = FakeClock()
    view = PlainView(out, steps_per_s=4, clock=clock)
    for i, t in enumerate([0.0, 0.1, 0.2, 0.3, 0.35]):
        clock.now = t
        view.event({"type": "trainStep", "step": i + 1, "loss": 1.0})
    view.event({"type": "paused", "step": 5})
    view.event({"type": "trainStep", "step": 6, "loss": 1.0})  # 0.05 s after the last printed: held
    view.reply("status", {"paused": True, "step": 6})
    assert out.getvalue().splitlines() == [
        "step 1  loss 1.0000",
        "step 4  loss 1.0000",
        "step 5  loss 1.0000",
        "paused at step 5",
        "step 6  loss 1.0000",
        "status: paused  step 6",
    ]
    assert view.state.activity == "paused" and view.state.step == 6


def test_rich_view_renders_state_and_log():
    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, width=110, force_terminal=False, color_system=None)
    view = RichView(console=console)
    view.connection(True)
    view.event({"type": "trainStep", "run_id": "baseline", "step": 120, "epoch": 1, "loss": 0.43121,
                "val_loss": 0.50109, "throughput": 2345.0})
    view.event({"type": "paused", "step": 120})
    view.reply("save_ckpt", {"path": "/ckpt/step-120.pt", "step": 120})
    console.print(view.render())
    text = buffer.getvalue()
    for expected in ("connected", "baseline", "120", "0.4312", "0.5011", "2,345 samples/s", "paused",
                     "paused at step 120", "checkpoint saved at step 120: /ckpt/step-120.pt", "trainer connected"):
        assert expected in text, expected
    assert view.state.activity == "paused"


# ---------------------------------------------------------------- helpers


def test_write_text_atomic_and_script_argv(tmp_path):
    target = tmp_path / "port.txt"
    write_text_atomic(str(target), "123\n")
    write_text_atomic(str(target), "456\n")
    assert target.read_text() == "456\n"
    assert [p.name for p in tmp_path.iterdir()] == ["port.txt"]  # no temp files left behind
    script = tmp_path / "train.py"
    script.write_text("")
    assert script_argv(str(script), ["--lr", "1"]) == [sys.executable, "-u", str(script), "--lr", "1"]
    with pytest.raises(FileNotFoundError, match="no such script: .*missing.py"):
        script_argv(str(tmp_path / "missing.py"), [])
    with pytest.raises(FileNotFoundError, match="no such script or program: not-a-program-xyz"):
        script_argv("not-a-program-xyz", [])
    assert exit_status(0, False) == 0
    assert exit_status(3, False) == 3
    assert exit_status(-15, False) == 143
    assert exit_status(None, True) == 130


def test_main_version_usage_and_bad_arguments(capsys, tmp_path):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"onthefly {__version__}"
    assert main([]) == 2
    assert "listen" in capsys.readouterr().out
    assert main(["run", str(tmp_path / "nope.py")]) == 2
    assert "onthefly run: no such script" in capsys.readouterr().err
    assert main(["listen", "--port", "0", "--host", "0.0.0.0"]) == 2
    assert "non-loopback host '0.0.0.0'" in capsys.readouterr().err
    assert main(["listen", "--port", "x"]) == 2
    assert "invalid int value" in capsys.readouterr().err


# ---------------------------------------------------------------- end to end


class LineReader:
    """Collects a subprocess's stdout lines on a thread so the test can wait for one with a deadline."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def expect(self, fragment: str, timeout: float = WAIT) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line containing {fragment!r}; got {self.lines}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"output ended without {fragment!r}; got {self.lines}")
            self.lines.append(line)
            if fragment in line:
                return line

    def expect_all(self, lines: list[str], timeout: float = WAIT) -> None:
        """Wait until every one of `lines` has been printed, in any order."""
        missing = set(lines) - set(self.lines)
        while missing:
            found = self.expect("", timeout)
            missing.discard(found)


def cli_process(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        [*CLI, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
    )


class MiniTrainer:
    """A trainer that connects over TCP, answers a few commands and emits stamped events."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.sock.settimeout(None)
        self.seq = 0
        self.paused = False
        self.commands: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def send(self, obj: dict[str, Any]) -> None:
        with self.lock:
            self.sock.sendall((json.dumps(obj) + "\n").encode())

    def emit(self, type_: str, **fields: Any) -> None:
        self.seq += 1
        self.send({"type": type_, **fields, "run_id": "baseline", "run_gen": 0, "ts": time.time(),
                   "session_id": "sess-cli", "event_seq": self.seq})

    def _serve(self) -> None:
        with self.sock.makefile("rb") as rfile:
            for raw in rfile:
                msg = json.loads(raw)
                self.commands.append(msg)
                cmd = msg.get("cmd")
                if cmd == "status":
                    reply = {"ok": True, "data": {"run_id": "baseline", "step": 42, "epoch": 2,
                                                  "paused": self.paused, "last_metrics": {"loss": 0.125}}}
                elif cmd == "pause":
                    self.paused = True
                    reply = {"ok": True, "data": {"status": "paused", "step": 42, "ckpt": None}}
                    self.emit("paused", step=42)
                elif cmd == "set_hparams":
                    reply = {"ok": True, "data": dict(msg["payload"])}
                elif cmd == "save_ckpt":
                    reply = {"ok": False, "error": "Model must be paused before save", "code": "not_paused"}
                else:
                    reply = {"ok": False, "error": f"Unknown cmd: {cmd}", "code": "unknown_command"}
                if msg.get("id"):
                    self.send({"id": msg["id"], **reply})

    def close(self) -> None:
        self.sock.close()


def test_listen_plain_with_typed_commands(tmp_path):
    port_file = tmp_path / "port"
    proc = cli_process(["listen", "--port", "0", "--plain", "--port-file", str(port_file)], tmp_path)
    out = LineReader(proc.stdout)
    trainer = None
    try:
        out.expect("listening on 127.0.0.1:")
        port = int(port_file.read_text())
        trainer = MiniTrainer(port)
        out.expect("trainer connected")
        trainer.emit("session_started", project="demo", run_name="baseline")
        trainer.emit("trainStep", step=1, epoch=0, loss=0.5, val_loss=None, throughput=1200.0)
        out.expect("session started: project demo, run baseline")
        out.expect("step 1  epoch 0  loss 0.5000  1,200 samples/s")

        proc.stdin.write("status\n")
        proc.stdin.flush()
        assert out.expect("status:") == "status: running  run baseline  step 42  epoch 2  loss 0.1250"
        proc.stdin.write("pause\n")
        proc.stdin.flush()
        assert out.expect("paused") == "paused at step 42"
        assert out.expect("paused") == "paused at step 42"  # the event and the reply both say so
        proc.stdin.write("lr 0.01\n")
        proc.stdin.flush()
        assert out.expect("hyperparameters now") == "hyperparameters now: lr=0.01"
        proc.stdin.write("save\n")
        proc.stdin.flush()
        assert out.expect("save_ckpt failed") == "save_ckpt failed [not_paused]: Model must be paused before save"
        proc.stdin.write("lr abc\n")
        proc.stdin.flush()
        assert out.expect("lr needs") == "? lr needs a number, got 'abc'"
        proc.stdin.write('{"cmd": "nope", "payload": {}}\n')
        proc.stdin.flush()
        assert out.expect("nope failed") == "nope failed [unknown_command]: Unknown cmd: nope"
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        assert proc.wait(WAIT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
        if trainer is not None:
            trainer.close()
    set_hparams = [m for m in trainer.commands if m.get("cmd") == "set_hparams"]
    assert set_hparams[0]["payload"] == {"lr": 0.01}
    assert all("id" in m for m in trainer.commands)


RUN_SCRIPT = textwrap.dedent(
    """
    import json, sys

    seq = 0
    def out(obj):
        sys.stdout.write(json.dumps(obj) + "\\n")
        sys.stdout.flush()

    def emit(**event):
        global seq
        seq += 1
        event.update(run_id="baseline", run_gen=0, ts=0.0, session_id="sess-run", event_seq=seq)
        out(event)

    print("training on cpu", file=sys.stderr, flush=True)
    emit(type="session_started", project="demo", run_name="baseline")
    emit(type="trainStep", step=1, epoch=0, loss=0.75, val_loss=None, throughput=500.0)
    if "--wait" in sys.argv:
        for line in sys.stdin:
            msg = json.loads(line)
            if msg["cmd"] == "status":
                out({"id": msg["id"], "ok": True, "data": {"step": 1, "paused": False}})
            elif msg["cmd"] == "stop":
                out({"id": msg["id"], "ok": True, "data": {"status": "stopping"}})
                break
    emit(type="trainingFinished", status="completed", step=1)
    if "--serve" in sys.argv:  # like the real session: keep serving until the dashboard goes away
        for line in sys.stdin:
            pass
        print("stdin closed; exiting", file=sys.stderr, flush=True)
        sys.exit(0)
    sys.exit(3)
    """
)


def test_run_in_process_returns_the_script_exit_code(tmp_path, capsys):
    script = tmp_path / "train.py"
    script.write_text(RUN_SCRIPT)
    assert main(["run", "--plain", str(script)]) == 3
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("running ") and str(script) in lines[0]
    body = lines[1:]
    assert "session started: project demo, run baseline" in body
    assert "step 1  epoch 0  loss 0.7500  500 samples/s" in body
    assert "[stderr] training on cpu" in body
    # stdout events keep their order; stderr lines come on another pipe and may land anywhere.
    assert body.index("session started: project demo, run baseline") < body.index(
        "training finished (completed) at step 1"
    )
    assert body[-1] == f"{script} exited with code 3"


def test_run_releases_a_serving_script_when_input_ends(tmp_path, capsys):
    script = tmp_path / "train.py"
    script.write_text(RUN_SCRIPT)
    # Under pytest stdin is unusable, which counts as end of input: nobody can type `stop`.
    assert main(["run", "--plain", str(script), "--serve"]) == 0
    lines = capsys.readouterr().out.splitlines()
    finished = lines.index("training finished (completed) at step 1")
    released = lines.index("training finished and no more input: closing the script's stdin")
    assert finished < released
    assert "[stderr] stdin closed; exiting" in lines
    assert lines[-1] == f"{script} exited with code 0"


def test_run_subprocess_with_typed_commands(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(RUN_SCRIPT)
    proc = cli_process(["run", "--plain", str(script), "--wait"], tmp_path)
    out = LineReader(proc.stdout)
    try:
        out.expect("step 1  epoch 0  loss 0.7500")
        proc.stdin.write("status\n")
        proc.stdin.flush()
        assert out.expect("status:") == "status: running  step 1"
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        # The reply and the script's last event are printed by different threads: any order.
        out.expect_all(["stopping", "training finished (completed) at step 1"])
        assert out.expect("exited with code") == f"{script} exited with code 3"
        assert proc.wait(WAIT) == 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)


def test_listen_exits_cleanly_on_ctrl_c(tmp_path):
    import signal

    proc = cli_process(["listen", "--port", "0", "--plain"], tmp_path)
    out = LineReader(proc.stdout)
    try:
        out.expect("listening on")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(WAIT) == 0
        assert out.expect("interrupted") == "interrupted"
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
