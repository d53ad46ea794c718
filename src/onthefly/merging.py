"""Model merging: pure functions that combine several state dicts into one.

Strategies: SWA (weighted mean), Fisher soup, adapter fusion, task arithmetic, TIES and a short
knowledge distillation. Nothing here touches files, sessions or the wire; the run-management mixin
loads the parents, calls `merge_state_dicts` and loads the result.

Rules shared by every strategy (see docs/merging.md):

- Every state dict must have the same keys, shapes and dtypes, else `MergeError` naming the key.
- Floating-point tensors are combined in float32 (float64 when the input is float64) and cast back
  to the input dtype.
- Integer buffers (BatchNorm's `num_batches_tracked` and other counters) are never averaged: the
  result is the element-wise maximum over the inputs, in the integer dtype. Bool buffers take the
  value of the reference input.
- The reference input is the first state dict argument (the first parent, or the base for task
  arithmetic and TIES): each result tensor lives on the device of the reference's tensor.
- Results are new tensors; inputs are never mutated.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MergeError",
    "STRATEGIES",
    "STRATEGY_ALIASES",
    "adapter_merge",
    "check_compatible",
    "distill_merge",
    "estimate_fisher",
    "fisher_merge",
    "merge_state_dicts",
    "resolve_strategy",
    "swa_merge",
    "task_arithmetic_merge",
    "ties_merge",
]

StateDict = Mapping[str, Tensor]
FloatRule = Callable[[str, list[Tensor]], Tensor]

STRATEGIES: tuple[str, ...] = ("swa", "fisher", "adapter", "task_arithmetic", "ties", "distill")

# Names the reference dashboard sends for the same strategies.
STRATEGY_ALIASES: dict[str, str] = {
    "fisher_soup": "fisher",
    "adapter_fuse": "adapter",
    "distillation": "distill",
}

_INTEGER_DTYPES = frozenset(
    getattr(torch, name)
    for name in ("uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64")
    if hasattr(torch, name)
)


class MergeError(ValueError):
    """The inputs of a merge cannot be combined; the message names the key or argument at fault."""


# --------------------------------------------------------------------------------------------
# Validation


def _as_state_dict_list(state_dicts: Any, what: str = "state_dicts") -> list[StateDict]:
    """Return `state_dicts` as a non-empty list of mappings, or raise `MergeError` saying why."""
    if isinstance(state_dicts, Mapping):
        raise MergeError(f"{what} must be a sequence of state dicts, got a single mapping")
    if isinstance(state_dicts, (str, bytes)) or not isinstance(state_dicts, Iterable):
        raise MergeError(f"{what} must be a sequence of state dicts, got {type(state_dicts).__name__}")
    items = list(state_dicts)
    if not items:
        raise MergeError(f"{what} is empty: a merge needs at least one state dict")
    for i, sd in enumerate(items):
        if not isinstance(sd, Mapping):
            raise MergeError(f"{what}[{i}] must be a mapping of name -> tensor, got {type(sd).__name__}")
    return items


def _kind(key: str, tensor: Tensor) -> str:
    """Classify a state-dict entry as "float", "int" or "bool"; other dtypes are refused."""
    if tensor.is_floating_point():
        return "float"
    if tensor.dtype == torch.bool:
        return "bool"
    if tensor.dtype in _INTEGER_DTYPES:
        return "int"
    raise MergeError(f"key {key!r}: dtype {tensor.dtype} cannot be merged (float, integer or bool only)")


def _check_labelled(state_dicts: Sequence[StateDict], labels: Sequence[str]) -> None:
    """Check keys, tensor types, shapes and dtypes of every input against the first one."""
    first, first_label = state_dicts[0], labels[0]
    for key, value in first.items():
        if not isinstance(value, Tensor):
            raise MergeError(f"key {key!r} in {first_label} is a {type(value).__name__}, not a tensor")
        _kind(key, value)
    for sd, label in zip(state_dicts[1:], labels[1:]):
        missing = [k for k in first if k not in sd]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise MergeError(f"key {missing[0]!r} is in {first_label} but missing from {label}{more}")
        extra = [k for k in sd if k not in first]
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise MergeError(f"key {extra[0]!r} is in {label} but missing from {first_label}{more}")
        for key, ref in first.items():
            other = sd[key]
            if not isinstance(other, Tensor):
                raise MergeError(f"key {key!r} in {label} is a {type(other).__name__}, not a tensor")
            if other.shape != ref.shape:
                raise MergeError(
                    f"key {key!r}: shape {tuple(ref.shape)} in {first_label} "
                    f"but {tuple(other.shape)} in {label}"
                )
            if other.dtype != ref.dtype:
                raise MergeError(
                    f"key {key!r}: dtype {ref.dtype} in {first_label} but {other.dtype} in {label}"
                )


def check_compatible(state_dicts: Sequence[Mapping[str, Tensor]]) -> None:
    """Raise `MergeError` unless the state dicts share keys, shapes and mergeable dtypes."""
    items = _as_state_dict_list(state_dicts)
    _check_labelled(items, [f"state dict {i}" for i in range(len(items))])


def _check_base_and_parents(base: StateDict, state_dicts: Any) -> list[StateDict]:
    """Validate a base plus its fine-tuned parents; return `[base, *parents]`."""
    if not isinstance(base, Mapping):
        raise MergeError(f"base must be a mapping of name -> tensor, got {type(base).__name__}")
    parents = _as_state_dict_list(state_dicts)
    items = [base, *parents]
    _check_labelled(items, ["base", *(f"state dict {i}" for i in range(len(parents)))])
    return items


def _normalised_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """Return weights that sum to one; `None` means equal weights."""
    if weights is None:
        return [1.0 / count] * count
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Iterable):
        raise MergeError(f"weights must be a sequence of numbers, got {type(weights).__name__}")
    values = list(weights)
    if len(values) != count:
        raise MergeError(f"got {len(values)} weights for {count} state dicts")
    out: list[float] = []
    for i, w in enumerate(values):
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise MergeError(f"weights[{i}] must be a number, got {type(w).__name__}")
        if not math.isfinite(w) or w < 0:
            raise MergeError(f"weights[{i}] must be finite and non-negative, got {w}")
        out.append(float(w))
    total = math.fsum(out)
    if total <= 0:
        raise MergeError("weights sum to zero: at least one weight must be positive")
    return [w / total for w in out]


def _finite_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MergeError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MergeError(f"{name} must be a positive integer, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# The per-key driver every strategy shares


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype floating-point arithmetic runs in: float64 stays float64, the rest use float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _merge_discrete(kind: str, key: str, items: Sequence[StateDict]) -> Tensor:
    """Integer counters take the element-wise max; bool buffers copy the reference input."""
    ref = items[0][key]
    if kind == "bool":
        return ref.clone()
    return torch.stack([sd[key].to(ref.device) for sd in items]).amax(dim=0)


def _combine(
    items: Sequence[StateDict],
    float_rule: FloatRule,
    *,
    keys: Callable[[str], bool] | None = None,
) -> dict[str, Tensor]:
    """Apply `float_rule` to every floating key of already-validated `items`.

    `float_rule(key, values)` gets each input's tensor moved to the reference device and cast to
    the work dtype, and must return a new tensor. Keys rejected by `keys` are copied from the
    reference input unchanged.
    """
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for key, ref in items[0].items():
            if keys is not None and not keys(key):
                out[key] = ref.detach().clone()
                continue
            kind = _kind(key, ref)
            if kind != "float":
                out[key] = _merge_discrete(kind, key, items)
                continue
            work = _work_dtype(ref.dtype)
            values = [sd[key].detach().to(device=ref.device, dtype=work) for sd in items]
            merged = float_rule(key, values).to(ref.dtype)
            shared = {v.data_ptr() for v in values} | {ref.data_ptr()}
            if merged.data_ptr() in shared:  # a rule that returned an input: never alias it
                merged = merged.clone()
            out[key] = merged
    return out


def _weighted_sum(values: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    acc = values[0] * weights[0]
    for value, weight in zip(values[1:], weights[1:]):
        acc = acc + value * weight
    return acc


# --------------------------------------------------------------------------------------------
# Strategies on state dicts


def swa_merge(
    state_dicts: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | None = None
) -> dict[str, Tensor]:
    """Weighted mean of the parents (equal weights by default; weights are normalised to sum 1)."""
    items = _as_state_dict_list(state_dicts)
    check_compatible(items)
    w = _normalised_weights(weights, len(items))
    return _combine(items, lambda _key, values: _weighted_sum(values, w))


def _validate_fishers(
    fishers: Any, items: Sequence[StateDict]
) -> list[Mapping[str, Tensor]]:
    """Check that every Fisher dict matches its parent's keys and shapes and is finite and >= 0."""
    fisher_list = _as_state_dict_list(fishers, "fishers")
    if len(fisher_list) != len(items):
        raise MergeError(f"got {len(fisher_list)} Fisher dicts for {len(items)} state dicts")
    ref = items[0]
    for i, fisher in enumerate(fisher_list):
        for key, value in fisher.items():
            if key not in ref:
                raise MergeError(f"fishers[{i}] has key {key!r}, which is not in the state dicts")
            if not isinstance(value, Tensor):
                raise MergeError(f"fishers[{i}][{key!r}] is a {type(value).__name__}, not a tensor")
            if value.shape != ref[key].shape:
                raise MergeError(
                    f"key {key!r}: parameter shape {tuple(ref[key].shape)} "
                    f"but fishers[{i}] shape {tuple(value.shape)}"
                )
            if value.is_complex() or value.dtype == torch.bool:
                raise MergeError(
                    f"fishers[{i}][{key!r}] has dtype {value.dtype}; expected a real number type"
                )
            if not ref[key].is_floating_point():
                continue  # integer/bool buffers follow the max/reference rule, not the Fisher
            as_float = value.detach().to(_work_dtype(value.dtype))
            if not bool(torch.isfinite(as_float).all()):
                raise MergeError(f"fishers[{i}][{key!r}] contains NaN or infinity")
            if bool((as_float < 0).any()):
                raise MergeError(f"fishers[{i}][{key!r}] has negative entries; a Fisher diagonal is >= 0")
    return fisher_list


