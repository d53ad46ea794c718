"""Live hyperparameter edits (`set_hparams`): validated like the optimizer validates them, applied all or nothing.

An edit is checked before anything changes: every key must exist in the targeted parameter
groups, every value must be a finite number the optimizer's own constructor accepts, and a dry
optimizer step on a one-element parameter with the new values must succeed (this catches what
constructors only discover at `step()`, such as `betas[0] == 1`, or an overflow). Only then are
the values written into the live param groups.
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

OPTIMIZER_HPARAMS = ("lr", "weight_decay", "momentum", "betas", "eps", "dampening")
#: Largest magnitude accepted for any value: parameters are usually float32.
MAX_MAGNITUDE = float(torch.finfo(torch.float32).max)


@dataclass
class SetHparams:
    lr: Optional[Annotated[float, Range(ge=0)]] = None
    weight_decay: Optional[Annotated[float, Range(ge=0)]] = None
    momentum: Optional[Annotated[float, Range(ge=0)]] = None
    betas: Optional[Annotated[list[Annotated[float, Range(ge=0, lt=1)]], Length(min=2, max=2)]] = None
    eps: Optional[Annotated[float, Range(ge=0)]] = None
    dampening: Optional[Annotated[float, Range(ge=0)]] = None
    grad_clip_norm: Optional[Annotated[float, Range(ge=0)]] = None
    param_group: Optional[Annotated[int, Range(ge=0)]] = field(default=None, metadata={"aliases": ("group",)})


def check_number(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise CommandError(f"payload.{name}: must be a finite number, got {value}", ErrorCode.BAD_PAYLOAD)
    if abs(value) > MAX_MAGNITUDE:
        raise CommandError(f"payload.{name}: {value} is too large (|value| <= {MAX_MAGNITUDE:.3g})",
                           ErrorCode.BAD_PAYLOAD)
    return float(value)


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
    """Construct an optimizer of the same class with `group` + `changes` and take one step with it."""
    reference = group["params"][0] if group["params"] else torch.zeros(1)
    probe = torch.ones(1, dtype=reference.dtype, device=reference.device, requires_grad=True)
    accepted = constructor_arguments(type(optimizer))
    settings = {k: v for k, v in {**group, **changes}.items() if k != "params" and (accepted is None or k in accepted)}

    def closure() -> torch.Tensor:
        dry.zero_grad()
        loss = (probe * probe).sum()
        loss.backward()
        return loss

    try:
        dry = type(optimizer)([probe], **settings)
        dry.step(closure)
    except (ValueError, RuntimeError, TypeError, ZeroDivisionError, OverflowError) as exc:
        shown = ", ".join(f"{k}={v}" for k, v in changes.items())
        raise CommandError(f"payload: {type(optimizer).__name__} refuses {shown}: {exc}",
                           ErrorCode.BAD_PAYLOAD) from exc
    if not torch.isfinite(probe).all():
        shown = ", ".join(f"{k}={v}" for k, v in changes.items())
        raise CommandError(f"payload: {shown} makes a {type(optimizer).__name__} step non-finite",
                           ErrorCode.BAD_PAYLOAD)


class HparamsMixin:
    """`set_hparams` (no state of its own: values live in the optimizer and `cfg`)."""

    @command("set_hparams", SetHparams, mutating=True,
             description="change optimizer hyperparameters (all groups or one) and grad clipping")
    def cmd_set_hparams(self, p: SetHparams) -> dict[str, Any]:
        if self.optimizer is None:
            raise CommandError("no optimizer is bound to the session", ErrorCode.NOT_FOUND)
        groups = self.optimizer.param_groups
        if p.param_group is not None:
            if not 0 <= p.param_group < len(groups):
                raise CommandError(f"payload.param_group: {p.param_group} is out of range "
                                   f"(the optimizer has {len(groups)} groups)", ErrorCode.BAD_PAYLOAD)
            targets = [groups[p.param_group]]
        else:
            targets = list(groups)
        changes: dict[str, Any] = {}
        for key in OPTIMIZER_HPARAMS:
            value = getattr(p, key)
            if value is None:
                continue
            if key == "betas":
                if len(value) != 2:
                    raise CommandError("payload.betas: expected two numbers", ErrorCode.BAD_PAYLOAD)
                value = (check_number("betas[0]", value[0]), check_number("betas[1]", value[1]))
            else:
                value = check_number(key, value)
            if any(key not in g for g in targets):
                raise CommandError(f"payload.{key}: the optimizer ({type(self.optimizer).__name__}) has no "
                                   f"'{key}' setting", ErrorCode.BAD_PAYLOAD)
            changes[key] = value
        if p.grad_clip_norm is not None:
            check_number("grad_clip_norm", p.grad_clip_norm)
            if p.grad_clip_norm < 0:
                raise CommandError(f"payload.grad_clip_norm: must be >= 0 (0 turns clipping off), "
                                   f"got {p.grad_clip_norm}", ErrorCode.BAD_PAYLOAD)
        for group in targets:
            if changes:
                dry_run(self.optimizer, group, changes)
        # Every check passed: apply.
        for group in targets:
            for key, value in changes.items():
                group[key] = value
                if key == "lr" and "initial_lr" in group:
                    group["initial_lr"] = value
        if self.scheduler is not None and "lr" in changes and hasattr(self.scheduler, "base_lrs"):
            self.scheduler.base_lrs = [g.get("initial_lr", g["lr"]) for g in groups]
        if p.grad_clip_norm is not None:
            self.cfg.grad_clip_norm = p.grad_clip_norm if p.grad_clip_norm > 0 else None
        self.mark_state_changed()
        in_force = self.hparams_in_force()
        shown = {k: (list(v) if isinstance(v, tuple) else v) for k, v in changes.items()}
        if p.grad_clip_norm is not None:
            shown["grad_clip_norm"] = self.cfg.grad_clip_norm
        self.emit("hparams_changed", changes=shown, hparams=in_force, param_group=p.param_group)
        return in_force

    def hparams_in_force(self) -> dict[str, Any]:
        groups = []
        if self.optimizer is not None:
            for g in self.optimizer.param_groups:
                groups.append({k: (list(g[k]) if k == "betas" else g[k]) for k in OPTIMIZER_HPARAMS if k in g})
        return {"param_groups": groups, "grad_clip_norm": self.cfg.grad_clip_norm}
