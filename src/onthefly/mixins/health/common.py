"""What every health probe shares: the report text, the loader a probe reads, and guards that
leave the run's loaders exactly as they were."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Callable, Sequence, TypeVar

import torch
from torch import nn
from torch.utils.data import DataLoader

from ...control.errors import CommandError, ErrorCode
from ...data_explorer import batch_size_of, call_model
from ...data_explorer.calling import cache_for
from ...sampler_utils import EpochSeededRandomSampler, has_custom_batch_sampler

T = TypeVar("T")

# ---- payloads -------------------------------------------------------------------------------------
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
    root = session.train_root_loader
    if root is not None:
        return root, "train"
    raise CommandError("no validation or training loader is configured for this session",
                       ErrorCode.NOT_FOUND)


def in_health_window(session: Any, check: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    return session.console.pause_window({"action": "health", "check": check}, fn, checkpoint=False)


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