def fisher_merge(
    state_dicts: Sequence[Mapping[str, Tensor]],
    fishers: Sequence[Mapping[str, Tensor]],
    *,
    eps: float = 1e-8,
) -> dict[str, Tensor]:
    """Fisher-weighted average: per element sum_i F_i * theta_i / sum_i F_i.

    `eps` is relative: where the summed Fisher of an element is at most `eps` times the largest
    summed Fisher of that tensor (exact zeros included) the parents carry no information and the
    element gets the plain mean. Being relative, the result does not change when every Fisher is
    scaled by the same constant. A key missing from any parent's Fisher dict (a frozen parameter,
    a floating-point buffer such as BatchNorm's running statistics) means "no information": that
    key gets the plain mean across all parents. Fisher entries for integer or bool buffers are
    ignored; those buffers follow the module rule (max / reference value).
    """
    items = _as_state_dict_list(state_dicts)
    check_compatible(items)
    eps = _finite_number("eps", eps)
    if eps < 0:
        raise MergeError(f"eps must be >= 0, got {eps}")
    fisher_list = _validate_fishers(fishers, items)
    uniform = [1.0 / len(items)] * len(items)

    def rule(key: str, values: list[Tensor]) -> Tensor:
        mean = _weighted_sum(values, uniform)
        if any(key not in fisher for fisher in fisher_list):
            return mean
        like = values[0]
        weights = [f[key].detach().to(device=like.device, dtype=like.dtype) for f in fisher_list]
        total = torch.stack(weights).sum(dim=0)
        numerator = torch.stack([w * v for w, v in zip(weights, values)]).sum(dim=0)
        threshold = eps * total.max() if total.numel() else total.new_zeros(())
        informed = (total > threshold) & (total > 0)
        safe_total = torch.where(informed, total, torch.ones_like(total))
        return torch.where(informed, numerator / safe_total, mean)

    return _combine(items, rule)


