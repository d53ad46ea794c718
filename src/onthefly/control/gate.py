"""The pause gate: where commands meet the training thread at a batch boundary.

Every command that mutates model, optimizer, data or run state is handed to the gate as a job and
runs on the training thread, at a batch boundary, never concurrently with a step. The training
loop's only per-batch cost is reading one attribute (`gate.pending`), which is False unless a job
is waiting or the run is paused.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Protocol, runtime_checkable

Job = Callable[[], Any]


class JobHooks(Protocol):
    """What a distributed session does around each job: tell the other ranks, then compare outcomes.

    `replica` is the job's picklable description (command name and validated payload), or None
    for a job only this process can run. An exception from a hook is fatal to the loop: it fails
    the job and propagates to the training thread.
    """

    def before_job(self, name: str, replica: Any) -> None: ...

    def after_job(self, name: str, replica: Any, error: BaseException | None) -> None: ...

    def idle(self) -> None:
        """Called about every `poll` seconds while the paused loop waits for a job."""


class GateClosed(RuntimeError):
    """The gate was closed (training ended with nobody left to run the job)."""


class PauseGate:
    """A FIFO of jobs for the training thread, plus the paused flag.

    Threads other than the training thread call `submit`; the training thread calls `service()`
    whenever `pending` is true (checked once per batch).
    """

    def __init__(self) -> None:
        #: The one flag the loop reads per batch: a job is waiting, or the run is paused.
        self.pending: bool = False
        self.paused: bool = False
        self._jobs: deque[tuple[Job, Future, str, Any]] = deque()
        self._cv = threading.Condition()
        self._closed = False
        #: Wraps every job (e.g. an RNG guard so a pause window leaves training untouched).
        self.job_context: Callable[[str], AbstractContextManager[Any]] = lambda name: nullcontext()
        #: Set by a distributed session while its ranks share a pause window (see `JobHooks`).
        self.hooks: JobHooks | None = None

    # ---- any thread -------------------------------------------------------------------------
    def should_block(self) -> bool:
        """True when the training thread must stop at this boundary (O(1), no lock)."""
        return self.pending

    def submit(self, job: Job, *, name: str = "job", replica: Any = None) -> Future:
        """Queue `job` for the training thread; its result or exception lands in the future.

        `replica` describes the job to other ranks of a distributed run (see `JobHooks`).
        """
        future: Future = Future()
        with self._cv:
            if self._closed:
                future.set_exception(GateClosed(f"cannot run {name!r}: training is no longer running"))
                return future
            self._jobs.append((job, future, name, replica))
            self.pending = True
            self._cv.notify_all()
        return future

    def wake(self) -> None:
        """Wake a training thread blocked in `service` so it re-checks its state."""
        with self._cv:
            self._cv.notify_all()

    def interrupt(self) -> None:
        """Make the loop stop at its next boundary to re-check its state (e.g. after `stop`)."""
        with self._cv:
            self.pending = True
            self._cv.notify_all()

    @property
    def queued(self) -> int:
        return len(self._jobs)

    def close(self, reason: str = "training is no longer running") -> None:
        """Refuse new jobs and fail the queued ones; used when nothing will service the gate again."""
        with self._cv:
            self._closed = True
            leftovers = list(self._jobs)
            self._jobs.clear()
            self.paused = False
            self.pending = False
            self._cv.notify_all()
        for _, future, name, _ in leftovers:
            if future.set_running_or_notify_cancel():
                future.set_exception(GateClosed(f"cannot run {name!r}: {reason}"))

    def reopen(self) -> None:
        with self._cv:
            self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    # ---- training thread --------------------------------------------------------------------
    def run_pending(self) -> int:
        """Run every queued job in FIFO order on the calling thread; returns how many ran."""
        ran = 0
        while True:
            with self._cv:
                if not self._jobs:
                    self.pending = self.paused
                    return ran
                job, future, name, replica = self._jobs.popleft()
            self._run(job, future, name, replica)
            ran += 1

    def service(self, *, keep_going: Callable[[], bool] = lambda: True, poll: float = 0.25) -> int:
        """Run queued jobs, and while paused keep running jobs as they arrive.

        Returns once the gate is not paused and no job is queued, or when `keep_going()` turns
        false (e.g. the run was stopped). Blocks on a condition variable, never spins.
        """
        ran = self.run_pending()
        while keep_going():
            with self._cv:
                idle = not self._jobs
                if idle:
                    if not self.paused or self._closed:
                        self.pending = self.paused
                        return ran
                    self._cv.wait(timeout=poll)
            if idle:
                if self.hooks is not None:
                    self.hooks.idle()
                continue
            ran += self.run_pending()
        return ran

    def serve(self, until: Callable[[], bool], poll: float = 0.25) -> None:
        """Run jobs as they arrive until `until()` is true (used after training, while a dashboard is attached)."""
        while not until():
            with self._cv:
                if not self._jobs:
                    self._cv.wait(timeout=poll)
                    continue
            self.run_pending()

    def _run(self, job: Job, future: Future, name: str, replica: Any = None) -> None:
        if not future.set_running_or_notify_cancel():
            return
        hooks = self.hooks
        if hooks is not None:
            try:
                hooks.before_job(name, replica)
            except BaseException as exc:
                future.set_exception(exc)
                raise
        error: BaseException | None = None
        result: Any = None
        try:
            with self.job_context(name):
                result = job()
        except BaseException as exc:
            error = exc
        if hooks is not None:
            try:
                hooks.after_job(name, replica, error)
            except BaseException as exc:
                future.set_exception(error if error is not None else exc)
                raise
        if error is None:
            future.set_result(result)
            return
        future.set_exception(error)  # handed to the waiting requester, never lost
        if not isinstance(error, Exception):
            raise error


@runtime_checkable
class ControlDelegate(Protocol):
    """What a session provides to the pause window."""

    def current_step(self) -> int:
        """The step the run is at (for `paused`/`resumed` events and replies)."""

    def checkpoint_for_pause(self) -> str | None:
        """Snapshot the state for a pause and return the checkpoint path (written in the background)."""

    def on_paused(self) -> None:
        """Called on the training thread right after the run became paused."""

    def on_resumed(self) -> None:
        """Called on the training thread right before the run continues."""

    def await_snapshot_copy(self) -> None:
        """Block until the pause checkpoint's copy of the state is complete (before mutating it)."""


