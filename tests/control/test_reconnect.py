"""Reconnection: across dropped connections every event arrives exactly once, in order.

Two mechanisms together guarantee it: the backend's cursor replay (events never handed to a
socket are sent from the event log on reconnection), and the dashboard's gap-fill (events
handed to a socket that died in flight are fetched with `events_since`, here called directly
on the bus's event log, with duplicates at or below the last seen seq dropped).
"""

from __future__ import annotations

import json
import threading
import time

from onthefly.control import ControlBus, TcpClientChannel
from onthefly.control.bus import events_since_page

from .conftest import LineServer, wait_until

TOTAL = 5000


class GapFillingDashboard:
    """The dashboard side of the contract, done the simple way."""

    def __init__(self) -> None:
        self.bus = None  # set once the bus exists; the server only calls us after it connects
        self.accepted_seqs: list[int] = []
        self.last = 0
        self.duplicates = 0
        self.gap_fills = 0
        self.kills = 0
        self.lock = threading.Lock()

    def on_line(self, server: LineServer, line: str) -> None:
        message = json.loads(line)
        seq = message.get("event_seq")
        if seq is None:
            return
        with self.lock:
            if seq <= self.last:
                self.duplicates += 1
            else:
                if seq > self.last + 1:
                    self.gap_fills += 1
                    self._fill(upto=seq - 1)
                assert seq == self.last + 1, f"gap-fill left a hole before {seq} (last {self.last})"
                self._take(seq)
            # Kill off the batch boundaries (batches here are ~25 lines), so lines are in flight.
            if self.kills < 3 and len(self.accepted_seqs) >= (self.kills + 1) * 1000 + 13:
                self.kills += 1
                server.kill()  # RST: whatever is in flight to us is lost

    def _fill(self, upto: int) -> None:
        while self.last < upto:
            page = events_since_page(self.bus.event_log, self.last, limit=500)
            for event in page["events"]:
                if event["event_seq"] > upto:
                    return
                self._take(event["event_seq"])
            if not page["more"]:
                return

    def _take(self, seq: int) -> None:
        self.accepted_seqs.append(seq)
        self.last = seq


def test_three_killed_connections_with_gap_fill_lose_and_repeat_nothing(line_server):
    dashboard = GapFillingDashboard()
    server = line_server(on_line=dashboard.on_line)
    bus = ControlBus(TcpClientChannel(port=server.port, reconnect_initial=0.005, reconnect_max=0.05))
    dashboard.bus = bus
    bus.start()
    try:
        for i in range(1, TOTAL):
            bus.emit("trainStep", {"step": i, "loss": 1.0 / i, "pad": "z" * 64})
            if i % 25 == 0:
                time.sleep(0.001)  # a training loop's pace: the kills land mid-stream
        # Lines lost in flight are only noticed when a later event arrives, as in real life the
        # next trainStep would: send the last event once the third connection has been replaced.
        assert wait_until(lambda: dashboard.kills == 3 and server.accepted >= 4 and bus.connected)
        bus.emit("trainingFinished", {"status": "completed"})
        assert bus.flush(15)
        assert wait_until(lambda: dashboard.last == TOTAL), f"stuck at {dashboard.last}"
        with dashboard.lock:
            assert dashboard.accepted_seqs == list(range(1, TOTAL + 1)), (
                f"gap fills {dashboard.gap_fills}, duplicates {dashboard.duplicates}"
            )
    finally:
        bus.close()


def test_graceful_close_without_gap_fill_is_covered_by_cursor_replay(line_server, tcp_bus):
    server, bus = tcp_bus()
    for i in range(1, 1001):
        bus.emit("trainStep", {"step": i})
    assert server.wait_for(lambda: len(server.lines) == 1000)
    server.stop_listening()  # the dashboard goes away: nothing to reconnect to for a while
    server.close_gracefully()
    assert wait_until(lambda: not bus.connected)
    for i in range(1001, 2001):  # produced while disconnected: persisted, not sent
        bus.emit("trainStep", {"step": i})
    assert bus.flush(15)
    assert bus.event_log.count() == 2000 and len(server.lines) == 1000
    server.listen_again()
    assert server.wait_connected(count=2)
    for i in range(2001, 3001):
        bus.emit("trainStep", {"step": i})
    assert server.wait_for(lambda: len(server.lines) == 3000)
    seqs = [json.loads(line)["event_seq"] for line in server.lines]
    assert seqs == list(range(1, 3001))  # the backlog came first, then live events, no repeats
    assert bus.replayed_events == 1000
