"""Calling a user's model on a user's batch: input candidates, the cached call recipe, output normalisation.

Nothing here is configured by the user: the first batch is probed, the working choice is cached
(the model-input recipe on a `CallCache`) and every later batch takes the cached path.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .batches import (
    INPUT_KEYS,
    BatchParts,
    split_batch,
)

log = logging.getLogger(__name__)

MODEL_CACHE_ATTR = "_otf_call_cache"

# Exceptions that mean "this way of calling does not fit", during probing only. A cached call
# never swallows anything: the user's own error reaches them unchanged.
PROBE_ERRORS = (TypeError, ValueError, RuntimeError, IndexError, KeyError, AttributeError, AssertionError)

class ModelCallError(RuntimeError):
    """No way of feeding the batch to the model worked; the message lists each attempt."""

@dataclass(frozen=True)
class InputRecipe:
    """How to build model inputs from `BatchParts`; cached so later batches are not probed.

    kind: `positional` → `model(first, *rest[:n_rest])`; `kwargs` → `model(**first)`;
    `key` → `model(first[key])`; `embedding` → `model(model.embedding_model(first))`.
    """

    kind: str
    n_rest: int = 0
    key: str | None = None

    def describe(self) -> str:
        if self.kind == "positional":
            extra = "".join(f", rest[{i}]" for i in range(self.n_rest))
            return f"model(first{extra})"
        if self.kind == "kwargs":
            return "model(**first)"
        if self.kind == "key":
            return f"model(first[{self.key!r}])"
        return "model(model.embedding_model(first))"

@dataclass
class CallCache:
    """What was learned about calling a model: the input recipe and per-sample fallbacks.

    Kept on the model as `_otf_call_cache` unless the caller holds one explicitly. `loss_cfgs`
    holds loss patterns for loss callables that cannot carry attributes (keyed by `id`).
    """

    inputs: InputRecipe | None = None
    loss_cfgs: dict[int, dict[str, Any]] = field(default_factory=dict)
    vmap_ok: bool | None = None
    per_sample_method: str | None = None

def cache_for(model: Any, cache: CallCache | None = None) -> CallCache:
    """The cache to use for `model`: the one given, else the one stored on the model (created once)."""
    if cache is not None:
        return cache
    found = getattr(model, MODEL_CACHE_ATTR, None)
    if isinstance(found, CallCache):
        return found
    created = CallCache()
    try:
        object.__setattr__(model, MODEL_CACHE_ATTR, created)
    except (AttributeError, TypeError):
        log.warning(
            "cannot store the call cache on %s; pass cache=CallCache() to avoid probing every batch",
            type(model).__name__,
        )
    return created

@dataclass(frozen=True)
class _Signature:
    required: int  # positional parameters without defaults
    max_positional: int | None  # None when *args is accepted
    names: frozenset[str]  # parameters that may be passed by keyword
    required_names: frozenset[str]
    var_keyword: bool
    positional: tuple[str, ...]  # names of the parameters that can be passed positionally

def _unwrap_model(model: Any) -> Any:
    """The module whose `forward` defines the signature (through DDP/DataParallel and torch.compile)."""
    for _ in range(8):
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = model.module
        if inner is None:
            return model
        model = inner
    return model

def signature_of(fn: Any) -> _Signature | None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    required = 0
    max_pos: int | None = 0
    names: set[str] = set()
    required_names: set[str] = set()
    var_kw = False
    positional: list[str] = []
    for p in sig.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            positional.append(p.name)
            if max_pos is not None:
                max_pos += 1
            if p.default is p.empty:
                required += 1
        elif p.kind is p.VAR_POSITIONAL:
            max_pos = None
        elif p.kind is p.VAR_KEYWORD:
            var_kw = True
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            names.add(p.name)
            if p.default is p.empty:
                required_names.add(p.name)
    return _Signature(required, max_pos, frozenset(names), frozenset(required_names), var_kw, tuple(positional))

def _model_signature(model: Any) -> _Signature | None:
    target = _unwrap_model(model)
    fn = target.forward if isinstance(target, nn.Module) else target
    return signature_of(fn)

@dataclass(frozen=True)
class InputCandidate:
    """One way to call the model: the recipe plus the concrete arguments for this batch."""

    recipe: InputRecipe
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def describe(self) -> str:
        return self.recipe.describe()

def _fits(sig: _Signature | None, n_args: int) -> bool:
    if sig is None:
        return True
    return sig.required <= n_args and (sig.max_positional is None or n_args <= sig.max_positional)

def build_inputs(model: Any, recipe: InputRecipe, first: Any, rest: tuple[Any, ...]) -> tuple[tuple, dict]:
    if recipe.kind == "positional":
        if recipe.n_rest > len(rest):
            raise ModelCallError(
                f"cached model call {recipe.describe()} needs {recipe.n_rest + 1} batch elements, "
                f"but this batch has {len(rest) + 1}"
            )
        return (first, *rest[: recipe.n_rest]), {}
    if recipe.kind == "kwargs":
        if not isinstance(first, Mapping):
            raise ModelCallError(f"cached model call {recipe.describe()} needs a mapping batch, got {type(first).__name__}")
        return (), dict(first)
    if recipe.kind == "key":
        if not isinstance(first, Mapping) or recipe.key not in first:
            raise ModelCallError(f"cached model call {recipe.describe()} needs a batch field {recipe.key!r}")
        return (first[recipe.key],), {}
    if recipe.kind == "embedding":
        return (model.embedding_model(first),), {}
    raise ValueError(f"unknown input recipe kind {recipe.kind!r}")

def model_input_candidates(model: Any, first: Any, rest: tuple[Any, ...] = ()) -> list[InputCandidate]:
    """The ways to call `model` on a batch, most likely first, pruned by the forward signature.

    Positional batches try `model(first)`, then `model(first, rest[0])`, ... (the element after
    the last one consumed is the loss target). Mapping batches try `model(**fields)`, then
    `model(fields[<input key>])`, then `model(fields)`. A model with an `embedding_model` hook
    also gets `model(model.embedding_model(first))`.
    """
    sig = _model_signature(model)
    recipes: list[InputRecipe] = []
    if isinstance(first, Mapping):
        keys = [str(k) for k in first]
        kw_ok = sig is None or sig.var_keyword or (set(keys) <= sig.names and sig.required_names <= set(keys))
        if kw_ok and (sig is None or sig.required <= len(keys)):
            recipes.append(InputRecipe("kwargs"))
        if _fits(sig, 1):
            input_key = next((k for k in INPUT_KEYS if k in first), None)
            if input_key is None and len(keys) == 1:
                input_key = keys[0]
            if input_key is not None:
                recipes.append(InputRecipe("key", key=input_key))
            recipes.append(InputRecipe("positional", 0))
    else:
        recipes.extend(InputRecipe("positional", n) for n in range(len(rest) + 1) if _fits(sig, n + 1))
    if callable(getattr(model, "embedding_model", None)) and _fits(sig, 1):
        recipes.append(InputRecipe("embedding"))
    if not recipes:
        raise ModelCallError(
            f"no way to call {type(model).__name__} fits its forward signature with a batch of "
            f"{1 + len(rest)} element(s) (first is {type(first).__name__})"
        )
    out: list[InputCandidate] = []
    for recipe in recipes:
        if recipe.kind == "embedding":
            # Built lazily by `call_candidate`: running the hook is itself a model call.
            out.append(InputCandidate(recipe, (), {}))
        else:
            args, kwargs = build_inputs(model, recipe, first, rest)
            out.append(InputCandidate(recipe, args, kwargs))
    return out

def targets_for(recipe: InputRecipe | None, parts: BatchParts) -> Any:
    """The loss target of a split batch once the model-input recipe is known (the element after
    the inputs the model consumes), else the default guess `parts.targets`."""
    if recipe is None:
        return parts.targets
    if recipe.kind == "positional" and parts.rest:
        return parts.rest[recipe.n_rest] if recipe.n_rest < len(parts.rest) else None
    return parts.targets

def call_candidate(model: Any, candidate: InputCandidate, parts: BatchParts) -> Any:
    if candidate.recipe.kind == "embedding":
        args, kwargs = build_inputs(model, candidate.recipe, parts.first, parts.rest)
        return model(*args, **kwargs)
    return model(*candidate.args, **candidate.kwargs)

def short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."

def call_model(model: Any, batch: Any, cache: CallCache | None = None) -> Any:
    """Run `model` on a batch and return its raw outputs, trying input candidates on first use.

    The working recipe is cached (on `cache`, else on the model), so later batches call straight
    through. Raises `ModelCallError` listing every attempt when none works.
    """
    return model_outputs(model, split_batch(batch), cache_for(model, cache))

def model_outputs(model: Any, parts: BatchParts, cache: CallCache) -> Any:
    if cache.inputs is not None:
        args, kwargs = build_inputs(model, cache.inputs, parts.first, parts.rest)
        return model(*args, **kwargs)
    failures: list[str] = []
    for cand in model_input_candidates(model, parts.first, parts.rest):
        ok, outputs = attempt(failures, cand.describe(), call_candidate, model, cand, parts)
        if ok:
            cache.inputs = cand.recipe
            return outputs
    raise ModelCallError(attempts_message(f"could not call {type(model).__name__} on the batch", failures))

def attempts_message(head: str, attempts: list[str]) -> str:
    lines = "\n".join(f"  - {a}" for a in attempts) or "  (no attempt was possible)"
    return f"{head}; tried:\n{lines}"

def _tensor_in(value: Any, depth: int = 0) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if depth > 16:
        return None
    if isinstance(value, Mapping):
        keys = list(value.keys())
        ordered = [k for k in keys if k == "logits"] + [k for k in keys if k not in ("logits", "loss")]
        ordered += [k for k in keys if k == "loss"]
        for k in ordered:
            found = _tensor_in(value[k], depth + 1)
            if found is not None:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for v in value:
            found = _tensor_in(v, depth + 1)
            if found is not None:
                return found
        return None
    logits = getattr(value, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _tensor_in({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, depth + 1)
    return None

def ensure_tensor_output(output: Any) -> torch.Tensor:
    """The tensor in a model output: itself, else `logits`, else the first tensor found in nested
    lists/tuples/dicts/dataclasses/`ModelOutput`s (a `loss` entry only when nothing else is there)."""
    found = _tensor_in(output)
    if found is None:
        raise TypeError(f"model output of type {type(output).__name__} contains no tensor")
    return found

def attempt(tried: list[str], where: str, fn: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
    """Run one probing attempt. Warnings it raises are shown only if it succeeds; a failure is
    recorded in `tried` (with its warnings) instead of raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = fn(*args)
        except PROBE_ERRORS as exc:
            note = f" (warned: {short(caught[0].message, 120)})" if caught else ""
            tried.append(f"{where}: {type(exc).__name__}: {short(exc)}{note}")
            return False, None
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    return True, value