def adapter_merge(
    state_dicts: Sequence[Mapping[str, Tensor]],
    *,
    pattern: str = r"(adapter|lora)",
    weights: Sequence[float] | None = None,
) -> dict[str, Tensor]:
    """Average only the keys whose name matches `pattern` (case-insensitive search).

    Every other key is copied from the first parent, so the shared backbone stays exactly the
    first parent's. Raises `MergeError` when no key matches.
    """
    items = _as_state_dict_list(state_dicts)
    check_compatible(items)
    try:
        regex = re.compile(pattern, re.IGNORECASE)
    except (re.error, TypeError) as exc:
        raise MergeError(f"pattern {pattern!r} is not a valid regular expression: {exc}") from exc
    matched = [key for key in items[0] if regex.search(key)]
    if not matched:
        sample = ", ".join(repr(k) for k in list(items[0])[:5])
        raise MergeError(f"no key matches adapter pattern {pattern!r} (keys start: {sample})")
    w = _normalised_weights(weights, len(items))
    chosen = set(matched)
    return _combine(items, lambda _key, values: _weighted_sum(values, w), keys=chosen.__contains__)


def task_arithmetic_merge(
    base: Mapping[str, Tensor],
    state_dicts: Sequence[Mapping[str, Tensor]],
    *,
    scale: float = 1.0,
) -> dict[str, Tensor]:
    """Add the parents' task vectors to the base: base + scale * sum_i (theta_i - base)."""
    items = _check_base_and_parents(base, state_dicts)
    scale = _finite_number("scale", scale)

    def rule(_key: str, values: list[Tensor]) -> Tensor:
        base_value, parents = values[0], values[1:]
        delta = torch.stack([p - base_value for p in parents]).sum(dim=0)
        return base_value + scale * delta

    return _combine(items, rule)


