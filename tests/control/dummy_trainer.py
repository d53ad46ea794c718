"""A dummy training loop on the real control plane (no torch): used by test_end_to_end.py.

    python -m tests.control.dummy_trainer tcp PORT | stdio

Each "batch" sleeps `batch_s` and checks the gate at its boundary, like a real loop. Commands:
pause/resume (mutating), `whoami` (mutating: returns the thread it ran on), `ping` (read-only:
answered at once, with whether the loop was inside a batch), `slow_batch` (read-only: makes the
next batch last `seconds`), `stop`.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass

from onthefly.control import (
    CommandDispatcher,
    CommandRouter,
    ConsoleAction,
    ControlBus,
    PauseGate,
    StdioChannel,
    TcpClientChannel,
)


@dataclass
class Seconds:
    seconds: float = 0.5


class DummyLoop:
    def __init__(self, channel, batch_s: float = 0.01) -> None:
        self.batch = 0
        self.batch_s = batch_s
        self.next_batch_s: float | None = None
        self.in_batch = False
        self.running = True
        self.bus = ControlBus(channel)
        self.bus.set_context(run_id="dummy", run_gen=0, session_id="sess-dummy")
        self.gate = PauseGate()
        self.console = ConsoleAction(self.gate, self, self.bus.emit)
        router = CommandRouter()
        router.register("pause", lambda p: self.console.pause(), mutating=True)
        router.register("resume", lambda p: self.console.resume(), mutating=True)
        router.register("whoami", lambda p: {"thread": threading.current_thread().name, "batch": self.batch},
                        mutating=True)
        router.register("ping", lambda p: {"batch": self.batch, "in_batch": self.in_batch}, mutating=False)
        router.register("slow_batch", self.slow_batch, schema=Seconds, mutating=False)
        router.register("stop", self.stop, mutating=False)
        self.dispatcher = CommandDispatcher(self.bus, router, self.gate)

    # ControlDelegate
    def current_step(self) -> int:
        return self.batch

    def checkpoint_for_pause(self) -> None:
        return None

    def on_paused(self) -> None: ...

    def on_resumed(self) -> None: ...

    def await_snapshot_copy(self) -> None: ...

    def slow_batch(self, p: Seconds) -> dict:
        self.next_batch_s = p.seconds
        return {"ok": True}

    def stop(self, p) -> dict:
        self.running = False
        self.gate.wake()
        return {"status": "stopping"}

    def run(self) -> None:
        threading.current_thread().name = "training-loop"
        self.bus.start()
        self.dispatcher.start()
        while self.running:
            if self.gate.pending:
                self.gate.service(keep_going=lambda: self.running)
            self.in_batch = True
            duration, self.next_batch_s = self.next_batch_s or self.batch_s, None
            time.sleep(duration)
            self.in_batch = False
            self.batch += 1
            self.bus.emit("trainStep", {"step": self.batch})
        self.bus.emit("trainingFinished", {"status": "stopped", "step": self.batch})
        self.dispatcher.stop()
        self.bus.close()


if __name__ == "__main__":
    mode = sys.argv[1]
    channel = TcpClientChannel("127.0.0.1", int(sys.argv[2])) if mode == "tcp" else StdioChannel()
    loop = DummyLoop(channel)
    print("user code printing to stdout must not corrupt the protocol")
    loop.run()
