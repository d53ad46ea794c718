"""`trainStep` telemetry shared by every loop: the emission cadence, throughput, and diagnostics.

The training thread pays one counter update per step. When a step is due it builds one small dict
whose values may still be device tensors; the writer thread reads them when it encodes the event,
so the training thread never waits on a host sync for telemetry.

Cadence: with `log_every_n_steps` set, every n-th step; by default (None) every step, but no more
than one event per `log_interval_s` (20 ms): a loop of millisecond steps would otherwise spend
more on reporting than on training, and no chart needs 1000 points a second. Either way the loss
an event carries is the mean over the steps since the previous event, reduced on the device with
one kernel, and a step the cadence skipped is reported at the epoch end, a pause or the end.

Weight and gradient norms cost a kernel per parameter tensor, so they are taken once per
`diagnostics_every_n_steps` steps *and* no more often than every `diagnostics_interval_s`
seconds: the first bound keeps a large model (long steps) within a fraction of a percent, the
second a tiny one (steps of a millisecond). Process memory is a file read on CPU: at most once
a second.
"""

from __future__ import annotations

import time
from typing import Any

import torch

#: Seconds between two reads of the process's memory (a file read on CPU).
MEMORY_SAMPLE_S = 1.0


def total_norm(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """L2 norm over many tensors, computed on their device (no host sync)."""
    if not tensors:
        return None
    norms = torch._foreach_norm(tensors) if hasattr(torch, "_foreach_norm") else [t.norm() for t in tensors]
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))


def process_memory_mib(device: torch.device) -> float | None:
    """CUDA memory allocated, or this process's resident memory on CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        with open("/proc/self/statm", "rb") as fh:
            pages = int(fh.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    import resource

    return pages * resource.getpagesize() / 2**20


def mean_lr(optimizer: torch.optim.Optimizer | None) -> Any:
    """The learning rate averaged over an optimizer's parameter groups (as the dashboard shows it).

    A tensor learning rate (capturable optimizers) stays a tensor: reading it is the writer's job.
    """
    groups = optimizer.param_groups if optimizer is not None else ()
    if not groups:
        return None
    rates = [g["lr"] if isinstance(g["lr"], torch.Tensor) else float(g["lr"]) for g in groups]
    return rates[0] if len(rates) == 1 else sum(rates) / len(rates)


def sum_of(values: list[Any]) -> Any:
    """The sum of losses: one device kernel for tensors, plain arithmetic for numbers; None if they don't mix."""
    if all(isinstance(v, torch.Tensor) for v in values):
        with torch.no_grad():
            try:
                stacked = torch.stack(values)
            except RuntimeError:  # different shapes or devices
                try:
                    stacked = torch.stack([v.reshape(()) for v in values])
                except RuntimeError:  # not scalars, or on different devices
                    return None
            if stacked.numel() != len(values):
                return None  # losses with several elements each have no single mean
            return stacked.float().sum()
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return float(sum(values))
    return None


