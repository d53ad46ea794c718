"""Run control: pause, resume, stop, the dashboard's version veto, and reset to the start.

Commands: `pause`, `resume`, `stop`, `enforce_version`, `reset_session`.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Annotated, Any, Optional

from ..control.constraints import Range, SafeName
from ..control.errors import CommandError, ErrorCode
from .command import command


@dataclass
class NoPayload:
    """No payload fields (extra keys are ignored)."""


@dataclass
class Pause:
    reason: str = "manual"
    #: Pause at the first batch boundary at or after this optimizer step, instead of the next one.
    at_step: Optional[Annotated[int, Range(ge=0)]] = None
    #: Pause at the first batch boundary of this epoch (right after its first step).
    at_epoch: Optional[Annotated[int, Range(ge=0)]] = None


@dataclass
class EnforceVersion:
    message: str = "Current onthefly version is outdated."
    required: Optional[str] = None
    reported: Optional[str] = None


@dataclass
class ResetSession:
    reason: str = "manual"
    run_name: Optional[Annotated[str, SafeName]] = None
    dedupe: bool = True


class ControlMixin:
    """The run's control commands (no state of its own: the gate holds the paused flag)."""

    @command("pause", Pause, mutating=True,
             description="pause at the next batch boundary, or schedule a pause at a step or epoch")
    def cmd_pause(self, p: Pause) -> Any:
        """Pause now (the reply names the pause checkpoint once it is on disk, never one that failed),
        or, with `at_step`/`at_epoch` still ahead, schedule the pause and reply at once."""
        if p.at_step is not None and p.at_epoch is not None:
            raise CommandError("payload: give at_step or at_epoch, not both", ErrorCode.BAD_PAYLOAD)
        st = self.state
        if p.at_step is not None and p.at_step > st.step:
            self.lifecycle.scheduled_pause = ("step", p.at_step, p.reason)
            return {"status": "scheduled", "at_step": p.at_step, "step": st.step}
        if p.at_epoch is not None and p.at_epoch > st.epoch:
            self.lifecycle.scheduled_pause = ("epoch", p.at_epoch, p.reason)
            return {"status": "scheduled", "at_epoch": p.at_epoch, "step": st.step}
        reply = self.console.pause({"action": "pause", "reason": p.reason})
        written = self.pending_write(reply.get("ckpt"))
        if written is None:
            return reply
        answer: Future = Future()

        def done(f: Future) -> None:
            if f.exception() is not None:
                answer.set_result({**reply, "ckpt": None, "ckpt_error": str(f.exception())})
            else:
                answer.set_result(reply)

        written.add_done_callback(done)
        return answer

    def check_scheduled_pause(self) -> None:
        """After a step, while a pause is scheduled: pause once the run reaches its step or epoch."""
        kind, at, reason = self.lifecycle.scheduled_pause
        if (self.state.step if kind == "step" else self.state.epoch) < at:
            return
        self.lifecycle.scheduled_pause = None
        self.console.pause({"action": "pause", "reason": reason, f"at_{kind}": at})

    def pause_at_start(self) -> None:
        """`start_paused`: hold the run at its first boundary, before its first step, until resumed."""
        self.console.pause({"action": "pause", "reason": "start_paused"}, checkpoint=False)

    @command("resume", NoPayload, mutating=True, description="continue training")
    def cmd_resume(self, p: NoPayload) -> dict[str, Any]:
        if not self.state.training and self.reposition_pending and self.state.running:
            self.lifecycle.restart_requested = True  # serving after training: train the new starting point
        return self.console.resume()

    @command("stop", NoPayload, mutating=False, description="end training after the current batch")
    def cmd_stop(self, p: NoPayload) -> dict[str, Any]:
        self.request_stop()
        return {"status": "stopping", "step": self.state.step}

    @command("enforce_version", EnforceVersion, mutating=False,
             description="the dashboard refuses this version: stop with its message")
    def cmd_enforce_version(self, p: EnforceVersion) -> dict[str, Any]:
        self.lifecycle.fatal = p.message
        self.log(p.message, level="error")
        self.request_stop()
        return {"status": "fatal", "message": p.message}

    @command("reset_session", ResetSession, mutating=True,
             description="restore the state captured at the start of training, as a new run")
    def cmd_reset_session(self, p: ResetSession) -> dict[str, Any]:
        self.console.pause({"action": "reset", "reason": p.reason}, checkpoint=False)
        if not self.restore_baseline():
            self.log("[reset] no baseline state was captured; weights are unchanged", level="warn")
        st = self.state
        st.step = st.epoch = st.batch_in_epoch = st.run_start_step = 0
        st.last_val_loss = None
        st.last_metrics = {}
        self.forks.budget = None
        name = self.unique_run_name(p.run_name or self.runs.initial_name, dedupe=p.dedupe)
        self.start_new_run(name, parents=[], meta={"kind": "reset", "reason": p.reason},
                           transition=False, announce=False)
        self.rebind_train_loader(None)
        self.request_reposition()
        self.log(f"[reset] session cleared; '{name}' ready for resume.")
        self.emit("session_reset", run_id=name, display_name=name)
        return {"ok": True, "run_id": name, "display_name": name, "project": self.cfg.project,
                "session_id": self.session_id}
