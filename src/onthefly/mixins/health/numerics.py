"""`numerics_health`: NaN/Inf in parameters, grads and buffers, and AMP overflow."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Sequence

import torch
from torch import nn

from ...control.constraints import Range
from ..command import command
from .common import evenly_spaced, health_model, health_text, in_health_window

MAX_TEXT_PROBLEMS = 40


@dataclass
class NumericsHealth:
    sample_layers: Annotated[int, Range(ge=1, le=100_000)] = 25


def nonfinite_counts(tensors: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """(NaN count, Inf count) for each tensor; one host transfer per device."""
    results: list[tuple[int, int]] = [(0, 0)] * len(tensors)
    by_device: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
    with torch.no_grad():
        for i, t in enumerate(tensors):
            values = t.coalesce().values() if t.is_sparse else t.detach()
            if not (values.is_floating_point() or values.is_complex()):
                continue  # integer and bool tensors cannot hold NaN or Inf
            counts = torch.stack([torch.isnan(values).sum(), torch.isinf(values).sum()])
            by_device.setdefault(counts.device, []).append((i, counts))
        for items in by_device.values():
            stacked = torch.stack([c for _, c in items]).cpu().tolist()
            for (i, _), (nan, inf) in zip(items, stacked):
                results[i] = (int(nan), int(inf))
    return results


def scaler_overflow_sum(scaler: Any, optimizers: Sequence[Any]) -> tuple[float | None, str]:
    """How many of the GradScaler's per-device found-inf flags are set for the current grads.

    A step in flight (unscale_ or step already called, update not yet) has the scaler's own
    record; otherwise the scaler checks the grads now (its `_check_inf_per_device`, which unscales
    by 1.0, i.e. changes no value), and its per-optimizer bookkeeping is put back as it was. After
    `update()` the grads of the last step are still in place (unscaled), so this tells whether that
    step overflowed. Returns (None, why) when there is nothing to read.
    """
    if scaler is None:
        return None, "no GradScaler in use"
    if not isinstance(scaler, torch.amp.GradScaler):
        return None, f"scaler of type {type(scaler).__name__} is not a torch.amp.GradScaler; not read"
    if not scaler.is_enabled():
        return None, "the GradScaler is disabled"
    if getattr(scaler, "_scale", None) is None:
        return None, "the GradScaler has not scaled a loss yet"
    optimizers = [opt for opt in optimizers if opt is not None]
    if not optimizers:
        return None, "no optimizer is bound: the GradScaler has no grads to check"
    total = 0.0
    checked = False
    states = scaler._per_optimizer_states
    for opt in optimizers:
        key = id(opt)
        existing = states.get(key)
        if existing is not None and existing["found_inf_per_device"]:
            found = scaler._found_inf_per_device(opt)  # this step's own record (unscale_ already ran)
            total += float(sum(v.item() for v in found.values()))
            continue
        checked = True
        saved_found = existing["found_inf_per_device"] if existing is not None else None
        grads = [(p, p.grad) for g in opt.param_groups for p in g["params"]]
        try:
            found = scaler._check_inf_per_device(opt)
            total += float(sum(v.item() for v in found.values()))
        finally:
            for p, grad in grads:
                if p.grad is not grad:
                    p.grad = grad  # the check may coalesce sparse fp16 grads: keep the user's objects
            if existing is None:
                states.pop(key, None)
            else:
                existing["found_inf_per_device"] = saved_found
    if checked:
        return total, "found-inf flags from the GradScaler's check of the current grads"
    return total, "found-inf flags the GradScaler recorded for the step in flight"


def numerics_report(session: Any, model: nn.Module, p: NumericsHealth) -> dict[str, Any]:
    params = evenly_spaced(sorted(model.named_parameters(), key=lambda kv: kv[0]), p.sample_layers)
    buffers = evenly_spaced(sorted(model.named_buffers(), key=lambda kv: kv[0]), p.sample_layers)
    checks: list[tuple[str, str, torch.Tensor]] = []
    problems: list[dict[str, Any]] = []
    for kind, named in (("param", params), ("buffer", buffers)):
        for name, t in named:
            if t.is_meta:
                problems.append({"kind": kind, "name": name, "error": "on the meta device: no values to check"})
                continue
            checks.append((kind, name, t))
            if kind == "param" and t.grad is not None:
                checks.append(("grad", name, t.grad))
    counts = nonfinite_counts([t for _, _, t in checks])
    for (kind, name, t), (nan, inf) in zip(checks, counts):
        if nan or inf:
            problems.append({"kind": kind, "name": name, "has_nan": nan > 0, "has_inf": inf > 0,
                             "nan_count": nan, "inf_count": inf, "numel": t.numel()})
    optimizers = [session.optimizer, *getattr(session, "extra_optimizers", [])]
    overflow, amp_note = scaler_overflow_sum(session.scaler, optimizers)
    n_grads = sum(1 for kind, _, _ in checks if kind == "grad")
    total_params = sum(1 for _ in model.parameters())
    total_buffers = sum(1 for _ in model.buffers())
    note = (f"checked {len(params)}/{total_params} parameters (and {n_grads} grads) and "
            f"{len(buffers)}/{total_buffers} buffers, evenly spaced by sorted name")
    ok = not problems and not overflow
    lines = [note, f"amp_overflow_sum={overflow if overflow is not None else 'n/a'} ({amp_note})"]
    if problems:
        lines.append(f"{len(problems)} problem(s):")
        for prob in problems[:MAX_TEXT_PROBLEMS]:
            if "error" in prob:
                lines.append(f"  {prob['kind']} {prob['name']}: {prob['error']}")
            else:
                lines.append(f"  {prob['kind']} {prob['name']}: nan={prob['nan_count']} inf={prob['inf_count']}"
                             f" of {prob['numel']}")
        if len(problems) > MAX_TEXT_PROBLEMS:
            lines.append(f"  ... and {len(problems) - MAX_TEXT_PROBLEMS} more")
    else:
        lines.append("no NaN or Inf found")
    return {"problems": problems, "amp_overflow_sum": overflow, "amp_note": amp_note,
            "sample_layers": p.sample_layers, "checked": {"params": len(params), "grads": n_grads,
                                                          "buffers": len(buffers)},
            "totals": {"params": total_params, "buffers": total_buffers},
            "ok": ok, "note": note, "text": health_text(session, "Numerics health", lines)}


class NumericsHealthMixin:
    @command("numerics_health", NumericsHealth, mutating=True,
             description="NaN/Inf in parameters, grads and buffers; AMP overflow")
    def cmd_numerics_health(self, p: NumericsHealth) -> dict[str, Any]:
        model = health_model(self)
        return in_health_window(self, "numerics_health", lambda: numerics_report(self, model, p))
