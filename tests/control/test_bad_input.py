"""Bad input over real loopback TCP: every bad line gets an error naming it, and training never stalls.

A dummy training loop (a thread running 1 ms "batches" and checking a pause flag each batch) runs
throughout; after every kind of bad input it must still be making progress, and a good command
must still be answered.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import pytest

from onthefly.control import ControlBus, CommandRouter, ProtocolError, TcpClientChannel

from .conftest import WAIT, LineServer, wait_until


@dataclass
class EchoPayload:
    n: int
    s: str = ""


class Harness:
    """Dashboard stand-in + bus + router + command-drain thread + dummy training loop."""

    def __init__(self, server: LineServer, queue_size: int = 1024, drain: bool = True) -> None:
        self.server = server
        self.bus = ControlBus(
            TcpClientChannel(port=server.port, reconnect_initial=0.01, reconnect_max=0.1),
            queue_size=queue_size,
        )
        self.router = CommandRouter()
        self.router.register("echo", lambda p: {"n": p.n, "s": p.s}, schema=EchoPayload, mutating=False)
        self.router.register("status", lambda p: {"batches": self.batches}, mutating=False)
        self.batches = 0
        self.pause_requested = threading.Event()
        self._stop = threading.Event()
        self._drain_thread = threading.Thread(target=self._drain, name="dummy-drain", daemon=True)
        self._train_thread = threading.Thread(target=self._train, name="dummy-train", daemon=True)
        self._drain_at_start = drain

    def start(self) -> None:
        self.bus.start()
        self._train_thread.start()
        if self._drain_at_start:
            self.start_drain()
        assert self.server.wait_connected() and wait_until(lambda: self.bus.connected)

    def start_drain(self) -> None:
        self._drain_thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in (self._train_thread, self._drain_thread):
            if thread.is_alive():
                thread.join(WAIT)
        self.bus.close()

    def _train(self) -> None:
        while not self._stop.is_set():
            if self.pause_requested.is_set():  # the per-batch gate check
                self._stop.wait(0.001)
                continue
            self.batches += 1
            time.sleep(0.001)  # one "batch" of work

    def _drain(self) -> None:
        while not self._stop.is_set():
            request = self.bus.next_request(timeout=0.05)
            if request is None:
                continue
            try:
                spec, payload = self.router.validate(request)
                self.bus.reply(request.id, self.router.execute(spec, payload))
            except ProtocolError as exc:
                self.bus.reply_error(request.id, exc.code, exc.message)

    # ---- checks ----
    def assert_training_progresses(self) -> None:
        start = self.batches
        assert wait_until(lambda: self.batches >= start + 5), "the training loop stalled"

    def assert_still_answers(self, tag: str) -> None:
        self.server.send_json({"id": f"alive-{tag}", "cmd": "echo", "payload": {"n": 1}})
        assert self.server.wait_for(lambda: f"alive-{tag}" in self.server.replies())
        assert self.server.replies()[f"alive-{tag}"]["data"] == {"n": 1, "s": ""}

    def reply(self, request_id: str) -> dict:
        assert self.server.wait_for(lambda: request_id in self.server.replies()), f"no reply to {request_id}"
        return self.server.replies()[request_id]

    def error_event(self, index: int = 0) -> dict:
        assert self.server.wait_for(lambda: len(self.server.events("error")) > index), "no error event"
        return self.server.events("error")[index]


@pytest.fixture
def harness(line_server) -> Iterator[Harness]:
    h = Harness(line_server())
    h.start()
    yield h
    h.stop()


def test_invalid_json_gets_a_bad_json_error_event(harness):
    harness.server.send(b"{this is not json\n")
    event = harness.error_event()
    assert event["code"] == "bad_json" and "{this is not json" in event["text"]
    harness.assert_training_progresses()
    harness.assert_still_answers("json")


def test_a_json_array_gets_a_bad_envelope_error_event(harness):
    harness.server.send(b'[{"id":"x","cmd":"echo"}]\n')
    event = harness.error_event()
    assert event["code"] == "bad_envelope" and "got array" in event["text"]
    harness.assert_training_progresses()
    harness.assert_still_answers("array")


def test_missing_cmd_is_answered_to_its_id(harness):
    harness.server.send_json({"id": "no-cmd", "payload": {"n": 1}})
    reply = harness.reply("no-cmd")
    assert reply["ok"] is False and reply["code"] == "bad_envelope" and "no 'cmd'" in reply["error"]
    harness.assert_training_progresses()
    harness.assert_still_answers("cmd")


def test_unknown_command_lists_the_known_ones(harness):
    harness.server.send_json({"id": "unk", "cmd": "get_selected_region_indicez"})
    reply = harness.reply("unk")
    assert reply["code"] == "unknown_command"
    assert reply["error"] == "unknown command 'get_selected_region_indicez'; known: echo, status"
    harness.assert_training_progresses()
    harness.assert_still_answers("unknown")


def test_wrong_payload_types_name_the_field(harness):
    harness.server.send_json({"id": "p1", "cmd": "echo", "payload": {"n": "one"}})
    harness.server.send_json({"id": "p2", "cmd": "echo", "payload": ["n", 1]})
    harness.server.send_json({"id": "p3", "cmd": "echo", "payload": {}})
    assert harness.reply("p1")["code"] == "bad_payload"
    assert harness.reply("p1")["error"] == "payload.n: expected int, got str"
    assert harness.reply("p2")["code"] == "bad_envelope"
    assert harness.reply("p3")["error"] == "payload.n: required field is missing"
    harness.assert_training_progresses()
    harness.assert_still_answers("payload")


def test_a_20_mib_line_is_rejected_and_the_connection_stays_usable(harness):
    size = 20 * 1024 * 1024
    junk = b'{"id":"huge","cmd":"echo","payload":{"s":"' + b"x" * (size - 50)
    junk += b'"}}'
    harness.server.send(junk + b'\n{"id":"after","cmd":"echo","payload":{"n":2}}\n')
    event = harness.error_event()
    assert event["code"] == "bad_envelope"
    assert f"line of {len(junk)} bytes exceeds the {16 * 1024 * 1024}-byte limit" in event["text"]
    assert harness.reply("after")["data"] == {"n": 2, "s": ""}
    assert "huge" not in harness.server.replies()
    assert harness.server.accepted == 1  # same connection throughout
    harness.assert_training_progresses()


def test_a_character_split_across_two_tcp_writes_arrives_intact(harness):
    text = "naïve € 😀 done"
    data = json.dumps({"id": "utf8", "cmd": "echo", "payload": {"n": 3, "s": text}}, ensure_ascii=False).encode()
    cut = data.index("😀".encode()) + 2  # in the middle of the 4-byte emoji
    harness.server.send(data[:cut])
    time.sleep(0.05)  # deliberately separate TCP segments, so the reader sees two reads
    harness.server.send(data[cut:] + b"\n")
    assert harness.reply("utf8")["data"] == {"n": 3, "s": text}
    assert harness.server.events("error") == []
    harness.assert_training_progresses()


def test_ten_thousand_commands_at_once_each_get_a_reply(line_server):
    harness = Harness(line_server(), queue_size=64, drain=False)  # the queue fills: most are busy
    harness.start()
    try:
        blob = b"".join(
            json.dumps({"id": f"c{i}", "cmd": "echo", "payload": {"n": i}}).encode() + b"\n" for i in range(10_000)
        )
        harness.server.send(blob)
        assert harness.server.wait_for(lambda: len(harness.server.lines) >= 10_000 - 64)
        harness.start_drain()
        assert harness.server.wait_for(lambda: len(harness.server.lines) >= 10_000)
        harness.assert_training_progresses()
        replies = [m for m in harness.server.messages() if "ok" in m]
        ids = [m["id"] for m in replies]
        assert len(ids) == 10_000 and set(ids) == {f"c{i}" for i in range(10_000)}  # none lost, none twice
        handled = [m for m in replies if m["ok"]]
        busy = [m for m in replies if not m["ok"]]
        assert all(m["code"] == "busy" for m in busy)
        assert len(handled) == 64 and len(busy) == 10_000 - 64
        assert all(m["data"]["n"] == int(m["id"][1:]) for m in handled)
        assert harness.bus.busy_replies == len(busy)
    finally:
        harness.stop()
