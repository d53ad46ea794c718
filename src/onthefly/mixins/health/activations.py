"""`activations_health`: dead, zero and saturated units of the activation layers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from torch import nn

from ...data_explorer import analysis_mode, move_to_device
from ...control.constraints import Range
from ..command import command
from .common import (
    batch_samples,
    fmt,
    forward_batch,
    health_loader,
    health_model,
    health_text,
    in_health_window,
    needs_input_probe,
    probe_batches,
    untouched_loader,
)

# A layer is flagged (and activations_health.ok is false) when at least this share of its units
# is dead or of its values is saturated.
ACTIVATION_ISSUE_FRAC = 0.5


@dataclass
class ActivationsHealth:
    budget_steps: Annotated[int, Range(ge=1, le=10_000)] = 2
    topk: Annotated[int, Range(ge=1, le=10_000)] = 10
    eps: Annotated[float, Range(ge=0, lt=0.5)] = 1e-3

# ---- activation statistics ---------------------------------------------------------------------
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Hardsigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Softplus, nn.Softsign,
    nn.LogSigmoid, nn.Tanhshrink, nn.Threshold, nn.GLU,
)

ACTIVATION_NAME_HINTS = ("relu", "gelu", "silu", "swish", "mish", "sigmoid", "tanh", "softplus")


def activation_bounds(module: nn.Module) -> tuple[float | None, float] | None:
    """The output range whose edges count as saturation, or None when the activation has none."""
    if isinstance(module, nn.ReLU6):
        return None, 6.0  # its lower edge is zero: counted by zero/dead, not saturation
    if isinstance(module, nn.Hardtanh):
        return float(module.min_val), float(module.max_val)
    if isinstance(module, (nn.Sigmoid, nn.Hardsigmoid)):
        return 0.0, 1.0
    if isinstance(module, (nn.Tanh, nn.Softsign)):
        return -1.0, 1.0
    if isinstance(module, ACTIVATION_TYPES):
        return None  # the other known ones (LogSigmoid and Tanhshrink included) have no bounded range
    name = type(module).__name__.lower()
    if "logsigmoid" in name or "tanhshrink" in name:
        return None
    if "sigmoid" in name:
        return 0.0, 1.0
    if "tanh" in name:
        return -1.0, 1.0
    return None


def is_activation(module: nn.Module) -> bool:
    """A known activation class, or a leaf module whose class name says it is one."""
    if isinstance(module, ACTIVATION_TYPES):
        return True
    if next(iter(module.children()), None) is not None:
        return False
    name = type(module).__name__.lower()
    return any(hint in name for hint in ACTIVATION_NAME_HINTS)


class LayerStats:
    """Running statistics of one activation module's outputs, kept on the device until `summary`.

    A unit is one position of the per-sample output (every dimension but the first); it is dead
    when it was exactly zero for every sample seen.
    """

    def __init__(self, name: str, module: nn.Module, eps: float) -> None:
        self.name = name
        self.kind = type(module).__name__
        self.bounds = activation_bounds(module)
        self.eps = eps
        self.count = 0
        self.calls = 0
        self.sums: torch.Tensor | None = None  # [zeros, saturated, sum, sum of squares], float64
        self.alive: torch.Tensor | None = None
        self.unit_shape: tuple[int, ...] | None = None
        self.shape_varies = False

    def add(self, output: Any) -> None:
        if not torch.is_tensor(output) or output.numel() == 0:
            return
        y = output.detach().float()
        zeros = (y == 0).sum()
        if self.bounds is None:
            sat = torch.zeros((), dtype=zeros.dtype, device=y.device)
        else:
            lo, hi = self.bounds
            mask = y > hi - self.eps
            if lo is not None:
                mask = mask | (y < lo + self.eps)
            sat = mask.sum()
        row = torch.stack([zeros.double(), sat.double(), y.sum(dtype=torch.float64),
                           (y * y).sum(dtype=torch.float64)])
        self.sums = row if self.sums is None else self.sums + row
        self.count += y.numel()
        self.calls += 1
        if y.dim() >= 1 and not self.shape_varies:
            shape = tuple(y.shape[1:])
            alive = (y != 0).reshape(y.shape[0], -1).any(dim=0)
            if self.unit_shape is None:
                self.unit_shape, self.alive = shape, alive
            elif shape != self.unit_shape:
                self.shape_varies, self.alive = True, None
            else:
                self.alive = self.alive | alive

    def summary(self) -> dict[str, Any] | None:
        if self.sums is None:
            return None
        zeros, sat, s1, s2 = self.sums.cpu().tolist()
        n = self.count
        mean = s1 / n
        std = math.sqrt(max(s2 / n - mean * mean, 0.0))
        dead = None
        units = None
        if self.alive is not None:
            units = int(self.alive.numel())
            dead = float((~self.alive).sum().item()) / units if units else None
        zero_frac, sat_frac = zeros / n, sat / n
        score = max(zero_frac, sat_frac, dead or 0.0)
        return {"layer": self.name, "type": self.kind, "count": n, "calls": self.calls, "units": units,
                "zero_frac": zero_frac, "sat_frac": sat_frac, "dead_frac": dead,
                "mean": mean, "std": std, "score": score}


def activations_report(session: Any, model: nn.Module, loader: Any, source: str,
                       p: ActivationsHealth) -> dict[str, Any]:
    layers = [(name, m) for name, m in model.named_modules() if name and is_activation(m)]
    if not layers and is_activation(model):
        layers = [("(model)", model)]
    notes: list[str] = []
    stats = [LayerStats(name, m, p.eps) for name, m in layers]
    recording = [True]
    handles = []
    steps = samples = 0
    device = session.resolve_device()
    try:
        for st, (_, module) in zip(stats, layers):
            def hook(_m: nn.Module, _inputs: Any, output: Any, st: LayerStats = st) -> None:
                if recording[0]:
                    st.add(output)

            handles.append(module.register_forward_hook(hook))
        with untouched_loader(loader), analysis_mode(model), torch.inference_mode(), session.autocast_context():
            for batch in probe_batches(loader, p.budget_steps):
                batch = move_to_device(batch, device)
                if needs_input_probe(model, batch):
                    recording[0] = False  # failed call attempts must not count as activations
                    forward_batch(model, batch)
                    recording[0] = True
                forward_batch(model, batch)
                steps += 1
                samples += batch_samples(batch)
    finally:
        for handle in handles:
            handle.remove()
    rows = [s for s in (st.summary() for st in stats) if s is not None]
    if not layers:
        notes.append("no activation modules found (matched by type, or by class name for leaf modules)")
    if any(st.shape_varies for st in stats):
        notes.append("dead_frac is n/a where a layer's per-sample output shape varied between calls")
    if steps == 0:
        notes.append(f"the {source} loader yielded no batch")
    flagged = [r["layer"] for r in rows
               if (r["dead_frac"] or 0.0) >= ACTIVATION_ISSUE_FRAC or r["sat_frac"] >= ACTIVATION_ISSUE_FRAC]
    order = sorted(range(len(rows)), key=lambda i: (-rows[i]["score"], i))
    top = [rows[i] for i in order[:p.topk]]
    lines = [f"{steps} {source} batch(es), {samples} sample(s), {len(layers)} activation layer(s)"]
    for r in top:
        lines.append(f"{r['layer']} ({r['type']}): score={fmt(r['score'])} dead={fmt(r['dead_frac'])} "
                     f"zero={fmt(r['zero_frac'])} sat={fmt(r['sat_frac'])} mean={fmt(r['mean'])} "
                     f"std={fmt(r['std'])}")
    if flagged:
        lines.append(f"flagged (>= {ACTIVATION_ISSUE_FRAC:.0%} dead or saturated): {', '.join(flagged)}")
    lines.extend(notes)
    return {"budget_steps": steps, "samples_seen": samples, "source": source, "top": top,
            "total_layers": len(layers), "flagged": flagged, "ok": not flagged, "notes": notes,
            "text": health_text(session, "Activations health", lines)}


class ActivationsHealthMixin:
    @command("activations_health", ActivationsHealth, mutating=True,
             description="dead, zero and saturated units of activation layers")
    def cmd_activations_health(self, p: ActivationsHealth) -> dict[str, Any]:
        model = health_model(self)
        loader, source = health_loader(self)  # checked before any hook exists
        return in_health_window(self, "activations_health",
                                lambda: activations_report(self, model, loader, source, p))
