"""The autopilot: declarative rules that recover a run by themselves, and `rollback`.

Rules are evaluated off the hot path, on a thread of their own (`onthefly-autopilot`), from the
`trainStep` and `epoch_end` events the writer thread has already persisted to the event log —
the losses the telemetry produces anyway, at its cadence, already read on the writer's side — so
the training thread pays nothing, not even a host sync. Kinds:

- `nonfinite_loss`: a reported loss is NaN or infinite (JSON null) after finite ones;
- `loss_spike`: a loss above `factor` x the running median of the last `window` good losses;
- `val_plateau`: the validation loss has not improved by `min_delta` for `patience` epochs.

When a rule fires, its action runs on the training thread at the next batch boundary, like any
command: the two loss rules pause, roll back to the newest checkpoint taken at or before the last
good reported step (weights and optimizer; the run keeps its position, so the batches since —
the bad one among them — are skipped), scale the learning rate by `lr_scale` and resume;
`val_plateau` scales the learning rate. Each step of an action is a ledger entry (origin
`autopilot`, with the rule's name) and the action is an `autopilot_fired` event. A rule fires at
most `max_fires` times per run and not again within `cooldown_steps`; while one action is in
flight no rule fires. Rollbacks need checkpoints (`ckpt_every_steps`); without one at or before
the good step the action only scales the learning rate and says so.

Commands: `autopilot` (list, enable, disable, set, clear; answered at once: rules change no
training state), `rollback` (mutating; also for people: restore a checkpoint's weights and
optimizer without moving the run).
"""

from __future__ import annotations

import json
import statistics
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal, Optional

from ..control.constraints import Length, Range, SafeName
from ..control.errors import CommandError, ErrorCode
from .command import command

RuleKind = Literal["loss_spike", "nonfinite_loss", "val_plateau"]
#: Seconds between two reads of the event log while rules are enabled.
POLL_S = 0.1


@dataclass
class RuleSpec:
    """One autopilot rule (see the module docstring for the kinds)."""

    name: Annotated[str, SafeName]
    kind: RuleKind
    enabled: bool = True
    #: loss_spike: fire when a loss exceeds factor x the running median.
    factor: Annotated[float, Range(gt=1, le=1e9)] = 3.0
    window: Annotated[int, Range(ge=3, le=100_000)] = 20
    min_history: Annotated[int, Range(ge=1, le=100_000)] = 5
    #: val_plateau: epochs without an improvement of at least min_delta.
    patience: Annotated[int, Range(ge=1, le=100_000)] = 3
    min_delta: Annotated[float, Range(ge=0, le=1e12)] = 0.0
    #: Multiply the learning rate by this after the rollback (or, for val_plateau, instead of one).
    lr_scale: Annotated[float, Range(gt=0, le=1)] = 0.5
    #: loss rules: roll back to the last good checkpoint before scaling the learning rate.
    rollback: bool = True
    max_fires: Annotated[int, Range(ge=1, le=1_000_000)] = 3
    cooldown_steps: Annotated[int, Range(ge=0, le=10**12)] = 0


def default_rules() -> list[RuleSpec]:
    """What `Trainer(autopilot=True)` uses."""
    return [RuleSpec("nonfinite", "nonfinite_loss"), RuleSpec("spike", "loss_spike"),
            RuleSpec("plateau", "val_plateau")]


@dataclass
class Autopilot:
    action: Literal["list", "enable", "disable", "set", "clear"] = "list"
    #: enable/disable: the rule (None: every rule).
    rule: Optional[Annotated[str, SafeName]] = None
    #: set: the rules (replacing the current ones).
    rules: Optional[Annotated[list[RuleSpec], Length(max=100)]] = None


@dataclass
class Rollback:
    """Restore weights and optimizer from a checkpoint of this run; the run keeps its position."""

    #: The checkpoint of the current run at exactly this step.
    step: Optional[Annotated[int, Range(ge=0)]] = None
    #: The newest checkpoint of the current run at or before this step.
    before_step: Optional[Annotated[int, Range(ge=0)]] = None
    #: A checkpoint file (any onthefly checkpoint of this model).
    path: Optional[str] = None