def _trim_to_top(taus: Tensor, density: float) -> Tensor:
    """Zero all but the `density` fraction of largest-magnitude entries in each row of `taus`.

    Ties at the cut are broken by position (earlier entries win), so the result is deterministic.
    """
    numel = taus.shape[1]
    keep = min(numel, max(1, math.ceil(round(density * numel, 9))))
    order = taus.abs().sort(dim=1, descending=True, stable=True).indices[:, :keep]
    mask = torch.zeros_like(taus, dtype=torch.bool).scatter_(1, order, True)
    return torch.where(mask, taus, torch.zeros_like(taus))


def ties_merge(
    base: Mapping[str, Tensor],
    state_dicts: Sequence[Mapping[str, Tensor]],
    *,
    density: float = 0.2,
    scale: float = 1.0,
) -> dict[str, Tensor]:
    """TIES merging: trim task vectors, elect a sign per element, average the agreeing parents.

    tau_i = theta_i - base is trimmed to its top-`density` fraction by magnitude (per tensor,
    at least one entry); the elected sign is sign(sum_i trimmed tau_i); the merged vector is the
    mean over parents whose trimmed tau is nonzero and has the elected sign (zero where none
    does); the result is base + scale * merged.
    """
    items = _check_base_and_parents(base, state_dicts)
    density = _finite_number("density", density)
    if not 0.0 < density <= 1.0:
        raise MergeError(f"density must be in (0, 1], got {density}")
    scale = _finite_number("scale", scale)

    def rule(_key: str, values: list[Tensor]) -> Tensor:
        base_value, parents = values[0], values[1:]
        if base_value.numel() == 0:
            return base_value.clone()
        taus = torch.stack([p - base_value for p in parents]).reshape(len(parents), -1)
        trimmed = _trim_to_top(taus, density)
        elected = torch.sign(trimmed.sum(dim=0))
        agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
        count = agree.sum(dim=0)
        total = torch.where(agree, trimmed, torch.zeros_like(trimmed)).sum(dim=0)
        merged = total / count.clamp_min(1).to(total.dtype)
        return base_value + scale * merged.reshape(base_value.shape)

    return _combine(items, rule)


# --------------------------------------------------------------------------------------------
# Strategies that need a model and data


def _move_to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor inside a (nested) tuple/list/dict batch to `device`."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move_to_device(v, device) for v in batch)
    return batch


