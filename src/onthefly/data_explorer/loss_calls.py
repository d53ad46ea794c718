"""Calling a user's loss on a batch: the batch-aware call patterns, the shape-warning guard and
per-sample loss extraction.

The first batch is probed and the working pattern is cached on the loss as
`_otf_batch_call_cfg`; every later batch takes the cached path without probing again.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
import re
import types
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Callable

import torch
from torch import nn

from .batches import (
    BatchParts,
    batch_size_of,
    has_per_sample_python_values,
    iter_tensors,
    map_batch,
    select_sample,
    split_batch,
)
from .calling import (
    CallCache,
    InputCandidate,
    InputRecipe,
    ModelCallError,
    attempt,
    attempts_message,
    build_inputs,
    cache_for,
    call_candidate,
    ensure_tensor_output,
    model_input_candidates,
    model_outputs,
    short,
    signature_of,
    targets_for,
)

log = logging.getLogger("onthefly.data_explorer.calling")


LOSS_CFG_ATTR = "_otf_batch_call_cfg"

# Per-sample loss methods, as reported in `PerSampleResult.meta["per_sample_method"]`.
REDUCTION_NONE = "reduction_none"

ALREADY_PER_SAMPLE = "already_per_sample"

VMAP = "vmap"

ONE_BY_ONE = "one_by_one"

class LossCallError(RuntimeError):
    """No supported call pattern worked for the loss; the message lists each attempt."""

class LossShapeError(ValueError):
    """A loss warned about broadcasting or mismatched shapes, or returned an unusable shape."""

# Warnings torch (and user losses) emit when targets and outputs do not line up, e.g. MSELoss's
# "Using a target size (torch.Size([4])) that is different to the input size ...".
_SHAPE_WARNING = r"(?s).*(broadcast|target size|input size|shape|size mismatch|different size)"

def apply_loss_with_warning_guard(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call `fn(*args, **kwargs)`, turning broadcasting/shape warnings into `LossShapeError`.

    A loss that broadcasts a (B,) target against (B, 1) outputs silently computes the wrong
    thing; during analysis that must fail loudly. Other warnings pass through untouched. Note:
    `warnings.catch_warnings` resets the "shown once" registry, so do not wrap every training
    step in it.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=_SHAPE_WARNING)
        try:
            return fn(*args, **kwargs)
        except Warning as w:
            if re.match(_SHAPE_WARNING, str(w), re.IGNORECASE):
                raise LossShapeError(f"loss computation warned about shapes: {w}") from None
            raise

def extract_loss_value(value: Any) -> torch.Tensor:
    """The loss tensor in what a loss function returned.

    Accepts a tensor or Python number; a mapping (its `loss` entry, else its only tensor); an
    object with a tensor `loss` attribute; a tuple/list (its first tensor, e.g. `(loss, logs)`).
    """
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return torch.tensor(float(value))
    if isinstance(value, Mapping):
        if "loss" in value:
            return extract_loss_value(value["loss"])
        tensors = [k for k, v in value.items() if isinstance(v, torch.Tensor)]
        if len(tensors) == 1:
            return value[tensors[0]]
        raise TypeError(
            f"loss returned a mapping without a 'loss' key and with {len(tensors)} tensors "
            f"(keys: {list(value.keys())}); return a tensor or put it under 'loss'"
        )
    loss_attr = getattr(value, "loss", None)
    if isinstance(loss_attr, torch.Tensor):
        return loss_attr
    if isinstance(value, (list, tuple)):
        for v in value:
            if isinstance(v, (torch.Tensor, Mapping)) or (isinstance(v, numbers.Real) and not isinstance(v, bool)):
                return extract_loss_value(v)
        raise TypeError(f"loss returned a {type(value).__name__} with no tensor or number in it")
    raise TypeError(f"loss returned a {type(value).__name__}; expected a tensor, number, mapping or tuple")

def coerce_to_per_sample(
    value: Any, batch_size: int, device: torch.device | str | None = None
) -> torch.Tensor | None:
    """A (batch_size,) tensor of per-sample losses from a loss value, or None for a batch reduction.

    (B,) is kept; (B, ...) is averaged over the trailing dimensions (per-element or per-token
    losses); a flat (B*T,) vector is read as B rows of T; a scalar is per-sample only when
    batch_size is 1 — otherwise None, meaning the loss reduced over the batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    t = extract_loss_value(value)
    if t.dim() == 0:
        out = t.reshape(1) if batch_size == 1 else None
    elif t.shape[0] == batch_size:
        out = t if t.dim() == 1 else t.reshape(batch_size, -1).mean(dim=1)
    elif t.dim() == 1 and t.numel() % batch_size == 0 and t.numel() > 0:
        out = t.reshape(batch_size, -1).mean(dim=1)
    else:
        raise LossShapeError(
            f"cannot read {batch_size} per-sample losses from a loss of shape {tuple(t.shape)}"
        )
    if out is not None and device is not None:
        out = out.to(device)
    return out

