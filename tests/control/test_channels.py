"""channels: framing and decoding shared by every transport, and each transport's behaviour."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from onthefly.control.channels import (
    LineDecoder,
    MemoryChannel,
    NullChannel,
    StdioChannel,
)
from onthefly.control.tcp import TcpClientChannel, channel_from_env
from onthefly.control.envelope import MAX_LINE_BYTES
from onthefly.control.errors import ErrorCode, ProtocolError

from .conftest import WAIT, wait_until


class RecordingSink:
    """A LineSink that records everything, in order, with thread-safe waits."""

    def __init__(self) -> None:
        self.items: list[object] = []
        self.cond = threading.Condition()

    def _add(self, item: object) -> None:
        with self.cond:
            self.items.append(item)
            self.cond.notify_all()

    def line_received(self, line: str) -> None:
        self._add(("line", line))

    def line_rejected(self, error: ProtocolError) -> None:
        self._add(("rejected", error.code, error.message))

    def connection_changed(self, connected: bool) -> None:
        self._add(("connected", connected))

    def wait_for(self, predicate, timeout: float = WAIT) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self.items), timeout)

    def lines(self) -> list[str]:
        with self.cond:
            return [item[1] for item in self.items if item[0] == "line"]


# ---- LineDecoder --------------------------------------------------------------------------------


def test_multibyte_characters_split_at_every_byte_offset():
    line = '{"text":"é € 😀 ü"}'
    data = line.encode("utf-8") + b"\n"
    for cut in range(len(data) + 1):
        decoder = LineDecoder()
        events = decoder.feed(data[:cut]) + decoder.feed(data[cut:])
        assert events == [line], f"split at byte {cut}"


def test_byte_by_byte_feeding_yields_the_same_lines():
    text = "αβγ\r\n\n   \n{\"a\":\"😀\"}\n"
    decoder = LineDecoder()
    events = []
    for byte in text.encode("utf-8"):
        events += decoder.feed(bytes([byte]))
    assert events == ["αβγ", '{"a":"😀"}']  # \r stripped, blank and whitespace-only lines ignored


def test_several_lines_in_one_feed_and_a_partial_tail():
    decoder = LineDecoder()
    assert decoder.feed(b'a\nb\nc') == ["a", "b"]
    assert decoder.partial_bytes == 1
    assert decoder.feed(b'd\n') == ["cd"]
    assert decoder.partial_bytes == 0


def test_oversize_line_is_rejected_once_and_the_next_line_still_parses():
    decoder = LineDecoder()
    chunk = b"x" * (1 << 20)
    events = []
    size = 20 * (1 << 20)
    for _ in range(20):
        events += decoder.feed(chunk)
    assert events == []  # nothing reported until the line ends, nothing held but a count
    events += decoder.feed(b'\n{"cmd":"status"}\n')
    assert len(events) == 2
    error, line = events
    assert isinstance(error, ProtocolError) and error.code == ErrorCode.BAD_ENVELOPE
    assert f"line of {size} bytes exceeds the {MAX_LINE_BYTES}-byte limit" in error.message
    assert line == '{"cmd":"status"}'


def test_a_line_of_exactly_the_limit_is_accepted():
    decoder = LineDecoder(max_line_bytes=8)
    assert decoder.feed(b"12345678\n123456789\nok\n")[0] == "12345678"
    events = LineDecoder(max_line_bytes=8).feed(b"123456789\nok\n")
    assert isinstance(events[0], ProtocolError) and events[1] == "ok"


def test_invalid_utf8_is_bad_json_then_the_stream_resynchronises():
    decoder = LineDecoder()
    events = decoder.feed(b'{"a":"\xff\xfe"}\n{"cmd":"ok"}\n')
    assert isinstance(events[0], ProtocolError) and events[0].code == ErrorCode.BAD_JSON
    assert "not valid UTF-8" in events[0].message
    assert events[1] == '{"cmd":"ok"}'


def test_invalid_utf8_split_across_feeds_and_truncated_characters():
    decoder = LineDecoder()
    # A bad byte in the middle of a line that arrives in pieces: one rejection for the line.
    events = decoder.feed(b'{"a":"ok') + decoder.feed(b"\xc3\x28 more") + decoder.feed(b' text"}\nnext\n')
    assert [type(e) for e in events] == [ProtocolError, str] and events[1] == "next"
    # A multi-byte character cut off by the newline is not silently dropped.
    events = LineDecoder().feed(b"abc\xe2\x82\nabc\n")
    assert isinstance(events[0], ProtocolError) and events[0].code == ErrorCode.BAD_JSON
    assert events[1] == "abc"


def test_decoder_rejects_nonsense_limits():
    with pytest.raises(ValueError, match="max_line_bytes must be > 0"):
        LineDecoder(max_line_bytes=0)


# ---- Memory, Null, env --------------------------------------------------------------------------


def test_memory_channel_round_trip():
    channel, sink = MemoryChannel(), RecordingSink()
    channel.start(sink)
    assert channel.send(b'{"a":1}\n') is False  # no dashboard yet
    channel.connect()
    assert channel.connected
    assert channel.send(b'{"a":1}\n{"b":2}\n') is True
    assert channel.sent == ['{"a":1}', '{"b":2}']
    channel.inject('{"cmd":"pause"}')
    channel.inject(b"\xff\n")
    assert channel.wait_for(lambda sent: len(sent) == 2, timeout=0.1)
    channel.fail_next_sends(1)
    assert channel.send(b'{"c":3}\n') is False and not channel.connected
    assert sink.items == [
        ("connected", True),
        ("line", '{"cmd":"pause"}'),
        ("rejected", ErrorCode.BAD_JSON, sink.items[2][2]),
        ("connected", False),
    ]
    assert channel.wait_for(lambda sent: len(sent) == 3, timeout=0.05) is False


def test_null_channel_is_never_connected():
    channel = NullChannel()
    channel.start(RecordingSink())
    assert channel.name == "off" and channel.connected is False and channel.send(b"x\n") is False
    channel.close()


def test_channel_from_env(monkeypatch):
    monkeypatch.delenv("ONTHEFLY_TRANSPORT", raising=False)
    monkeypatch.setenv("ONTHEFLY_DASHBOARD_PORT", "51234")
    default = channel_from_env()
    assert isinstance(default, TcpClientChannel) and default.port == 51234 and default.host == "127.0.0.1"
    monkeypatch.setenv("ONTHEFLY_TRANSPORT", " OFF ")
    assert isinstance(channel_from_env(), NullChannel)
    monkeypatch.setenv("ONTHEFLY_TRANSPORT", "stdio")
    assert isinstance(channel_from_env(), StdioChannel)
    monkeypatch.setenv("ONTHEFLY_TRANSPORT", "carrier-pigeon")
    with pytest.raises(ValueError, match="ONTHEFLY_TRANSPORT='carrier-pigeon' is not a transport"):
        channel_from_env()


def test_tcp_channel_argument_checks(monkeypatch):
    with pytest.raises(ValueError, match="non-loopback dashboard host '10.1.2.3'"):
        TcpClientChannel("10.1.2.3", 1234)
    with pytest.raises(ValueError, match="non-loopback dashboard host 'example.com'"):
        TcpClientChannel("example.com", 1234)
    assert TcpClientChannel("10.1.2.3", 1234, allow_remote=True).host == "10.1.2.3"
    assert TcpClientChannel("localhost", 1234).port == 1234
    assert TcpClientChannel("::1", 1234).host == "::1"
    with pytest.raises(ValueError, match="port must be an integer in 1..65535, got 0"):
        TcpClientChannel(port=0)
    with pytest.raises(ValueError, match="reconnect_initial"):
        TcpClientChannel(port=1, reconnect_initial=5, reconnect_max=1)
    with pytest.raises(ValueError, match="connect_timeout must be a positive number"):
        TcpClientChannel(port=1, connect_timeout=0)
    monkeypatch.setenv("ONTHEFLY_DASHBOARD_PORT", "not-a-port")
    assert TcpClientChannel().port == 47621
    monkeypatch.delenv("ONTHEFLY_DASHBOARD_PORT")
    assert TcpClientChannel().port == 47621


# ---- TCP ----------------------------------------------------------------------------------------


def test_tcp_channel_connects_late_reads_writes_and_reconnects(line_server):
    # Reserve a port with nobody listening: the channel must retry in the background.
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    channel, sink = TcpClientChannel(port=port, reconnect_initial=0.01, reconnect_max=0.05), RecordingSink()
    started = time.monotonic()
    channel.start(sink)
    assert time.monotonic() - started < 0.5  # start never blocks on connecting
    assert channel.send(b"lost\n") is False
    try:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(1)
        conn, _ = listener.accept()
        assert sink.wait_for(lambda items: ("connected", True) in items)
        assert channel.send('{"x":"é"}\n'.encode()) is True
        assert conn.recv(100) == '{"x":"é"}\n'.encode()
        conn.sendall(b'{"cmd":"a"}\n{"cmd"')
        conn.sendall(b':"b"}\n')
        assert sink.wait_for(lambda items: len([i for i in items if i[0] == "line"]) == 2)
        assert sink.lines() == ['{"cmd":"a"}', '{"cmd":"b"}']
        conn.close()  # the dashboard goes away ...
        assert sink.wait_for(lambda items: ("connected", False) in items)
        conn2, _ = listener.accept()  # ... and comes back: the channel reconnects by itself
        assert sink.wait_for(lambda items: items.count(("connected", True)) == 2)
        assert channel.send(b"again\n") is True
        assert conn2.recv(100) == b"again\n"
        assert channel.connections == 2
        conn2.close()
        listener.close()
    finally:
        channel.close(timeout=1.0)


def test_tcp_channel_close_is_graceful(line_server):
    server = line_server()
    channel, sink = TcpClientChannel(port=server.port, reconnect_initial=0.01), RecordingSink()
    channel.start(sink)
    assert server.wait_connected()
    assert wait_until(lambda: channel.connected)
    payload = b"".join(b'{"n":%d}\n' % i for i in range(5000))
    assert channel.send(payload)
    channel.close(timeout=WAIT)  # FIN after the data: the server reads all of it, then EOF
    assert server.wait_for(lambda: len(server.lines) == 5000)
    assert json.loads(server.lines[-1]) == {"n": 4999}
    assert not channel.connected and sink.items[-1] == ("connected", False)


# ---- stdio --------------------------------------------------------------------------------------


STDIO_CHILD = textwrap.dedent(
    """
    import os, sys
    from onthefly.control import ControlBus, StdioChannel
    bus = ControlBus(StdioChannel(), session_id="s-stdio")
    bus.start()
    print("junk from print")
    sys.stdout.write("junk via sys.stdout\\n")
    os.write(1, b"junk via fd 1\\n")
    for i in range(200):
        bus.emit("log", {"text": f"e{i}"})
    request = bus.next_request(timeout=20)
    bus.reply(request.id, {"cmd": request.cmd, "payload": request.payload})
    print("user output after the reply", flush=True)
    bus.emit("trainingFinished", {"status": "completed"})
    """
)


def test_stdio_protocol_stream_carries_only_json_while_prints_go_to_stderr():
    child = subprocess.Popen(
        [sys.executable, "-c", STDIO_CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    watchdog = threading.Timer(WAIT * 2, child.kill)
    watchdog.start()
    try:
        child.stdin.write('{"id":"q1","cmd":"status","payload":{"ü":1}}\n'.encode())
        child.stdin.flush()
        lines = []
        while True:  # read until the child ends the stream (atexit flush, then close)
            raw = child.stdout.readline()
            if not raw:
                break
            lines.append(raw)
        child.stdin.close()
        stderr = child.stderr.read().decode()
        assert child.wait(WAIT) == 0, stderr
    finally:
        watchdog.cancel()
    messages = [json.loads(raw.decode("utf-8")) for raw in lines]  # every line is JSON
    events = [m for m in messages if "type" in m]
    assert [e["event_seq"] for e in events] == list(range(1, 202))
    assert [e["text"] for e in events[:200]] == [f"e{i}" for i in range(200)]
    assert events[-1]["type"] == "trainingFinished" and events[-1]["session_id"] == "s-stdio"
    replies = [m for m in messages if "ok" in m]
    assert replies == [{"id": "q1", "ok": True, "data": {"cmd": "status", "payload": {"ü": 1}}}]
    for junk in ("junk from print", "junk via sys.stdout", "junk via fd 1", "user output after the reply"):
        assert junk in stderr