def _split_xy(batch: Any, what: str) -> tuple[Any, Any]:
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    raise MergeError(
        f"{what}: the default forward expects each batch to be (x, y), got "
        f"{type(batch).__name__}{f' of length {len(batch)}' if isinstance(batch, (list, tuple)) else ''}; "
        "pass forward=(model, batch) -> ... for other batch shapes"
    )


def _model_device(model: nn.Module, device: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _save_modes(modules: Iterable[nn.Module]) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for root in modules for m in root.modules()]


def _restore_modes(saved: Iterable[tuple[nn.Module, bool]]) -> None:
    for module, training in saved:
        module.training = training


def estimate_fisher(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: Callable[[Any, Any], Tensor] | None,
    *,
    max_batches: int = 32,
    device: Any = None,
    forward: Callable[[nn.Module, Any], Tensor] | None = None,
) -> dict[str, Tensor]:
    """Diagonal empirical Fisher: the mean over batches of each trainable parameter's squared grad.

    The model runs in eval mode (no dropout noise, BatchNorm statistics untouched) and every
    module's train/eval flag is restored afterwards. Gradients come from `torch.autograd.grad`,
    so `.grad` is left exactly as it was. Keys are the model's state_dict keys (tied parameters
    get an entry under each name); buffers and frozen parameters get none. Batches are moved to
    `device` (default: the device of the model's parameters); the model itself is not moved.
    `forward(model, batch) -> loss` replaces the default `loss_fn(model(x), y)` for batches that
    are not `(x, y)`.
    """
    if not isinstance(model, nn.Module):
        raise MergeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    max_batches = _positive_int("max_batches", max_batches)
    if forward is None and loss_fn is None:
        raise MergeError("estimate_fisher needs loss_fn, or forward=(model, batch) -> loss")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise MergeError("estimate_fisher: the model has no trainable parameters")
    target = _model_device(model, device)
    sums = [torch.zeros_like(p, dtype=_work_dtype(p.dtype)) for p in params]
    saved = _save_modes([model])
    model.eval()
    batches = 0
    try:
        with torch.enable_grad():
            for batch in itertools.islice(loader, max_batches):
                batch = _move_to_device(batch, target)
                if forward is not None:
                    loss = forward(model, batch)
                else:
                    x, y = _split_xy(batch, "estimate_fisher")
                    loss = loss_fn(model(x), y)  # type: ignore[misc]
                if not isinstance(loss, Tensor) or loss.numel() != 1:
                    shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                    raise MergeError(f"estimate_fisher: the loss must be a scalar tensor, got {shape}")
                if not loss.requires_grad:
                    raise MergeError("estimate_fisher: the loss does not depend on any trainable parameter")
                grads = torch.autograd.grad(loss.reshape(()), params, allow_unused=True)
                for acc, grad in zip(sums, grads):
                    if grad is not None:
                        g = grad.detach().to(acc.dtype)
                        acc.addcmul_(g, g)
                batches += 1
    finally:
        _restore_modes(saved)
    if batches == 0:
        raise MergeError("estimate_fisher: the loader yielded no batches")
    by_id = {id(p): acc / batches for p, acc in zip(params, sums)}
    fisher: dict[str, Tensor] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if isinstance(value, nn.Parameter) and id(value) in by_id:
            fisher[key] = by_id[id(value)].clone()
    for key, value in fisher.items():
        if not bool(torch.isfinite(value).all()):
            raise MergeError(
                f"estimate_fisher: the Fisher of {key!r} is not finite (NaN/inf loss or gradient)"
            )
    return fisher


def _default_outputs(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (list, tuple)) and batch:
        return model(batch[0])
    raise MergeError(
        f"distill_merge: the default forward expects a tensor or an (x, ...) batch, got "
        f"{type(batch).__name__}; pass forward=(model, batch) -> outputs"
    )


