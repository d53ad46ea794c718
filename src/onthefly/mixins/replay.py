"""Replaying a ledger: the session side of `onthefly replay`.

`onthefly replay` starts the recorded training script again with `ONTHEFLY_REPLAY` naming a
plan file: the run's `edit` entries (or an edited list), each with the position it ran at.
A session that finds the variable names its run after the plan (`<run>-replay`, `<run>-edit`),
records it as a child of the source run, and applies every edit at the batch boundary with the
same position (step, epoch, batch in epoch) through the same command path — inside the same
job context, so the RNG is treated as it was — and nothing else: the autopilot is off, its
recorded actions are edits of the plan. Edits that ran inline from Python before the first
batch are applied when training starts. A run the dashboard stopped is stopped at the same
step. Checkpoints a recorded rollback restores are written at their step if the replay would
not write them anyway.

While a plan has work left, the gate's pending flag is kept raised so the loop checks every
boundary (a comparison of three integers); with nothing left the replay costs nothing. At the
end the session writes a report (applied, failed and missed edits, the final weights digest and
whether it matches the source run's) to the file the plan names.
"""

from __future__ import annotations

import json
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..control.envelope import Request
from ..control.errors import ProtocolError
from ..control.names import check_safe_name
from ..fileio import atomic_write
from .ledger import replay_kind

REPLAY_ENV = "ONTHEFLY_REPLAY"
PLAN_FORMAT = "onthefly.replay"


class ReplayError(RuntimeError):
    """A replay plan cannot be read or applied; the message names the file or the entry."""


@dataclass
class PlannedEdit:
    """One edit of a plan and the position it is applied at (epoch/batch None: any at that step)."""

    seq: int
    cmd: str
    payload: dict[str, Any]
    step: int
    epoch: int | None = None
    batch_in_epoch: int | None = None
    at: str = "boundary"

    def compare(self, step: int, epoch: int, batch: int) -> int:
        """-1: the run is past this edit's position, 0: it is there, 1: not yet."""
        if self.epoch is None or self.batch_in_epoch is None:
            here, there = (step,), (self.step,)
        else:
            here, there = (step, epoch, batch), (self.step, self.epoch, self.batch_in_epoch)
        return 0 if here == there else (-1 if here > there else 1)

    def label(self) -> str:
        where = f"step {self.step}" + (f" (epoch {self.epoch}, batch {self.batch_in_epoch})"
                                       if self.epoch is not None else "")
        return f"entry {self.seq} ({self.cmd} at {where})"


@dataclass
class ReplayState:
    """What ReplayMixin owns: the plan and how far it got."""

    plan: dict[str, Any] | None = None
    path: Path | None = None
    pending: deque[PlannedEdit] = field(default_factory=deque)
    checkpoint_steps: set[int] = field(default_factory=set)
    stop_at: int | None = None
    started: bool = False
    applied: list[int] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    missed: list[dict[str, Any]] = field(default_factory=list)

    @property
    def has_work(self) -> bool:
        return bool(self.pending or self.checkpoint_steps) or self.stop_at is not None


def read_plan(path: Path) -> dict[str, Any]:
    """The plan file's JSON, checked for the fields a session needs."""
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReplayError(f"{REPLAY_ENV}={path}: cannot read the replay plan: {exc}") from exc
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT:
        raise ReplayError(f"{REPLAY_ENV}={path}: not an onthefly replay plan (format {PLAN_FORMAT!r})")
    if not isinstance(plan.get("entries"), list) or not isinstance(plan.get("run_name"), str):
        raise ReplayError(f"{REPLAY_ENV}={path}: the plan needs `entries` (a list) and `run_name`")
    return plan


