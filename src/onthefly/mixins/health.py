"""Health probes of a live run: distributed parity, activations, numerics, determinism, throughput.

Each probe is a command that runs on the training thread inside a pause window, so no optimizer
step races it, and leaves the run exactly as it found it: per-module train/eval flags, `.grad`
tensors, the RNGs (the gate's job context guards the global ones; the loaders' own generators and
sampler cursors are guarded here) and no hook left behind, also when a probe fails.
Every reply carries `text`, a readable report that starts `Run:` / `Step: | Epoch:` / `<Title>:`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from ..checkpoints import capture_rng_state
from ..control.errors import CommandError, ErrorCode
from ..control.router import CommandRouter
from ..data_explorer import analysis_mode, batch_size_of, call_model, move_to_device
from ..data_explorer.calling import cache_for
from ..sampler_utils import EpochSeededRandomSampler, has_custom_batch_sampler, sampler_is_shuffled

T = TypeVar("T")

MAX_TEXT_PROBLEMS = 40
WEIGHT_SAMPLE_ELEMENTS = 1024
# A layer is flagged (and activations_health.ok is false) when at least this share of its units
# is dead or of its values is saturated.
ACTIVATION_ISSUE_FRAC = 0.5


# ---- payloads -------------------------------------------------------------------------------------
def check_min(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


@dataclass
class DistHealth:
    require_all_ranks: bool = False
    sample_weights: int = 0

    def __post_init__(self) -> None:
        check_min("sample_weights", self.sample_weights, 0)


@dataclass
class ActivationsHealth:
    budget_steps: int = 2
    topk: int = 10
    eps: float = 1e-3

    def __post_init__(self) -> None:
        check_min("budget_steps", self.budget_steps, 1)
        check_min("topk", self.topk, 1)
        if not (math.isfinite(self.eps) and 0.0 <= self.eps < 0.5):
            raise ValueError(f"eps must be a number in [0, 0.5), got {self.eps}")


@dataclass
class NumericsHealth:
    sample_layers: int = 25

    def __post_init__(self) -> None:
        check_min("sample_layers", self.sample_layers, 1)


@dataclass
class DeterminismHealth:
    """No fields (extra keys are ignored)."""


@dataclass
class ThroughputHealth:
    budget_steps: int = 2
    micro_backward: bool = False

    def __post_init__(self) -> None:
        check_min("budget_steps", self.budget_steps, 1)


# ---- helpers shared by the probes ----------------------------------------------------------------
def evenly_spaced(items: Sequence[T], k: int) -> list[T]:
    """Up to `k` items spread evenly over `items`, first and last included; all when k >= len."""
    n = len(items)
    if k >= n:
        return list(items)
    if k == 1:
        return [items[0]]
    return [items[(i * (n - 1)) // (k - 1)] for i in range(k)]


def upper_median(values: Sequence[float]) -> float | None:
    """The upper median (the element at len//2 once sorted), None for no values."""
    if not values:
        return None
    return sorted(values)[len(values) // 2]


def sync_device(device: torch.device) -> None:
    """Wait for queued kernels so a wall-clock timing covers them (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_batch(model: Any, batch: Any) -> Any:
    """The model's outputs on a batch: `model(x)` for `(x, y)`, else the explorer's input probing."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and torch.is_tensor(batch[0]):
        return model(batch[0])
    return call_model(model, batch)


def needs_input_probe(model: Any, batch: Any) -> bool:
    """True when `forward_batch` would still have to try several ways of calling the model."""
    fast = isinstance(batch, (tuple, list)) and len(batch) == 2 and torch.is_tensor(batch[0])
    return not fast and cache_for(model).inputs is None


def loader_generators(loader: Any) -> list[torch.Generator]:
    """The distinct torch generators a loader and its samplers draw from."""
    found: list[torch.Generator] = []
    holders = [loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None),
               getattr(getattr(loader, "batch_sampler", None), "sampler", None)]
    for holder in holders:
        gen = getattr(holder, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found


def loader_samplers(loader: Any) -> list[Any]:
    """The distinct sampler objects of a loader (sampler, batch sampler, the batch sampler's sampler)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    found: list[Any] = []
    for s in (getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None)):
        if s is not None and all(s is not f for f in found):
            found.append(s)
    return found


@contextlib.contextmanager
def untouched_loader(loader: Any) -> Iterator[None]:
    """Iterate `loader` inside the block without moving its generators or our sampler's cursor."""
    gens = [(g, g.get_state()) for g in loader_generators(loader)]
    ours = [(s, s.state_dict()) for s in loader_samplers(loader) if isinstance(s, EpochSeededRandomSampler)]
    try:
        yield
    finally:
        for g, state in gens:
            g.set_state(state)
        for s, state in ours:
            s.load_state_dict(state)


def probe_batches(loader: Any, limit: int) -> Iterator[Any]:
    """Up to `limit` batches from a fresh iterator over `loader` (use inside `untouched_loader`)."""
    if isinstance(loader, Iterator):
        raise CommandError(
            f"the loader ({type(loader).__name__}) is a one-shot iterator; probing it would consume "
            "data the run has not seen yet", ErrorCode.FAILED,
        )
    iterator = iter(loader)
    try:
        for _ in range(limit):
            try:
                yield next(iterator)
            except StopIteration:
                return
    finally:
        del iterator  # a multi-process iterator shuts its workers down when released


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor's values (any dtype), for hashing."""
    flat = t.detach().reshape(-1).contiguous().cpu()
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def metadata_hash(model: nn.Module) -> str:
    """sha256 over `P|name|shape|dtype` and `B|name|shape|dtype` records, names sorted."""
    h = hashlib.sha256()
    for tag, named in (("P", model.named_parameters()), ("B", model.named_buffers())):
        for name, t in sorted(named, key=lambda kv: kv[0]):
            h.update(f"{tag}|{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
    return h.hexdigest()


def sampled_weights_hash(model: nn.Module, k: int) -> tuple[str, list[str]]:
    """sha256 over up to 1024 evenly spaced values of `k` trainable parameters (by sorted name)."""
    named = sorted(((n, p) for n, p in model.named_parameters() if p.requires_grad), key=lambda kv: kv[0])
    chosen = evenly_spaced(named, k)
    h = hashlib.sha256()
    for name, p in chosen:
        flat = p.detach().reshape(-1)
        m = min(WEIGHT_SAMPLE_ELEMENTS, flat.numel())
        if m == 0:
            picked = flat
        elif m == 1:
            picked = flat[:1]
        else:
            idx = torch.arange(m, device=flat.device) * (flat.numel() - 1) // (m - 1)
            picked = flat[idx]
        h.update(name.encode() + b"\0" + tensor_bytes(picked))
    return h.hexdigest(), [name for name, _ in chosen]


def is_fsdp(model: nn.Module) -> bool:
    """Whether any module is a fully sharded wrapper (FSDP1 or FSDP2), by class name."""
    for m in model.modules():
        name = type(m).__name__.lower()
        if "fullysharded" in name or "fsdp" in name:
            return True
    return False


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


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def health_text(session: Any, title: str, lines: Sequence[str]) -> str:
    """The report every health reply carries as `text`."""
    head = [f"Run: {session.cfg.run_name}", f"Step: {session.state.step} | Epoch: {session.state.epoch}", f"{title}:"]
    return "\n".join(head + [f"  {line}" for line in lines])


def health_model(session: Any) -> nn.Module:
    if session.model is None:
        raise CommandError("no model is bound to the session yet", ErrorCode.NOT_FOUND)
    return session.model


def health_loader(session: Any) -> tuple[Any, str]:
    """The loader probes read: the validation loader, else the user's training loader."""
    if session.val_loader is not None:
        return session.val_loader, "val"
    root = getattr(session, "train_root_loader", None) or session.train_loader
    if root is not None:
        return root, "train"
    raise CommandError("no validation or training loader is configured for this session",
                       ErrorCode.NOT_FOUND)


def in_health_window(session: Any, check: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    return session.console.pause_window({"action": "health", "check": check}, fn, checkpoint=False)


def dist_report(session: Any, model: nn.Module, p: DistHealth) -> dict[str, Any]:
    import torch.distributed as dist

    fsdp = is_fsdp(model)
    if not (dist.is_available() and dist.is_initialized()):
        notes = ["torch.distributed not initialized; skipping parity checks"]
        return {"is_distributed": False, "distributed": False, "fsdp": fsdp, "backend": None,
                "world_size": 1, "rank": 0, "ok": True, "notes": notes,
                "text": health_text(session, "Distributed health", ["not distributed"] + notes)}
    backend = str(dist.get_backend())
    world, rank = dist.get_world_size(), dist.get_rank()
    local_rank = os.environ.get("LOCAL_RANK")
    meta_hash = metadata_hash(model)
    notes = [
        "cross-rank parity needs every rank's session to answer: this command reached one rank, "
        "so no collective was issued (it would wait forever for ranks that were not asked); "
        "compare metadata_hash (and weights_hash) across the ranks' replies",
    ]
    weights_hash, sampled = None, []
    if p.sample_weights > 0:
        if fsdp:
            notes.append("FSDP shards parameters across ranks: a weight hash would differ by design; skipped")
        else:
            weights_hash, sampled = sampled_weights_hash(model, p.sample_weights)
    if p.require_all_ranks:
        notes.append(f"require_all_ranks: only rank {rank} of {world} answered this request")
    if world == 1:
        notes.append("world_size is 1: there is no other rank to compare with")
    lines = [f"backend={backend} world_size={world} rank={rank}"
             + (f" local_rank={local_rank}" if local_rank is not None else "") + f" fsdp={fsdp}",
             f"metadata_hash={meta_hash[:16]}"]
    if weights_hash is not None:
        lines.append(f"weights_hash={weights_hash[:16]} over {len(sampled)} parameter(s)")
    return {
        "is_distributed": True, "distributed": True, "fsdp": fsdp, "backend": backend,
        "world_size": world, "rank": rank, "local_rank": int(local_rank) if local_rank is not None else None,
        "ok": None, "metadata_hash": meta_hash,
        "params": sum(1 for _ in model.parameters()), "buffers": sum(1 for _ in model.buffers()),
        "weights_hash": weights_hash, "sampled_weights": sampled, "notes": notes,
        "text": health_text(session, "Distributed health", lines + notes),
    }


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


def determinism_report(session: Any) -> dict[str, Any]:
    notes: list[str] = []
    ok = True
    try:
        rng = capture_rng_state()  # exactly what a checkpoint stores
        torch_rng_len = int(rng["torch"].numel())
        numpy_state_len = int(rng["numpy"]["keys"].numel())
        cuda_rng_devices = len(rng["cuda"])
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:
        ok = False
        torch_rng_len = numpy_state_len = cuda_rng_devices = None
        notes.append(f"capturing the RNG state failed ({type(exc).__name__}: {exc}); checkpoints cannot "
                     "restore it")
    policy = session.cfg.data_order_policy
    loader = session.train_loader
    sampler = train_sampler_of(loader)
    ours = isinstance(sampler, EpochSeededRandomSampler)
    effective = policy if policy != "user" and ours else "user"
    if policy != effective:
        notes.append(f"data_order_policy {policy!r} could not be applied to this loader; "
                     "its own order is used (policy 'user')")
    if loader is None:
        notes.append("no train loader is bound yet")
    elif effective != "user":
        notes.append(f"the session owns the data order: epoch e is a permutation seeded by "
                     f"(seed={sampler.seed}, epoch={0 if effective == 'fixed_order' else 'e'}), "
                     "so any resume re-creates it exactly")
    else:
        ok = user_order_notes(loader, sampler, notes) and ok
    device = session.resolve_device()
    det_algos = torch.are_deterministic_algorithms_enabled()
    cudnn = torch.backends.cudnn
    if device.type == "cuda":
        if not det_algos:
            notes.append("warning: torch.are_deterministic_algorithms_enabled() is False on CUDA: some kernels "
                         "(e.g. atomics in scatter/index_add, some convolutions) are not bit-reproducible")
        if cudnn.benchmark:
            notes.append("warning: torch.backends.cudnn.benchmark is True: cuDNN may pick different "
                         "algorithms after a resume")
        if det_algos and not os.environ.get("CUBLAS_WORKSPACE_CONFIG"):
            notes.append("warning: CUBLAS_WORKSPACE_CONFIG is not set; deterministic cuBLAS needs "
                         "':4096:8' or ':16:8'")
    if session.cfg.seed is None:
        notes.append("no base seed is set: a run from scratch is not repeatable, though resuming from "
                     "a checkpoint still is (the RNG state is saved)")
    val_sampler = train_sampler_of(session.val_loader)
    generation = getattr(session.console, "pause_generation", None)
    if generation is None:
        notes.append("pause_generation is not tracked by this session's console")
    sampler_state = sampler.state_dict() if ours else None
    reply = {
        "ok": ok,
        "notes": notes,
        "data_order_policy": policy,
        "effective_policy": effective,
        "session_managed": effective != "user",
        "handled": ok,
        "train_sampler": type(sampler).__name__ if sampler is not None else None,
        "train_sampler_is_ours": ours,
        "train_sampler_state": sampler_state,
        "train_sampler_has_state": has_state(sampler),
        "val_sampler_has_state": has_state(val_sampler),
        "torch_rng_len": torch_rng_len,
        "numpy_state_len": numpy_state_len,
        "cuda_rng_devices": cuda_rng_devices,
        "deterministic_algorithms": det_algos,
        "deterministic_algorithms_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn": {"enabled": bool(cudnn.enabled), "deterministic": bool(cudnn.deterministic),
                  "benchmark": bool(cudnn.benchmark)},
        "device": str(device),
        "base_seed": session.cfg.seed,
        "epoch": session.state.epoch,
        "batch_cursor": session.state.batch_in_epoch,
        "pause_generation": generation,
    }
    lines = [f"policy={policy} (effective {effective}), train sampler={reply['train_sampler']}"
             + (" (ours)" if ours else ""),
             f"base_seed={session.cfg.seed} epoch={session.state.epoch} batch_cursor={session.state.batch_in_epoch} "
             f"pause_generation={generation}",
             f"deterministic_algorithms={det_algos} cudnn.deterministic={reply['cudnn']['deterministic']} "
             f"cudnn.benchmark={reply['cudnn']['benchmark']}",
             f"bit-exact resume: {'yes' if ok else 'NO'}"]
    reply["text"] = health_text(session, "Determinism health", lines + notes)
    return reply


def user_order_notes(loader: Any, sampler: Any, notes: list[str]) -> bool:
    """Notes on a loader whose order the session leaves alone; False when resume cannot be exact."""
    if not isinstance(loader, DataLoader):
        if isinstance(loader, Iterator):
            notes.append(f"the train loader ({type(loader).__name__}) is a one-shot iterator: an epoch "
                         "cannot be re-created to resume mid-epoch")
            return False
        notes.append(f"the train loader is a {type(loader).__name__}, not a DataLoader: a resume re-creates "
                     "the epoch from the RNG state at its start and skips the consumed batches, which is "
                     "exact only if its order depends on nothing else")
        return True
    ok = True
    if isinstance(loader.dataset, IterableDataset):
        notes.append("the train dataset is an IterableDataset: a resume replays it from the epoch-start RNG "
                     "and skips consumed batches; exact only if its order depends on nothing else")
    own = [(s, s.generator) for s in loader_samplers(loader)
           if isinstance(getattr(s, "generator", None), torch.Generator) and s.generator is not loader.generator]
    for s, _ in own:
        ok = False
        notes.append(f"the train {type(s).__name__} draws from its own torch.Generator, which checkpoints "
                     "do not record: a resume in a fresh process would see another order (pass generator= "
                     "to the DataLoader instead, or use data_order_policy='epoch_reseed')")
    if has_custom_batch_sampler(loader) and has_state(loader.batch_sampler):
        notes.append(f"warning: the custom batch sampler {type(loader.batch_sampler).__name__} has a "
                     "state_dict the session does not save under policy 'user'")
    if ok and sampler_is_shuffled(sampler):
        if isinstance(loader.generator, torch.Generator):
            notes.append("shuffled with the loader's generator: the session records its state at each epoch "
                         "start, so a resume re-creates the epoch's order exactly")
        elif not own:
            notes.append("shuffled without a generator (order drawn from the global torch RNG): the session "
                         "records the RNG state at each epoch start, so a resume re-creates the epoch's "
                         "order exactly")
    if loader.num_workers > 0 and loader.persistent_workers:
        notes.append("warning: persistent_workers keeps worker RNG streams across epochs; random "
                     "augmentations after a mid-run resume in a fresh process can differ")
    return ok


def throughput_report(session: Any, model: nn.Module, loader: Any, source: str, p: ThroughputHealth) -> dict[str, Any]:
    device = session.resolve_device()
    notes: list[str] = []
    fwd_ms: list[float] = []
    per_sample_ms: list[float] = []
    bwd_ms: list[float] = []
    step_ms: list[float] = []
    samples = 0
    backward = p.micro_backward
    if backward and session.loss_fn is None:
        backward = False
        notes.append("micro_backward skipped: no loss function is bound to the session")
    params = list(model.parameters())
    saved_grads = [q.grad for q in params]
    try:
        with untouched_loader(loader):
            for batch in probe_batches(loader, p.budget_steps):
                batch = move_to_device(batch, device)
                n = batch_samples(batch)
                with analysis_mode(model), torch.inference_mode(), session.autocast_context():
                    if needs_input_probe(model, batch):
                        forward_batch(model, batch)  # learn how to call the model; not timed
                    sync_device(device)
                    t0 = time.perf_counter()
                    forward_batch(model, batch)
                    sync_device(device)
                    elapsed = (time.perf_counter() - t0) * 1e3
                fwd_ms.append(elapsed)
                if n:
                    per_sample_ms.append(elapsed / n)
                samples += n
                if backward:
                    backward = time_backward(session, model, params, batch, device, bwd_ms, step_ms, notes)
    finally:
        for q, grad in zip(params, saved_grads):
            q.grad = grad  # the very tensors the run had (or None): nothing it accumulated is lost
    steps = len(fwd_ms)
    if steps == 0:
        notes.append(f"the {source} loader yielded no batch")
    reply = {
        "forward_only_ms_per_sample_med": upper_median(per_sample_ms),
        "forward_batch_ms_med": upper_median(fwd_ms),
        "backward_batch_ms_med": upper_median(bwd_ms),
        "train_step_ms_med": upper_median(step_ms),
        "samples_per_s": (samples / (sum(fwd_ms) / 1e3)) if fwd_ms and sum(fwd_ms) > 0 else None,
        "steps_probed": steps,
        "backward_steps": len(bwd_ms),
        "samples_seen": samples,
        "source": source,
        "device": str(device),
        "notes": notes,
    }
    lines = [f"{steps} {source} batch(es), {samples} sample(s) on {device}",
             f"forward: {fmt(reply['forward_batch_ms_med'])} ms/batch, "
             f"{fmt(reply['forward_only_ms_per_sample_med'], 4)} ms/sample (upper medians)"]
    if p.micro_backward:
        lines.append(f"forward+loss+backward: {fmt(reply['train_step_ms_med'])} ms/batch, of which backward "
                     f"{fmt(reply['backward_batch_ms_med'])} ms")
    reply["text"] = health_text(session, "Throughput health", lines + notes)
    return reply


def time_backward(session: Any, model: nn.Module, params: list[torch.Tensor], batch: Any, device: torch.device,
                  bwd_ms: list[float], step_ms: list[float], notes: list[str]) -> bool:
    """Time one real forward+loss+backward (dropout on, norm statistics frozen); False to stop trying."""
    for q in params:
        q.grad = None  # backward must not add into the run's grads
    try:
        with analysis_mode(model, mirror_train_semantics=True), torch.enable_grad():
            sync_device(device)
            t0 = time.perf_counter()
            with session.autocast_context():
                loss = session.batch_loss(batch)
            sync_device(device)
            t1 = time.perf_counter()
            loss.backward()
            sync_device(device)
            t2 = time.perf_counter()
    except RuntimeError as exc:
        notes.append(f"micro_backward failed: {type(exc).__name__}: {exc}")
        return False
    finally:
        for q in params:
            q.grad = None  # drop what this probe created
    bwd_ms.append((t2 - t1) * 1e3)
    step_ms.append((t2 - t0) * 1e3)
    return True


def train_sampler_of(loader: Any) -> Any:
    """The sampler that orders a loader's samples (inside a standard batch sampler when there is one)."""
    if not isinstance(loader, DataLoader):
        return None
    if has_custom_batch_sampler(loader):
        return getattr(loader.batch_sampler, "sampler", loader.batch_sampler)
    return loader.sampler


def has_state(obj: Any) -> bool:
    return obj is not None and callable(getattr(obj, "state_dict", None))


def batch_samples(batch: Any) -> int:
    """Samples in a batch; 0 when it has no leading batch dimension to count."""
    try:
        return batch_size_of(batch)
    except ValueError:
        return 0


class HealthMixin:
    """The five health commands; each runs on the training thread inside a pause window.

    The handlers only use the session's public attributes, so `_register_health_commands` also
    works when called as `HealthMixin._register_health_commands(session, router)`.
    """

    def _register_health_commands(self, router: CommandRouter) -> None:
        def bound(handler: Callable[[Any, Any], dict[str, Any]]) -> Callable[[Any], dict[str, Any]]:
            return functools.partial(handler, self)

        router.register("dist_health", bound(HealthMixin.cmd_dist_health), schema=DistHealth, mutating=True,
                        description="distributed setup and this rank's parameter metadata hash")
        router.register("activations_health", bound(HealthMixin.cmd_activations_health), schema=ActivationsHealth,
                        mutating=True, description="dead, zero and saturated units of activation layers")
        router.register("numerics_health", bound(HealthMixin.cmd_numerics_health), schema=NumericsHealth,
                        mutating=True, description="NaN/Inf in parameters, grads and buffers; AMP overflow")
        router.register("determinism_health", bound(HealthMixin.cmd_determinism_health), schema=DeterminismHealth,
                        mutating=True, description="whether the run can resume bit-exactly, and why not")
        router.register("throughput_health", bound(HealthMixin.cmd_throughput_health), schema=ThroughputHealth,
                        mutating=True, description="forward (and optionally backward) time per batch and sample")

    def cmd_dist_health(self, p: DistHealth) -> dict[str, Any]:
        model = health_model(self)
        return in_health_window(self, "dist_health", lambda: dist_report(self, model, p))

    def cmd_activations_health(self, p: ActivationsHealth) -> dict[str, Any]:
        model = health_model(self)
        loader, source = health_loader(self)  # checked before any hook exists
        return in_health_window(self, "activations_health",
                                lambda: activations_report(self, model, loader, source, p))

    def cmd_numerics_health(self, p: NumericsHealth) -> dict[str, Any]:
        model = health_model(self)
        return in_health_window(self, "numerics_health", lambda: numerics_report(self, model, p))

    def cmd_determinism_health(self, p: DeterminismHealth) -> dict[str, Any]:
        return in_health_window(self, "determinism_health", lambda: determinism_report(self))

    def cmd_throughput_health(self, p: ThroughputHealth) -> dict[str, Any]:
        model = health_model(self)
        loader, source = health_loader(self)
        return in_health_window(self, "throughput_health",
                                lambda: throughput_report(self, model, loader, source, p))