@dataclass
class RuleState:
    """A rule's memory: recent good losses, its firings, the best validation loss."""

    spec: RuleSpec
    losses: deque = field(default_factory=deque)
    fires: int = 0
    last_fired_step: int | None = None
    best_val: float | None = None
    bad_epochs: int = 0
    seen_finite: bool = False

    def may_fire(self, step: int) -> bool:
        spec = self.spec
        if not spec.enabled or self.fires >= spec.max_fires:
            return False
        return self.last_fired_step is None or step - self.last_fired_step >= spec.cooldown_steps

    def summary(self) -> dict[str, Any]:
        return {**asdict(self.spec), "fires": self.fires, "last_fired_step": self.last_fired_step}


@dataclass
class Decision:
    """A rule fired: what to do at the next boundary."""

    rule: str
    kind: str
    reason: str
    step: int  # the reported step that fired it
    good_step: int | None  # the last reported step whose loss was good
    rollback: bool
    lr_scale: float


class RuleBook:
    """The rules and their evaluation over a stream of events (pure: no threads, no session)."""

    def __init__(self) -> None:
        self.rules: dict[str, RuleState] = {}
        self.run_id: str | None = None
        self.good_step: int | None = None
        self.ignore_through: int = -1  # events up to this step predate the last action

    def set_rules(self, specs: list[RuleSpec]) -> None:
        names = [s.name for s in specs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise CommandError(f"payload.rules: rule names must be unique, got {duplicates} twice",
                               ErrorCode.BAD_PAYLOAD)
        for spec in specs:
            if spec.kind == "loss_spike" and spec.min_history > spec.window:
                raise CommandError(f"payload.rules: rule {spec.name!r}: min_history ({spec.min_history}) cannot "
                                   f"exceed window ({spec.window})", ErrorCode.BAD_PAYLOAD)
        self.rules = {s.name: RuleState(s, deque(maxlen=s.window)) for s in specs}

    @property
    def active(self) -> bool:
        return any(r.spec.enabled for r in self.rules.values())

    def feed(self, event: dict[str, Any]) -> Decision | None:
        """Account one persisted event; a `Decision` when a rule fires."""
        run_id = event.get("run_id")
        if run_id != self.run_id:  # another run (a fork, a merge): its losses start a new history
            self.run_id, self.good_step, self.ignore_through = run_id, None, -1
            for state in self.rules.values():
                state.losses.clear()
                state.best_val, state.bad_epochs, state.seen_finite = None, 0, False
        kind = event.get("type")
        step = event.get("step")
        if kind == "trainStep" and isinstance(step, int) and step > self.ignore_through and "loss" in event:
            return self.feed_loss(step, event["loss"])
        if kind == "epoch_end":
            value = event.get("val_loss")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return self.feed_val(int(event.get("epoch") or 0), float(value), self.good_step or 0)
        return None

    def feed_loss(self, step: int, loss: Any) -> Decision | None:
        finite = isinstance(loss, (int, float)) and not isinstance(loss, bool)
        fired: Decision | None = None
        spiked = False
        for state in self.rules.values():
            spec = state.spec
            if spec.kind == "nonfinite_loss":
                if finite:
                    state.seen_finite = True
                elif loss is None and state.seen_finite and fired is None and state.may_fire(step):
                    fired = self.fire(state, step, f"the loss reported at step {step} is not finite")
            elif spec.kind == "loss_spike" and finite:
                history = state.losses
                median = statistics.median(history) if len(history) >= spec.min_history else None
                if median is not None and median > 0 and loss > spec.factor * median:
                    spiked = True
                    if fired is None and state.may_fire(step):
                        fired = self.fire(state, step, f"loss {loss:.4g} at step {step} is "
                                                       f"{loss / median:.1f}x the running median {median:.4g}")
                else:
                    history.append(float(loss))
        if finite and not spiked:
            self.good_step = step  # the newest step whose loss no rule found suspicious
        return fired

    def feed_val(self, epoch: int, value: float, step: int) -> Decision | None:
        fired = None
        for state in self.rules.values():
            if state.spec.kind != "val_plateau":
                continue
            if state.best_val is None or value < state.best_val - state.spec.min_delta:
                state.best_val, state.bad_epochs = value, 0
                continue
            state.bad_epochs += 1
            if state.bad_epochs >= state.spec.patience and fired is None and state.may_fire(step):
                state.bad_epochs = 0
                fired = self.fire(state, step, f"val_loss has not improved on {state.best_val:.4g} for "
                                               f"{state.spec.patience} epoch(s) (epoch {epoch}: {value:.4g})",
                                  rollback=False)
        return fired

    def fire(self, state: RuleState, step: int, reason: str, *, rollback: bool | None = None) -> Decision:
        state.fires += 1
        state.last_fired_step = step
        spec = state.spec
        return Decision(spec.name, spec.kind, reason, step, self.good_step,
                        spec.rollback if rollback is None else rollback, spec.lr_scale)


@dataclass
class AutopilotState:
    """What AutopilotMixin owns."""

    book: RuleBook = field(default_factory=RuleBook)
    lock: threading.RLock = field(default_factory=threading.RLock)  # done callbacks may run inside it
    thread: threading.Thread | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    cursor: int = 0  # the last event_seq read
    in_flight: Future | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


class AutopilotMixin:
    """Owns `self.autopilot` (an `AutopilotState`)."""

    def _init_autopilot(self) -> None:
        self.autopilot = AutopilotState()

    def configure_autopilot(self, rules: Any) -> None:
        """Python API (`Trainer(autopilot=...)`): True for the default rules, or a list of rules (dicts or RuleSpec)."""
        if rules is None or rules is False:
            specs: list[RuleSpec] = []
        elif rules is True:
            specs = default_rules()
        else:
            from ..control.router import validate_payload

            specs = [r if isinstance(r, RuleSpec) else validate_payload(RuleSpec, r) for r in rules]
        with self.autopilot.lock:
            self.autopilot.book.set_rules(specs)

    # ---- the thread --------------------------------------------------------------------------
    def start_autopilot(self) -> None:
        """When training starts: watch the event log if any rule is enabled (never during a replay)."""
        pilot = self.autopilot
        if not pilot.book.rules or (pilot.thread is not None and pilot.thread.is_alive()):
            return
        if self.replaying:
            self.log("[autopilot] off during a replay: the recorded actions are replayed instead")
            return
        if self.ranks is not None or self.is_follower:
            self.log("[autopilot] off in a distributed run: its actions would run on rank 0 only", level="warn")
            return
        pilot.stop.clear()
        pilot.cursor = self.bus.event_log.last_seq()
        pilot.thread = threading.Thread(target=self.watch_events, name="onthefly-autopilot", daemon=True)
        pilot.thread.start()

    def stop_autopilot(self, timeout: float = 5.0) -> None:
        pilot = self.autopilot
        pilot.stop.set()
        thread = pilot.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        pilot.thread = None

    def watch_events(self) -> None:
        """The autopilot thread: read new persisted events, feed the rules, act on a decision."""
        pilot = self.autopilot
        log = self.bus.event_log
        while not pilot.stop.wait(POLL_S):
            with pilot.lock:
                if not pilot.book.active:
                    continue
            try:
                rows = log.read_after(pilot.cursor, 2000)
            except RuntimeError:  # the event log was closed: the session is going away
                return
            for seq, body in rows:
                pilot.cursor = seq
                if '"trainStep"' not in body and '"epoch_end"' not in body:
                    continue
                with pilot.lock:
                    if pilot.in_flight is not None:
                        continue  # one action at a time; what it fixes is not judged twice
                    decision = pilot.book.feed(json.loads(body))
                    if decision is not None:
                        pilot.in_flight = self.gate.submit(lambda d=decision: self.autopilot_act(d), name="autopilot")
                        pilot.in_flight.add_done_callback(self.autopilot_done)

    def autopilot_done(self, future: Future) -> None:
        pilot = self.autopilot
        with pilot.lock:
            pilot.in_flight = None
            if future.exception() is None and isinstance(future.result(), dict):
                pilot.book.ignore_through = int(future.result().get("at_step", -1))
            else:
                self.log(f"[autopilot] the action failed: {future.exception()}", level="error")

    # ---- the action (training thread, at a boundary) -----------------------------------------
    def autopilot_act(self, d: Decision) -> dict[str, Any]:
        at_step = int(self.state.step)
        done: dict[str, Any] = {"rule": d.rule, "kind": d.kind, "reason": d.reason, "detected_at": d.step,
                                "good_step": d.good_step, "at_step": at_step, "rolled_back": None}

        def act() -> None:
            if d.rollback:
                target = self.rollback_target(d.good_step)
                if target is None:
                    done["rolled_back"] = False
                    done["rollback_skipped"] = (f"no checkpoint of run {self.cfg.run_name!r} at or before step "
                                                f"{d.good_step} (set ckpt_every_steps)")
                else:
                    done["rolled_back"] = self.run_recorded("rollback", {"step": target}, d.rule)["step"]
            done["lr"] = self.run_recorded("set_hparams", {"lr_scale": d.lr_scale}, d.rule)["param_groups"][0].get("lr")

        if d.rollback:
            self.console.pause_window({"action": "autopilot", "rule": d.rule, "reason": d.reason}, act,
                                      checkpoint=False)
        else:
            act()
        self.autopilot.history.append(done)
        self.log(f"[autopilot] {d.rule}: {d.reason}; " + (f"rolled back to step {done['rolled_back']}, "
                 if done["rolled_back"] else "") + f"lr now {done['lr']}", level="warn")
        self.emit("autopilot_fired", **done)
        return done

    def run_recorded(self, cmd: str, payload: dict[str, Any], rule: str) -> Any:
        """Run a command as the autopilot (validated by the router, recorded in the ledger with the rule)."""
        from ..control.envelope import Request

        spec, validated = self.router.validate(Request(id=None, cmd=cmd, payload=payload))
        return self.execute_as("autopilot", spec, validated, rule=rule)

    def rollback_target(self, good_step: int | None) -> int | None:
        """The step of the newest checkpoint of the current run at or before `good_step`."""
        if good_step is None:
            return None
        steps = [info.step for info in self.ring().list() if info.step <= good_step]
        return max(steps) if steps else None

    # ---- commands ----------------------------------------------------------------------------
    @command("autopilot", Autopilot, mutating=False,
             description="the autopilot's rules: list, enable/disable one or all, set (replace), clear")
    def cmd_autopilot(self, p: Autopilot) -> dict[str, Any]:
        pilot = self.autopilot
        if self.ranks is not None and p.action in ("set", "enable"):
            raise CommandError("autopilot is not available in a distributed run: its actions would run on rank 0 "
                               "only, and every rank must run each change to the run", ErrorCode.FAILED)
        with pilot.lock:
            book = pilot.book
            if p.action == "set":
                if p.rules is None:
                    raise CommandError("payload.rules: `set` needs the list of rules", ErrorCode.BAD_PAYLOAD)
                book.set_rules(p.rules)
            elif p.action == "clear":
                book.set_rules([])
            elif p.action in ("enable", "disable"):
                if p.rule is not None and p.rule not in book.rules:
                    raise CommandError(f"payload.rule: no rule {p.rule!r}; rules: {sorted(book.rules) or 'none'}",
                                       ErrorCode.NOT_FOUND)
                for name, state in book.rules.items():
                    if p.rule is None or name == p.rule:
                        state.spec.enabled = p.action == "enable"
            rules = [state.summary() for state in book.rules.values()]
        if p.action != "list":
            self.emit("autopilot_rules", action=p.action, rules=rules)
            if self.state.training:
                self.start_autopilot()
        return {"rules": rules, "watching": pilot.thread is not None and pilot.thread.is_alive(),
                "history": list(pilot.history[-20:])}

    @command("rollback", Rollback, mutating=True,
             description="restore weights and optimizer from a checkpoint of this run (newest at or before a "
                         "step, or exactly one); the run keeps its step and data position")
    def cmd_rollback(self, p: Rollback) -> dict[str, Any]:
        given = [name for name in ("step", "before_step", "path") if getattr(p, name) is not None]
        if len(given) != 1:
            raise CommandError("payload: give exactly one of step, before_step, path", ErrorCode.BAD_PAYLOAD)
        ring = self.ring()
        if p.path is not None:
            path = self.wire_checkpoint(p.path, "payload.path")
        elif p.step is not None:
            path = ring.path_for(p.step)
            if not path.is_file():
                raise CommandError(f"payload.step: run {self.cfg.run_name!r} has no checkpoint at step {p.step} "
                                   f"(it has {[i.step for i in ring.list()] or 'none'})", ErrorCode.NOT_FOUND)
        else:
            target = self.rollback_target(p.before_step)
            if target is None:
                raise CommandError(f"payload.before_step: run {self.cfg.run_name!r} has no checkpoint at or before "
                                   f"step {p.before_step}", ErrorCode.NOT_FOUND)
            path = ring.path_for(target)
        pending = self.pending_write(str(path))
        if pending is not None:
            pending.result(timeout=120)  # the file is complete on disk (renamed atomically) once this is done
        info = self.load_checkpoint_into_state(path, position=False)
        reply = {"path": str(path), "step": info["step"], "at_step": int(self.state.step), "run_id": self.cfg.run_name}
        self.emit("rolled_back", **reply)
        return reply