_PATTERNS = ("outputs_targets", "outputs_batch", "model_batch", "batch")

_PATTERN_TEXT = {
    "outputs_targets": "loss(outputs, targets)",
    "outputs_batch": "loss(outputs, batch)",
    "model_batch": "loss(model, batch)",
    "batch": "loss(batch)",
}

def _cfg_holder(loss_fn: Any) -> Any:
    # Bound methods share their function's pattern (and take no attributes themselves).
    return loss_fn.__func__ if isinstance(loss_fn, types.MethodType) else loss_fn

def _get_loss_cfg(loss_fn: Any, cache: CallCache) -> dict[str, Any] | None:
    cfg = getattr(_cfg_holder(loss_fn), LOSS_CFG_ATTR, None)
    if isinstance(cfg, dict):
        return cfg
    return cache.loss_cfgs.get(id(_cfg_holder(loss_fn)))

def _set_loss_cfg(loss_fn: Any, cache: CallCache, cfg: dict[str, Any]) -> None:
    holder = _cfg_holder(loss_fn)
    try:
        object.__setattr__(holder, LOSS_CFG_ATTR, cfg)
    except (AttributeError, TypeError):
        cache.loss_cfgs[id(holder)] = cfg  # builtins take no attributes; the cache keeps it

def _pattern_order(loss_fn: Any) -> tuple[list[str], bool]:
    """Patterns to try, most likely first (from parameter names/count), and whether the loss
    takes a `reduction=` keyword."""
    sig = signature_of(loss_fn.forward if isinstance(loss_fn, nn.Module) else loss_fn)
    if sig is None:
        return list(_PATTERNS), False
    params = sig.positional
    takes_reduction = "reduction" in sig.names
    order = list(_PATTERNS)
    first_choice = None
    if sig.required == 1:
        first_choice = "batch"
    elif params and params[0] in ("model", "net", "module"):
        first_choice = "model_batch"
    elif len(params) > 1 and params[1] in ("batch", "data", "sample", "samples"):
        first_choice = "outputs_batch"
    if first_choice is not None:
        order.remove(first_choice)
        order.insert(0, first_choice)
    if sig.max_positional is not None:
        n_args = {"outputs_targets": 2, "outputs_batch": 2, "model_batch": 2, "batch": 1}
        order = [p for p in order if sig.required <= n_args[p] <= sig.max_positional] or order
    return order, takes_reduction

