"""Live hyperparameter edits (`set_hparams`): validated like the optimizer validates them, applied all or nothing.

An edit names any key of the optimizer's param groups (`lr`, `weight_decay`, `betas`, `nesterov`,
a custom optimizer's own keys, ...), for every group or one (`group`), plus loop settings the
runtime lets onthefly change (`grad_clip_norm`, `accumulate_grad_batches`). It is checked before
anything changes: every key must exist in the targeted groups (and not be one that selects the
optimizer's implementation), every value must have the type the group holds and be finite, a
dry optimizer step on a one-element parameter with the new values must succeed (this catches
what constructors only discover at `step()`, such as `betas[0] == 1`, or an overflow), and the
runtime must support each loop setting. Only then are the values written.

Loop settings changed here are part of the run's state in checkpoints (`loop_settings_state`).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Optional

import torch

from ..control.constraints import Length, Range
from ..control.errors import CommandError, ErrorCode
from .command import command

#: The typed fields of the payload that are param-group keys (any other group key is accepted too).
OPTIMIZER_HPARAMS = ("lr", "weight_decay", "momentum", "betas", "eps", "dampening")
#: Group keys that select the optimizer's implementation or its parameters: never changed live.
FIXED_KEYS = frozenset({"params", "foreach", "fused", "capturable", "differentiable", "initial_lr", "name"})
LOOP_SETTINGS = ("grad_clip_norm", "accumulate_grad_batches")
#: Largest magnitude accepted for any value: parameters are usually float32.
MAX_MAGNITUDE = float(torch.finfo(torch.float32).max)


@dataclass
class SetHparams:
    """Optimizer param-group keys (typed ones below, any other as an extra key), per group or all."""

    lr: Optional[Annotated[float, Range(ge=0)]] = None
    weight_decay: Optional[Annotated[float, Range(ge=0)]] = None
    momentum: Optional[Annotated[float, Range(ge=0)]] = None
    betas: Optional[Annotated[list[Annotated[float, Range(ge=0, lt=1)]], Length(min=2, max=2)]] = None
    eps: Optional[Annotated[float, Range(ge=0)]] = None
    dampening: Optional[Annotated[float, Range(ge=0)]] = None
    #: Multiply the learning rate of the targeted groups (instead of giving `lr`).
    lr_scale: Optional[Annotated[float, Range(gt=0, le=1e6)]] = None
    #: Clip gradients to this norm from the next step (0 turns clipping off).
    grad_clip_norm: Optional[Annotated[float, Range(ge=0)]] = None
    accumulate_grad_batches: Optional[Annotated[int, Range(ge=1, le=100_000)]] = None
    param_group: Optional[Annotated[int, Range(ge=0)]] = field(default=None, metadata={"aliases": ("group",)})
    #: Any other param-group key of the optimizer (`nesterov`, `amsgrad`, `alpha`, ...).
    other: dict[str, Any] = field(default_factory=dict, metadata={
        "extra_keys": True, "description": "any other param-group key of the optimizer, e.g. nesterov"})


def check_number(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise CommandError(f"payload.{name}: must be a finite number, got {value}", ErrorCode.BAD_PAYLOAD)
    if abs(value) > MAX_MAGNITUDE:
        raise CommandError(f"payload.{name}: {value} is too large (|value| <= {MAX_MAGNITUDE:.3g})",
                           ErrorCode.BAD_PAYLOAD)
    return float(value)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def like_current(key: str, value: Any, current: Any, optimizer: str) -> Any:
    """`value` converted to the kind of value the group holds for `key` (bool, number, tuple, str)."""
    def refuse(expected: str) -> CommandError:
        return CommandError(f"payload.{key}: {optimizer} holds {expected} for '{key}', got {value!r}",
                            ErrorCode.BAD_PAYLOAD)

    if isinstance(current, torch.Tensor):
        raise CommandError(f"payload.{key}: {optimizer} holds a tensor for '{key}'; set_hparams changes plain "
                           "values only", ErrorCode.BAD_PAYLOAD)
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise refuse("a bool")
        return value
    if isinstance(current, int) and not isinstance(current, bool) and key not in OPTIMIZER_HPARAMS:
        # An integer setting (LBFGS max_iter, ...); the typed keys (momentum=0, ...) are numbers.
        if not isinstance(value, int) or isinstance(value, bool):
            raise refuse("an integer")
        return value
    if isinstance(current, (int, float)):
        if not is_number(value):
            raise refuse("a number")
        return check_number(key, value)
    if isinstance(current, (tuple, list)):
        if not isinstance(value, (list, tuple)) or len(value) != len(current) or not all(map(is_number, value)):
            raise refuse(f"{len(current)} numbers")
        return tuple(check_number(f"{key}[{i}]", v) for i, v in enumerate(value))
    if isinstance(current, str) or current is None:
        if value is not None and not isinstance(value, str):
            raise refuse("a string or null")
        return value
    raise refuse(f"a {type(current).__name__}")


def constructor_arguments(cls: type) -> set[str] | None:
    """Keyword arguments an optimizer class's constructor takes (None: it takes any)."""
    try:
        parameters = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters}