def _resolve_task(task: str, batch: Any, output: Tensor) -> str:
    """Pick the distillation loss: integer labels or class-shaped outputs mean classification."""
    if task != "auto":
        return task
    if isinstance(batch, (list, tuple)) and len(batch) >= 2 and isinstance(batch[1], Tensor):
        labels = batch[1]
        if labels.dtype == torch.bool or labels.dtype in _INTEGER_DTYPES:
            return "classification"
        if labels.is_floating_point():
            return "regression"
    return "classification" if output.dim() >= 2 and output.shape[1] >= 2 else "regression"


def _distillation_loss(
    student_out: Tensor, teacher_outs: Sequence[Tensor], task: str, temperature: float
) -> Tensor:
    """KL(p_teachers || p_student) on softened class scores (dim 1), or MSE for regression."""
    s = student_out.float()
    if task == "classification":
        log_s = F.log_softmax(s / temperature, dim=1)
        p_t = torch.stack([F.softmax(t.float() / temperature, dim=1) for t in teacher_outs]).mean(dim=0)
        kl = (torch.special.xlogy(p_t, p_t) - p_t * log_s).sum(dim=1).mean()
        return kl * (temperature**2)
    target = torch.stack([t.float() for t in teacher_outs]).mean(dim=0)
    return F.mse_loss(s, target)


def _output_tensor(value: Any, who: str) -> Tensor:
    if not isinstance(value, Tensor) or not value.is_floating_point():
        kind = f"{value.dtype} tensor" if isinstance(value, Tensor) else type(value).__name__
        raise MergeError(f"distill_merge: {who} returned a {kind}; expected a floating-point tensor "
                         "(pass forward=(model, batch) -> tensor to pick the output)")
    return value