def planned_edits(plan: dict[str, Any], origin: str) -> list[PlannedEdit]:
    """The plan's entries as `PlannedEdit`s; a malformed one is a `ReplayError` naming it."""
    edits = []
    for number, raw in enumerate(plan["entries"], 1):
        where = f"{origin}: entry {number}"
        if not isinstance(raw, dict) or not isinstance(raw.get("cmd"), str):
            raise ReplayError(f"{where}: expected an object with `cmd`, `payload` and `step`")
        step = raw.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ReplayError(f"{where} ({raw['cmd']}): `step` must be an integer >= 0, got {step!r}")
        epoch, batch = raw.get("epoch"), raw.get("batch_in_epoch")
        for name, value in (("epoch", epoch), ("batch_in_epoch", batch)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ReplayError(f"{where} ({raw['cmd']}): `{name}` must be an integer >= 0, got {value!r}")
        payload = raw.get("payload") or {}
        if not isinstance(payload, dict):
            raise ReplayError(f"{where} ({raw['cmd']}): `payload` must be an object")
        edits.append(PlannedEdit(int(raw.get("seq", number)), raw["cmd"], payload, step,
                                 epoch if batch is not None else None, batch if epoch is not None else None,
                                 str(raw.get("at", "boundary"))))
    return edits


class ReplayMixin:
    """Owns `self.replay` (a `ReplayState`)."""

    def _init_replay(self) -> None:
        """Read the plan `ONTHEFLY_REPLAY` names (before the run is named: a replay names its own run)."""
        self.replay = ReplayState()
        raw = os.environ.get(REPLAY_ENV, "").strip()
        if not raw:
            return
        path = Path(raw)
        plan = read_plan(path)
        try:
            self.cfg.run_name = check_safe_name(plan["run_name"], "run_name")
        except ValueError as exc:
            raise ReplayError(f"{REPLAY_ENV}={path}: {exc}") from exc
        state = self.replay
        state.plan, state.path = plan, path
        state.pending = deque(planned_edits(plan, str(path)))
        state.checkpoint_steps = {int(s) for s in plan.get("checkpoint_steps") or []}
        stop = plan.get("stop_at")
        state.stop_at = int(stop) if isinstance(stop, int) and not isinstance(stop, bool) else None

    @property
    def replaying(self) -> bool:
        return self.replay.plan is not None

    def replay_lineage(self) -> tuple[list[str], dict[str, Any]]:
        """(parents, meta) of the session's first run: a replay is a child of the run it replays."""
        plan = self.replay.plan
        if plan is None:
            return [], {"kind": "root"}
        source = plan.get("source") or {}
        parent = source.get("run_id")
        manifest = plan.get("source_manifest")
        if isinstance(parent, str) and parent != self.cfg.run_name and isinstance(manifest, dict) \
                and self.read_manifest(parent) is None:
            # The source run, as a record without checkpoints, so the lineage is visible in this session.
            self.store_manifest(check_safe_name(parent, "source run"),
                                {**manifest, "imported_from": source.get("folder"), "ledger": manifest.get("ledger")})
        meta = {"kind": "replay", "edited": bool(plan.get("edited")), "edits": len(self.replay.pending),
                "replay_of": {k: source.get(k) for k in ("session_id", "run_id", "folder")}}
        return ([parent] if isinstance(parent, str) else []), meta

    def begin_replay(self) -> None:
        """When training starts: check every edit against the router, apply those due before the first batch."""
        state = self.replay
        if state.plan is None or state.started:
            return
        state.started = True
        for edit in state.pending:
            if replay_kind(edit.cmd) != "edit":
                raise ReplayError(f"{state.path}: {edit.label()} is not an edit a replay can apply "
                                  f"(it {'moves the run' if replay_kind(edit.cmd) == 'moves' else 'is unknown'})")
            try:
                self.router.validate(Request(id=None, cmd=edit.cmd, payload=edit.payload))
            except ProtocolError as exc:
                raise ReplayError(f"{state.path}: {edit.label()}: {exc.message}") from exc
        self.log(f"[replay] {len(state.pending)} edit(s) to apply to run {self.cfg.run_name!r}"
                 f"{' (edited)' if state.plan.get('edited') else ''}; the autopilot is off")
        while state.pending and state.pending[0].step == 0 and (
                state.pending[0].at == "inline" or state.pending[0].epoch is None):
            self.apply_planned(state.pending.popleft())
        self.rearm_replay()

    def replay_at_boundary(self) -> bool:
        """At a batch boundary: apply the edits due here. Returns whether the gate has work besides."""
        state = self.replay
        if state.plan is None or not state.started or not state.has_work:
            return True
        st = self.state
        if st.step in state.checkpoint_steps:
            state.checkpoint_steps.discard(st.step)
            if not self.ring().path_for(int(st.step)).is_file():
                self.save_checkpoint_now()  # a recorded rollback restores it later
        while state.pending:
            order = state.pending[0].compare(st.step, st.epoch, st.batch_in_epoch)
            if order > 0:
                break
            edit = state.pending.popleft()
            if order == 0:
                self.apply_planned(edit)
            else:
                state.missed.append({"seq": edit.seq, "cmd": edit.cmd, "step": edit.step,
                                     "reached": [st.step, st.epoch, st.batch_in_epoch]})
                self.log(f"[replay] {edit.label()} was never reached (the run is at step {st.step}, epoch "
                         f"{st.epoch}, batch {st.batch_in_epoch}): the replay has diverged", level="error")
        if state.stop_at is not None and st.step >= state.stop_at:
            state.stop_at = None
            self.log(f"[replay] the source run was stopped at step {st.step}; stopping here too")
            self.request_stop()
        return bool(self.gate.queued) or self.gate.paused

    def rearm_replay(self) -> None:
        """Keep the loop checking every boundary while the plan has work left."""
        state = self.replay
        if state.plan is not None and state.started and state.has_work and self.state.training:
            self.gate.pending = True

    def apply_planned(self, edit: PlannedEdit) -> None:
        try:
            spec, payload = self.router.validate(Request(id=None, cmd=edit.cmd, payload=edit.payload))
            with self.job_context(edit.cmd):
                self.execute_as("replay", spec, payload, replay_of=edit.seq)
        except ProtocolError as exc:
            self.replay.failed.append({"seq": edit.seq, "cmd": edit.cmd, "step": edit.step, "error": exc.message})
            self.log(f"[replay] {edit.label()} failed: {exc.message}", level="error")
            return
        self.replay.applied.append(edit.seq)

    def finish_replay(self, final: dict[str, Any]) -> None:
        """At the end of training: the replay's report (and a `replay_finished` event)."""
        state = self.replay
        if state.plan is None:
            return
        for edit in state.pending:
            state.missed.append({"seq": edit.seq, "cmd": edit.cmd, "step": edit.step, "reached": None})
        state.pending.clear()
        expected = (state.plan.get("expected") or {}).get("weights_sha256")
        report = {
            "format": "onthefly.replay-report", "session_id": self.session_id, "folder": str(self.storage.folder),
            "run_id": self.cfg.run_name, "source": state.plan.get("source"), "edited": bool(state.plan.get("edited")),
            "final": final, "expected_sha256": expected,
            "match": None if expected is None else final.get("weights_sha256") == expected,
            "applied": list(state.applied), "failed": list(state.failed), "missed": list(state.missed),
        }
        self.emit("replay_finished", **{k: v for k, v in report.items() if k not in ("format", "run_id")})
        self.log(f"[replay] applied {len(state.applied)}, failed {len(state.failed)}, missed {len(state.missed)}"
                 + ("" if expected is None else f"; final weights {'match' if report['match'] else 'DIFFER FROM'}"
                    " the source run"), level="info" if not (state.failed or state.missed) else "error")
        target = state.plan.get("report")
        if isinstance(target, str) and target and not self.is_follower:
            text = json.dumps(report, indent=2, default=str)
            atomic_write(target, lambda handle: handle.write(text.encode("utf-8")))