def dry_run(optimizer: torch.optim.Optimizer, group: dict[str, Any], changes: dict[str, Any]) -> None:
    """Take one step with an optimizer of the same class holding `group` + `changes`, twice.

    First on a fresh one-element parameter (the values themselves), then on a copy of the group's
    smallest parameter together with a copy of the state the live optimizer holds for it: a
    change the state built so far cannot take (Adam's `amsgrad` turned on after the first step)
    is refused here instead of failing the next real step.
    """
    reference = group["params"][0] if group["params"] else torch.zeros(1)
    accepted = constructor_arguments(type(optimizer))
    settings = {k: v for k, v in {**group, **changes}.items() if k != "params" and (accepted is None or k in accepted)}
    shown = ", ".join(f"{k}={shown_value(v)}" for k, v in changes.items())
    probe = torch.ones(1, dtype=reference.dtype, device=reference.device, requires_grad=True)
    step_probe(optimizer, probe, settings, None, f"payload: {type(optimizer).__name__} refuses {shown}")
    stateful = [p for p in group["params"] if optimizer.state.get(p)]
    if stateful:
        smallest = min(stateful, key=lambda p: p.numel())
        copy = smallest.detach().clone().requires_grad_(True)
        state = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
                 for k, v in optimizer.state[smallest].items()}
        step_probe(optimizer, copy, settings, state, f"payload: {shown} does not fit the state "
                                                     f"{type(optimizer).__name__} has built so far")


def step_probe(optimizer: torch.optim.Optimizer, probe: torch.Tensor, settings: dict[str, Any],
               state: dict[str, Any] | None, refusal: str) -> None:
    def closure() -> torch.Tensor:
        with torch.enable_grad():  # optimizers may call it under no_grad
            dry.zero_grad()
            loss = (probe * probe).sum()
            loss.backward()
        return loss

    try:
        dry = type(optimizer)([probe], **settings)
        if state is not None:
            dry.state[probe] = state
        dry.step(closure)
    except (ValueError, RuntimeError, TypeError, ZeroDivisionError, OverflowError, KeyError, IndexError) as exc:
        raise CommandError(f"{refusal}: {type(exc).__name__}: {exc}", ErrorCode.BAD_PAYLOAD) from exc
    if not torch.isfinite(probe).all():
        raise CommandError(f"{refusal}: the step is not finite", ErrorCode.BAD_PAYLOAD)


def shown_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


