"""`throughput_health`: forward (and optionally backward) time per batch and per sample."""

from __future__ import annotations

import time
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
    sync_device,
    untouched_loader,
    upper_median,
)


@dataclass
class ThroughputHealth:
    budget_steps: Annotated[int, Range(ge=1, le=10_000)] = 2
    micro_backward: bool = False


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


class ThroughputHealthMixin:
    @command("throughput_health", ThroughputHealth, mutating=True,
             description="forward (and optionally backward) time per batch and sample")
    def cmd_throughput_health(self, p: ThroughputHealth) -> dict[str, Any]:
        model = health_model(self)
        loader, source = health_loader(self)
        return in_health_window(self, "throughput_health",
                                lambda: throughput_report(self, model, loader, source, p))