def _guarded(guard: bool, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return apply_loss_with_warning_guard(fn, *args, **kwargs) if guard else fn(*args, **kwargs)

def _run_loss(
    cfg: dict[str, Any],
    loss_fn: Callable[..., Any],
    model: Any,
    batch: Any,
    parts: BatchParts,
    outputs: Any,
    recipe: InputRecipe | None,
    guard: bool,
    kwargs: dict[str, Any],
) -> Any:
    pattern = cfg["pattern"]
    if pattern == "batch":
        return _guarded(guard, loss_fn, batch, **kwargs)
    if pattern == "model_batch":
        return _guarded(guard, loss_fn, model, batch, **kwargs)
    out = ensure_tensor_output(outputs) if cfg.get("outputs") == "tensor" else outputs
    if pattern == "outputs_batch":
        return _guarded(guard, loss_fn, out, batch, **kwargs)
    targets = targets_for(recipe, parts)
    if targets is None:
        raise LossCallError("the cached pattern loss(outputs, targets) needs targets, but this batch has none")
    return _guarded(guard, loss_fn, out, targets, **kwargs)

def _call_loss(
    loss_fn: Callable[..., Any],
    model: Any,
    batch: Any,
    cache: CallCache,
    *,
    guard: bool,
    want_reduction_none: bool,
) -> tuple[Any, bool]:
    """Call the loss on a batch; returns (raw value, whether a `reduction='none'` keyword was passed)."""
    parts = split_batch(batch)
    cfg = _get_loss_cfg(loss_fn, cache)
    if cfg is not None:
        kwargs = {"reduction": "none"} if (want_reduction_none and cfg.get("reduction_kwarg")) else {}
        outputs = None
        if cfg["pattern"] in ("outputs_targets", "outputs_batch"):
            outputs = model_outputs(model, parts, cache)
        return _run_loss(cfg, loss_fn, model, batch, parts, outputs, cache.inputs, guard, kwargs), bool(kwargs)

    order, takes_reduction = _pattern_order(loss_fn)
    kwargs = {"reduction": "none"} if (want_reduction_none and takes_reduction) else {}
    tried: list[str] = []
    output_patterns = [p for p in order if p in ("outputs_targets", "outputs_batch")]
    for pattern in order:
        if pattern in ("batch", "model_batch"):
            cfg = {"pattern": pattern, "reduction_kwarg": takes_reduction}
            ok, value = attempt(
                tried, _PATTERN_TEXT[pattern], _run_loss, cfg, loss_fn, model, batch, parts, None, None, guard, kwargs
            )
            if ok:
                _set_loss_cfg(loss_fn, cache, cfg)
                return value, bool(kwargs)
        elif pattern == output_patterns[0]:
            # Candidate-major: the first model call that runs is the likeliest right one, so it
            # meets every output pattern before the next candidate is tried.
            ok, value = _probe_output_patterns(
                output_patterns, loss_fn, model, batch, parts, cache, guard, kwargs, tried, takes_reduction
            )
            if ok:
                return value, bool(kwargs)
    raise LossCallError(attempts_message(f"could not call the loss {_loss_name(loss_fn)} on the batch", tried))

def _probe_output_patterns(
    patterns: list[str],
    loss_fn: Callable[..., Any],
    model: Any,
    batch: Any,
    parts: BatchParts,
    cache: CallCache,
    guard: bool,
    kwargs: dict[str, Any],
    tried: list[str],
    takes_reduction: bool,
) -> tuple[bool, Any]:
    """Try each output pattern on each model call that runs; (True, value) on the first success."""
    if cache.inputs is not None:
        args, kw = build_inputs(model, cache.inputs, parts.first, parts.rest)
        runs: list[tuple[InputRecipe, Any]] = [(cache.inputs, model(*args, **kw))]
        candidates: list[InputCandidate] = []
    else:
        runs = []
        try:
            candidates = model_input_candidates(model, parts.first, parts.rest)
        except ModelCallError as exc:
            tried.append(f"loss(outputs, ...): {short(exc)}")
            return False, None
    model_failures: list[str] = []

    def outputs_in_order() -> Iterator[tuple[InputRecipe, Any]]:
        yield from runs
        for cand in candidates:
            ok, outputs = attempt(model_failures, f"model call {cand.describe()}", call_candidate, model, cand, parts)
            if ok:
                yield cand.recipe, outputs

    for recipe, outputs in outputs_in_order():
        targets = targets_for(recipe, parts)
        # "tensor" passes ensure_tensor_output(outputs): the same as raw for tensor outputs,
        # and it keeps working for a later model that returns a ModelOutput.
        variants = ["tensor"] if isinstance(outputs, torch.Tensor) else ["tensor", "raw"]
        for pattern in patterns:
            if pattern == "outputs_targets" and targets is None:
                continue
            for variant in variants:
                cfg = {"pattern": pattern, "outputs": variant, "reduction_kwarg": takes_reduction}
                where = f"{_PATTERN_TEXT[pattern]} with {recipe.describe()}"
                if len(variants) > 1:
                    where += " (outputs as a tensor)" if variant == "tensor" else " (raw outputs)"
                ok, value = attempt(
                    tried, where, _run_loss, cfg, loss_fn, model, batch, parts, outputs, recipe, guard, kwargs
                )
                if ok:
                    cache.inputs = recipe
                    _set_loss_cfg(loss_fn, cache, cfg)
                    return True, value
    tried.extend(model_failures)
    return False, None

def _loss_name(loss_fn: Any) -> str:
    return getattr(loss_fn, "__qualname__", None) or type(loss_fn).__name__

def call_batch_loss(
    loss_fn: Callable[..., Any],
    model: Any,
    batch: Any,
    *,
    cache: CallCache | None = None,
    warning_guard: bool = True,
) -> Any:
    """Call a loss on a batch in whichever supported form it takes, and return what it returns.

    Forms: `loss(outputs, targets)`, `loss(outputs, batch)`, `loss(model, batch)`, `loss(batch)`.
    The first that works is cached on the loss as `_otf_batch_call_cfg` and used from then on
    without probing; if none works, `LossCallError` lists every attempt.
    """
    value, _ = _call_loss(loss_fn, model, batch, cache_for(model, cache), guard=warning_guard, want_reduction_none=False)
    return value

_call_batch_loss = call_batch_loss  # the name the architecture overview uses

@contextlib.contextmanager
def reduction_none(loss_fn: Any) -> Iterator[bool]:
    """Temporarily set `loss_fn.reduction = 'none'` (restored on exit); yields whether it did."""
    current = getattr(loss_fn, "reduction", None)
    if not isinstance(current, str) or current == "none":
        yield False
        return
    # A str attribute of an nn.Module lives in its __dict__: skip Module.__setattr__'s checks.
    assign = object.__setattr__ if isinstance(loss_fn, nn.Module) else setattr
    try:
        assign(loss_fn, "reduction", "none")
    except (AttributeError, TypeError):
        log.debug("loss %s has a read-only reduction attribute; not overriding it", _loss_name(loss_fn))
        yield False
        return
    try:
        yield True
    finally:
        assign(loss_fn, "reduction", current)

def compute_batch_loss(
    model: Any,
    batch: Any,
    loss_fn: Callable[..., Any],
    *,
    per_sample: bool,
    cache: CallCache | None = None,
    warning_guard: bool = True,
) -> torch.Tensor:
    """The loss of a batch of any shape: a scalar, or a (B,) tensor when `per_sample` is True.

    Per-sample losses come from, in order: `reduction='none'` (the loss's `reduction` attribute,
    set only for the call, or its `reduction=` keyword); a loss that already returns per-sample
    values; `torch.func.vmap` over samples; one sample at a time. The method used is left in
    `cache.per_sample_method`. Grad mode is the caller's: this works inside a training step.
    """
    cache = cache_for(model, cache)
    if not per_sample:
        value, _ = _call_loss(loss_fn, model, batch, cache, guard=warning_guard, want_reduction_none=False)
        t = extract_loss_value(value)
        return t if t.dim() == 0 else t.float().mean()
    n = batch_size_of(batch)
    with reduction_none(loss_fn) as overridden:
        value, passed_kwarg = _call_loss(loss_fn, model, batch, cache, guard=warning_guard, want_reduction_none=True)
    loss = extract_loss_value(value)
    per = coerce_to_per_sample(loss, n)
    if per is not None:
        if overridden or passed_kwarg:
            cache.per_sample_method = REDUCTION_NONE
        elif loss.dim() == 0:
            cache.per_sample_method = ONE_BY_ONE  # a batch of one: the reduced loss is its loss
        else:
            cache.per_sample_method = ALREADY_PER_SAMPLE
        return per
    return _per_sample_fallback(model, batch, loss_fn, n, cache, warning_guard)

def _single_loss(model: Any, one: Any, loss_fn: Callable[..., Any], cache: CallCache, guard: bool) -> torch.Tensor:
    value, _ = _call_loss(loss_fn, model, one, cache, guard=guard, want_reduction_none=False)
    per = coerce_to_per_sample(value, 1)
    assert per is not None  # a batch of one always yields one value
    return per[0]

def _per_sample_fallback(
    model: Any, batch: Any, loss_fn: Callable[..., Any], n: int, cache: CallCache, guard: bool
) -> torch.Tensor:
    if cache.vmap_ok is not False and not has_per_sample_python_values(batch, n):
        try:
            out = _vmap_losses(model, batch, loss_fn, n, cache, guard)
        except (RuntimeError, TypeError, ValueError, LossCallError, ModelCallError) as exc:
            log.info("vmap per-sample loss failed (%s: %s); scoring one sample at a time", type(exc).__name__, short(exc))
            cache.vmap_ok = False
        else:
            cache.vmap_ok = True
            cache.per_sample_method = VMAP
            return out
    cache.per_sample_method = ONE_BY_ONE
    return torch.stack([_single_loss(model, select_sample(batch, i, n), loss_fn, cache, guard) for i in range(n)])

def _vmap_losses(
    model: Any, batch: Any, loss_fn: Callable[..., Any], n: int, cache: CallCache, guard: bool
) -> torch.Tensor:
    leaves = iter_tensors(batch)
    in_dims = tuple(0 if (t.dim() > 0 and t.shape[0] == n) else None for t in leaves)

    def one(*sample_leaves: torch.Tensor) -> torch.Tensor:
        it = iter(zip(sample_leaves, in_dims))

        def put(_: torch.Tensor) -> torch.Tensor:
            t, dim = next(it)
            return t.unsqueeze(0) if dim == 0 else t

        return _single_loss(model, map_batch(batch, put), loss_fn, cache, guard)

    out = torch.func.vmap(one, in_dims=in_dims, randomness="different")(*leaves)
    if out.shape != (n,):
        raise LossShapeError(f"vmap per-sample loss returned shape {tuple(out.shape)}, expected ({n},)")
    return out