def distill_merge(
    student: nn.Module,
    teachers: Sequence[nn.Module],
    loader: Iterable[Any],
    *,
    steps: int = 100,
    lr: float = 1e-3,
    temperature: float = 2.0,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    device: Any = None,
    task: str = "auto",
    seed: int | None = 0,
) -> dict[str, Tensor]:
    """Train `student` for `steps` Adam steps to match the teachers' mean output; return its state.

    Classification uses the standard distillation loss T^2 * KL(p_T || p_S), where p_T is the mean
    of the teachers' softmax(z / T) and p_S the student's, over dim 1; regression uses MSE to the
    teachers' mean output. `task="auto"` picks classification when the batch's labels are integers
    (or, without labels, when the output has a class dim 1 of size >= 2). The student is trained
    in place in train mode (initialise it first, e.g. from `swa_merge`); teachers run in eval mode
    under no_grad and are left untouched. The loader is cycled if it is shorter than `steps`.
    With `seed` set, the global RNG is forked and seeded, so the result is deterministic and the
    caller's RNG state is unchanged. Modes and `.grad` of the student are restored afterwards.
    """
    if not isinstance(student, nn.Module):
        raise MergeError(f"student must be a torch.nn.Module, got {type(student).__name__}")
    if isinstance(teachers, nn.Module) or not isinstance(teachers, Iterable):
        raise MergeError("teachers must be a sequence of torch.nn.Module")
    teacher_list = list(teachers)
    if not teacher_list:
        raise MergeError("distill_merge needs at least one teacher")
    for i, teacher in enumerate(teacher_list):
        if not isinstance(teacher, nn.Module):
            raise MergeError(f"teachers[{i}] must be a torch.nn.Module, got {type(teacher).__name__}")
    steps = _positive_int("steps", steps)
    lr = _finite_number("lr", lr)
    temperature = _finite_number("temperature", temperature)
    if lr <= 0:
        raise MergeError(f"lr must be > 0, got {lr}")
    if temperature <= 0:
        raise MergeError(f"temperature must be > 0, got {temperature}")
    if task not in ("auto", "classification", "regression"):
        raise MergeError(f"task must be 'auto', 'classification' or 'regression', got {task!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise MergeError(f"seed must be an integer or None, got {seed!r}")
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise MergeError("distill_merge: the student has no trainable parameters")
    target = _model_device(student, device)
    for i, teacher in enumerate(teacher_list):
        for p in itertools.chain(teacher.parameters(), teacher.buffers()):
            if p.device != target:
                raise MergeError(
                    f"distill_merge: teachers[{i}] is on {p.device}, the student's batches on {target}"
                )
            break
    run = forward if forward is not None else _default_outputs

    saved_modes = _save_modes([student, *teacher_list])
    saved_grads = [p.grad for p in params]
    cuda_devices: list[int] = []
    if target.type == "cuda":
        cuda_devices = [target.index if target.index is not None else torch.cuda.current_device()]
    try:
        with torch.random.fork_rng(devices=cuda_devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            _distill_steps(student, teacher_list, loader, params, run, target, steps, lr, temperature, task)
    finally:
        _restore_modes(saved_modes)
        for p, grad in zip(params, saved_grads):
            p.grad = grad
    return {key: value.detach().clone() for key, value in student.state_dict().items()}


def _distill_steps(
    student: nn.Module,
    teachers: list[nn.Module],
    loader: Iterable[Any],
    params: list[nn.Parameter],
    run: Callable[[nn.Module, Any], Any],
    device: torch.device,
    steps: int,
    lr: float,
    temperature: float,
    task: str,
) -> None:
    """The distillation loop itself, written out plainly; `distill_merge` owns setup and cleanup."""
    optimizer = torch.optim.Adam(params, lr=lr)
    student.train()
    for teacher in teachers:
        teacher.eval()
    resolved: str | None = None
    done = 0
    while done < steps:
        seen_any = False
        for batch in loader:
            seen_any = True
            batch = _move_to_device(batch, device)
            with torch.no_grad():
                teacher_outs = [
                    _output_tensor(run(t, batch), f"teachers[{i}]") for i, t in enumerate(teachers)
                ]
            student_out = _output_tensor(run(student, batch), "the student")
            for i, t_out in enumerate(teacher_outs):
                if t_out.shape != student_out.shape:
                    raise MergeError(
                        f"distill_merge: teachers[{i}] output shape {tuple(t_out.shape)} differs from "
                        f"the student's {tuple(student_out.shape)}"
                    )
            if resolved is None:
                resolved = _resolve_task(task, batch, student_out)
                if resolved == "classification" and (student_out.dim() < 2 or student_out.shape[1] < 2):
                    raise MergeError(
                        "distill_merge: classification needs outputs shaped (batch, classes >= 2, ...), "
                        f"got {tuple(student_out.shape)}; use task='regression'"
                    )
            loss = _distillation_loss(student_out, teacher_outs, resolved, temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            if done >= steps:
                break
        if not seen_any:
            raise MergeError("distill_merge: the loader yielded no batches")


# --------------------------------------------------------------------------------------------
# Dispatch by name


def resolve_strategy(strategy: str) -> str:
    """Return the canonical strategy name (case-insensitive, aliases allowed) or raise MergeError."""
    if not isinstance(strategy, str):
        raise MergeError(f"strategy must be a string, got {type(strategy).__name__}")
    name = strategy.strip().lower()
    name = STRATEGY_ALIASES.get(name, name)
    if name not in STRATEGIES:
        raise MergeError(f"unknown merge strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    return name


_KWARGS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # strategy: (required, optional)
    "swa": (frozenset(), frozenset({"weights"})),
    "fisher": (
        frozenset(),
        frozenset({"fishers", "eps", "model_factory", "loader", "loaders", "loss_fn", "forward",
                   "max_batches", "device"}),
    ),
    "adapter": (frozenset(), frozenset({"pattern", "weights"})),
    "task_arithmetic": (frozenset({"base"}), frozenset({"scale"})),
    "ties": (frozenset({"base"}), frozenset({"density", "scale"})),
    "distill": (
        frozenset({"model_factory", "loader"}),
        frozenset({"steps", "lr", "temperature", "forward", "device", "task", "seed", "weights"}),
    ),
}


_FISHER_DATA_KWARGS = ("model_factory", "loader", "loaders", "loss_fn", "forward", "max_batches")


def _check_kwargs(name: str, kwargs: Mapping[str, Any]) -> None:
    required, optional = _KWARGS[name]
    allowed = required | optional
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise MergeError(
            f"merge strategy {name!r} does not take {', '.join(unknown)}; "
            f"it takes: {', '.join(sorted(allowed)) or 'nothing'}"
        )
    missing = sorted(required - set(kwargs))
    if missing:
        raise MergeError(f"merge strategy {name!r} needs {', '.join(missing)}")


def _model_from_state(
    model_factory: Callable[[], nn.Module], state: StateDict, device: Any
) -> nn.Module:
    model = model_factory()
    if not isinstance(model, nn.Module):
        raise MergeError(f"model_factory must return a torch.nn.Module, got {type(model).__name__}")
    if device is not None:
        model = model.to(device)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise MergeError(f"a parent state dict does not fit model_factory()'s model: {exc}") from exc
    return model


def _fishers_from_data(
    items: Sequence[StateDict], kwargs: Mapping[str, Any]
) -> list[dict[str, Tensor]]:
    """Estimate each parent's Fisher with a fresh model from `model_factory` and its loader."""
    factory = kwargs.get("model_factory")
    if factory is None:
        raise MergeError(
            "merge strategy 'fisher' needs fishers=, or model_factory= with loader= (or loaders=) "
            "and loss_fn= (or forward=) to estimate them"
        )
    if ("loader" in kwargs) == ("loaders" in kwargs):
        raise MergeError(
            "merge strategy 'fisher' needs exactly one of loader= (shared) or loaders= (one per parent)"
        )
    if "loaders" in kwargs:
        loaders = list(kwargs["loaders"])
        if len(loaders) != len(items):
            raise MergeError(f"got {len(loaders)} loaders for {len(items)} state dicts")
    else:
        loaders = [kwargs["loader"]] * len(items)
    fishers = []
    for state, loader in zip(items, loaders):
        model = _model_from_state(factory, state, kwargs.get("device"))
        fishers.append(
            estimate_fisher(
                model,
                loader,
                kwargs.get("loss_fn"),
                max_batches=kwargs.get("max_batches", 32),
                device=kwargs.get("device"),
                forward=kwargs.get("forward"),
            )
        )
    return fishers


def merge_state_dicts(
    strategy: str, state_dicts: Sequence[Mapping[str, Tensor]], **kwargs: Any
) -> dict[str, Tensor]:
    """Merge `state_dicts` with the named strategy; keyword arguments go to that strategy.

    - swa: weights. adapter: pattern, weights.
    - fisher: fishers and eps; or, instead of fishers, model_factory + loader (or loaders, one per
      parent) + loss_fn (or forward) [+ max_batches, device] to estimate each parent's Fisher.
    - task_arithmetic: base, scale. ties: base, density, scale.
    - distill: model_factory + loader [+ steps, lr, temperature, forward, device, task, seed]; the
      teachers are the parents, the student starts from their SWA (with `weights`, if given).
    """
    name = resolve_strategy(strategy)
    _check_kwargs(name, kwargs)
    if name == "swa":
        return swa_merge(state_dicts, **kwargs)
    if name == "adapter":
        return adapter_merge(state_dicts, **kwargs)
    if name == "task_arithmetic":
        return task_arithmetic_merge(kwargs.pop("base"), state_dicts, **kwargs)
    if name == "ties":
        return ties_merge(kwargs.pop("base"), state_dicts, **kwargs)
    items = _as_state_dict_list(state_dicts)
    check_compatible(items)
    if name == "fisher":
        fishers = kwargs.get("fishers")
        if fishers is None:
            fishers = _fishers_from_data(items, kwargs)
        elif any(k in kwargs for k in _FISHER_DATA_KWARGS):
            raise MergeError(
                "merge strategy 'fisher': pass either fishers= or the data to estimate them, not both"
            )
        return fisher_merge(items, fishers, eps=kwargs.get("eps", 1e-8))
    # distill
    factory = kwargs.pop("model_factory")
    loader = kwargs.pop("loader")
    device = kwargs.get("device")
    teachers = [_model_from_state(factory, state, device) for state in items]
    student = _model_from_state(factory, swa_merge(items, kwargs.pop("weights", None)), device)
    return distill_merge(student, teachers, loader, **kwargs)