class GradClipHook:
    """Clips gradients to a norm right before an optimizer steps: grad clipping for loops onthefly
    does not drive (an optimizer step pre-hook; it sees unscaled gradients under `GradScaler.step`)."""

    def __init__(self) -> None:
        self.norm: float | None = None
        self._handles: list[Any] = []

    def set(self, optimizers: list[torch.optim.Optimizer], norm: float | None) -> None:
        """Clip before every step of `optimizers` from now on (None: stop clipping)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.norm = norm
        if norm:
            self._handles = [opt.register_step_pre_hook(self._clip) for opt in optimizers]

    def _clip(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if params and self.norm:
            torch.nn.utils.clip_grad_norm_(params, self.norm)


class HparamsMixin:
    """`set_hparams`. Owns `self.loop_overrides`: the loop settings changed over the wire (values
    of param groups live in the optimizer, which checkpoints already hold)."""

    def _init_hparams(self) -> None:
        self.loop_overrides: dict[str, Any] = {}

    @command("set_hparams", SetHparams, mutating=True,
             description="change any optimizer param-group key (all groups or one), lr_scale, grad clipping "
                         "and gradient accumulation; validated against the optimizer, all or nothing")
    def cmd_set_hparams(self, p: SetHparams) -> dict[str, Any]:
        if self.optimizer is None:
            raise CommandError("no optimizer is bound to the session", ErrorCode.NOT_FOUND)
        name = type(self.optimizer).__name__
        groups = self.optimizer.param_groups
        if p.param_group is not None:
            if not 0 <= p.param_group < len(groups):
                raise CommandError(f"payload.param_group: {p.param_group} is out of range "
                                   f"(the optimizer has {len(groups)} groups)", ErrorCode.BAD_PAYLOAD)
            targets = [groups[p.param_group]]
        else:
            targets = list(groups)
        requested: dict[str, Any] = {key: getattr(p, key) for key in OPTIMIZER_HPARAMS if getattr(p, key) is not None}
        for key, value in p.other.items():
            if key in LOOP_SETTINGS or key == "lr_scale":
                continue  # typed fields; the router filled them
            requested[key] = value
        if p.lr_scale is not None and p.lr is not None:
            raise CommandError("payload: give lr or lr_scale, not both", ErrorCode.BAD_PAYLOAD)
        changes = self.group_changes(name, targets, requested)
        loop = self.loop_changes(p)
        if not changes and p.lr_scale is None and not loop:
            raise CommandError("payload: nothing to change; give a param-group key (" + ", ".join(
                settable_keys(targets)) + "), lr_scale, grad_clip_norm or accumulate_grad_batches",
                ErrorCode.BAD_PAYLOAD)
        per_group = []
        for group in targets:
            mine = dict(changes)
            if p.lr_scale is not None:
                if isinstance(group["lr"], torch.Tensor):
                    raise CommandError(f"payload.lr_scale: {name} holds a tensor lr; set_hparams changes "
                                       "plain values only", ErrorCode.BAD_PAYLOAD)
                mine["lr"] = check_number("lr_scale", float(group["lr"]) * p.lr_scale)
            if mine:
                dry_run(self.optimizer, group, mine)
            per_group.append(mine)
        # Every check passed: apply.
        for group, mine in zip(targets, per_group):
            for key, value in mine.items():
                group[key] = value
                if key == "lr" and "initial_lr" in group:
                    group["initial_lr"] = value
        if self.scheduler is not None and any("lr" in mine for mine in per_group) and hasattr(self.scheduler, "base_lrs"):
            self.scheduler.base_lrs = [g.get("initial_lr", g["lr"]) for g in groups]
        if loop:
            self.framework.apply_loop_settings(loop)
            self.loop_overrides.update(loop)
        self.mark_state_changed()
        in_force = self.hparams_in_force()
        shown = {k: shown_value(v) for k, v in changes.items()}
        if p.lr_scale is not None:
            shown["lr_scale"] = p.lr_scale
        shown.update(loop)
        self.emit("hparams_changed", changes=shown, hparams=in_force, param_group=p.param_group)
        return in_force

    def group_changes(self, optimizer: str, targets: list[dict[str, Any]], requested: dict[str, Any]) -> dict[str, Any]:
        """`requested` checked against the targeted groups' real keys and value kinds."""
        changes: dict[str, Any] = {}
        for key, value in requested.items():
            if key in FIXED_KEYS:
                raise CommandError(f"payload.{key}: '{key}' selects the optimizer's parameters or "
                                   "implementation and cannot change during training", ErrorCode.BAD_PAYLOAD)
            missing = [i for i, g in enumerate(targets) if key not in g]
            if missing:
                raise CommandError(f"payload.{key}: the optimizer ({optimizer}) has no '{key}' setting; its "
                                   f"settings are {', '.join(settable_keys(targets))}", ErrorCode.BAD_PAYLOAD)
            converted = [like_current(key, value, g[key], optimizer) for g in targets]
            changes[key] = converted[0]
        return changes

    def loop_changes(self, p: SetHparams) -> dict[str, Any]:
        """The loop settings asked for, checked against what this runtime can change."""
        asked: dict[str, Any] = {}
        if p.grad_clip_norm is not None:
            asked["grad_clip_norm"] = check_number("grad_clip_norm", p.grad_clip_norm) or None
        if p.accumulate_grad_batches is not None:
            asked["accumulate_grad_batches"] = int(p.accumulate_grad_batches)
        available = self.framework.loop_settings()
        for key in asked:
            if key not in available:
                can = ", ".join(sorted(available)) or "none"
                raise CommandError(f"payload.{key}: the {self.framework.runtime} runtime does not let onthefly "
                                   f"change {key} (it can change: {can})", ErrorCode.BAD_PAYLOAD)
        return asked

    def hparams_in_force(self) -> dict[str, Any]:
        groups = []
        if self.optimizer is not None:
            for g in self.optimizer.param_groups:
                groups.append({k: shown_value(v) for k, v in g.items() if k not in FIXED_KEYS
                               and (isinstance(v, (int, float, bool, str, tuple)) or v is None)})
        settings = self.framework.loop_settings()
        return {"param_groups": groups, "grad_clip_norm": settings.get("grad_clip_norm", self.cfg.grad_clip_norm),
                **{k: v for k, v in settings.items() if k != "grad_clip_norm"}}

    # ---- checkpoints -------------------------------------------------------------------------
    def loop_settings_state(self) -> dict[str, Any]:
        """The loop settings changed over the wire (what a checkpoint must restore)."""
        return dict(self.loop_overrides)

    def restore_loop_settings(self, state: dict[str, Any] | None) -> None:
        """Re-apply the loop settings a checkpoint recorded (nothing recorded: leave the loop as it is)."""
        if not state:
            return
        available = self.framework.loop_settings()
        usable = {k: v for k, v in state.items() if k in available}
        if usable:
            self.framework.apply_loop_settings(usable)
            self.loop_overrides.update(usable)


def settable_keys(groups: list[dict[str, Any]]) -> list[str]:
    """The keys every group in `groups` holds that set_hparams may change."""
    keys = [k for k in groups[0] if k not in FIXED_KEYS] if groups else []
    return [k for k in keys if all(k in g for g in groups)]