def as_float(value: Any) -> float | None:
    """A loss as a Python float (a tensor is read here: call it where a host sync is acceptable)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean().item()) if value.numel() != 1 else float(value.item())
    return float(value)


class IntervalMean:
    """The mean loss of the steps one event covers, computed when it is read.

    The training thread only hands over what it collected (the recent losses, and the device sum
    and count of older ones); the writer thread does the reduction (one stack-and-sum kernel) and
    the read as it encodes the event (`tolist`, the hook every encoder uses for tensors), so a step
    costs the training thread a list append.
    """

    __slots__ = ("_values", "_partial", "_partial_n", "_result")

    def __init__(self, values: list[Any], partial: Any, partial_n: int) -> None:
        self._values, self._partial, self._partial_n = values, partial, partial_n
        self._result: tuple[float | None] | None = None

    def tolist(self) -> float | None:
        if self._result is None:  # two readers racing compute the same value
            self._result = (as_float(self._mean()),)
        return self._result[0]

    item = tolist

    def __float__(self) -> float:
        value = self.tolist()
        return float("nan") if value is None else value

    def _mean(self) -> Any:
        values = self._values
        total = sum_of(values) if values else None
        if values and total is None:  # kinds, shapes or devices that do not add up: the latest value
            return values[-1]
        count = self._partial_n + len(values)
        if self._partial is not None:
            total = self._partial if total is None else self._partial + total
        return None if total is None or count == 0 else total / count

    def __repr__(self) -> str:
        return f"IntervalMean({self.tolist()!r})"


#: Losses kept per interval before they are summed on the device (bounds memory when events are rare).
_COMPACT_AT = 256


class StepTelemetry:
    """Per-step accounting for one training loop; see the module docstring for the cadences."""

    def __init__(self, log_every: int | None = 1, diag_every: int = 10, diag_interval: float = 0.0,
                 log_interval: float = 0.02) -> None:
        self._mem_at = float("-inf")
        self._mem_mib: float | None = None
        self.configure(log_every, diag_every, diag_interval, log_interval)

    #: Processes training alike (the ranks of a distributed run): throughput counts them all.
    samples_scale = 1

    def configure(self, log_every: int | None, diag_every: int, diag_interval: float,
                  log_interval: float = 0.02, step: int = 0) -> None:
        """Take new cadences (a changed config) and start over at `step`."""
        self.log_every, self.log_interval = log_every, log_interval
        self.diag_every, self.diag_interval = diag_every, diag_interval
        self.restart(step)

    def restart(self, step: int = 0) -> None:
        """Training (re)starts at `step`: a new throughput interval, no unreported steps."""
        self._clock = time.perf_counter()
        self._emitted_at = float("-inf")
        self._samples = 0
        self._clear_losses()
        #: Steps counted since the last `fields` (reported by `fields` of a skipped step).
        self.unreported = 0
        self._diag_at = float("-inf")
        self._diag_bucket = step // self.diag_every

    def _clear_losses(self) -> None:
        self._losses: list[Any] = []
        self._loss_sum: Any = None  # device sum and count of losses folded in by `_compact`
        self._loss_n = 0

    def count(self, step: int, samples: int, loss: Any) -> bool:
        """Account one step; True when its `trainStep` is due (then call `fields`)."""
        self._samples += samples
        self.unreported += 1
        if loss is not None:
            losses = self._losses
            losses.append(loss)
            if len(losses) >= _COMPACT_AT:
                self._compact()
        if self.log_every is not None:
            return step % self.log_every == 0
        return time.perf_counter() - self._emitted_at >= self.log_interval

    def _compact(self) -> None:
        """Fold the kept losses into the running (device) sum."""
        losses = self._losses
        total = sum_of(losses)
        if total is None:  # losses that do not add up have no mean: start over from the latest
            self._loss_sum, self._loss_n, self._losses = None, 0, [losses[-1]]
            return
        self._loss_sum = total if self._loss_sum is None else self._loss_sum + total
        self._loss_n += len(losses)
        self._losses = []

    def _interval_loss(self) -> Any:
        losses = self._losses
        if self._loss_n == 0 and len(losses) <= 1:
            return losses[0] if losses else None  # every step reported: the step's own value
        return IntervalMean(losses, self._loss_sum, self._loss_n)

    def fields(self, step: int, epoch: int, val_loss: Any, *, loss: Any = None, accuracy: Any = None,
               lr: Any = None, grad_norm: Any = None) -> dict[str, Any]:
        """The protocol's `trainStep` fields for a due step; ends the interval.

        `loss` None means: the mean of the losses counted since the last event. The costlier
        diagnostics (`weight_norm`, `mem_vram`, `gpu_util`, `activation_zero_frac`) start as None;
        `add_diagnostics` fills them in when `diagnostics_due`.
        """
        now = time.perf_counter()
        elapsed = now - self._clock
        samples = self._samples * self.samples_scale
        throughput = samples / elapsed if elapsed > 0 and samples else None
        self._clock = self._emitted_at = now
        self._samples = 0
        self.unreported = 0
        if loss is None or self._losses or self._loss_n:
            loss = self._interval_loss()
        self._clear_losses()
        return {
            "step": step,
            "epoch": epoch,
            "loss": loss,
            "val_loss": val_loss,
            "accuracy": accuracy,
            "lr": lr,
            "grad_norm": grad_norm,
            "weight_norm": None,
            "activation_zero_frac": None,
            "throughput": throughput,
            "mem_vram": None,
            "gpu_util": None,
        }

    def diagnostics_due(self, step: int) -> bool:
        """Whether this emitted step also carries the diagnostics (then call `add_diagnostics`).

        Due on the first emitted step at or after each multiple of `diag_every` (with every step
        emitted: exactly the multiples), unless the last diagnostics are under `diag_interval` old.
        """
        bucket = step // self.diag_every
        if bucket <= self._diag_bucket:
            return False
        now = time.perf_counter()
        if now - self._diag_at < self.diag_interval:
            return False
        self._diag_bucket, self._diag_at = bucket, now
        return True

    def add_diagnostics(self, fields: dict[str, Any], model: torch.nn.Module | None, device: torch.device,
                        outputs: Any = None, targets: Any = None) -> None:
        """Weight and gradient norms, accuracy from (outputs, targets), memory: device tensors, no sync."""
        if model is not None:
            params = list(model.parameters())
            with torch.no_grad():
                fields["weight_norm"] = total_norm([p.detach() for p in params])
                if fields["grad_norm"] is None:
                    fields["grad_norm"] = total_norm([p.grad.detach() for p in params if p.grad is not None])
                if fields["accuracy"] is None and _classification(outputs, targets):
                    fields["accuracy"] = (outputs.argmax(dim=1) == targets.to(outputs.device)).float().mean()
        now = time.monotonic()
        if now - self._mem_at >= MEMORY_SAMPLE_S:
            self._mem_at, self._mem_mib = now, process_memory_mib(device)
        fields["mem_vram"] = self._mem_mib
        if device.type == "cuda":
            try:
                fields["gpu_util"] = float(torch.cuda.utilization(device))
            except (RuntimeError, ModuleNotFoundError):  # NVML is optional
                pass


def _classification(outputs: Any, targets: Any) -> bool:
    """Whether (outputs, targets) look like class scores [N, C] and integer labels [N]."""
    return (torch.is_tensor(outputs) and torch.is_tensor(targets) and outputs.dim() == 2
            and targets.dim() == 1 and not targets.is_floating_point() and outputs.shape[0] == targets.shape[0])