EmitFn = Callable[[str, dict], Any]


class ConsoleAction:
    """The pause window: pausing, resuming, and running an action inside a pause.

    All methods run on the training thread (they are gate jobs).
    """

    def __init__(self, gate: PauseGate, delegate: ControlDelegate, emit: EmitFn) -> None:
        self.gate = gate
        self.delegate = delegate
        self.emit = emit
        self.pause_ckpt: str | None = None
        #: How many times the run has entered a pause (for diagnostics such as determinism_health).
        self.pause_generation = 0

    @property
    def paused(self) -> bool:
        return self.gate.paused

    def pause(self, request: dict | None = None, *, checkpoint: bool = True) -> dict:
        """Enter the paused state (idempotent) and emit `paused` once."""
        step = self.delegate.current_step()
        if self.gate.paused:
            return {"status": "paused", "step": step, "ckpt": self.pause_ckpt}
        self.gate.paused = True
        self.gate.pending = True
        self.pause_generation += 1
        self.pause_ckpt = self.delegate.checkpoint_for_pause() if checkpoint else None
        event: dict[str, Any] = {"step": step, "request": request or {"action": "pause", "reason": "manual"}}
        if self.pause_ckpt is not None:
            event["ckpt"] = self.pause_ckpt
        self.emit("paused", event)
        self.delegate.on_paused()
        return {"status": "paused", "step": step, "ckpt": self.pause_ckpt}

    def resume(self) -> dict:
        """Leave the paused state (idempotent) and emit `resumed` once."""
        step = self.delegate.current_step()
        if self.gate.paused:
            self.delegate.on_resumed()
            self.gate.paused = False
            self.pause_ckpt = None
            self.gate.wake()
            self.emit("resumed", {"step": step})
        return {"status": "resumed", "step": step}

    def pause_window(self, request: dict, action: Callable[[], Any], *, checkpoint: bool = True) -> Any:
        """Run `action` paused: pause first if needed, and resume afterwards only if we paused."""
        if self.gate.paused:
            self.delegate.await_snapshot_copy()
            return action()
        self.pause(request, checkpoint=checkpoint)
        self.delegate.await_snapshot_copy()  # the action may change what the pause checkpoint copies
        try:
            return action()
        finally:
            self.resume()
