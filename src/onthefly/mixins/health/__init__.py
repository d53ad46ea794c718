"""Health probes of a live run: distributed parity, activations, numerics, determinism, throughput.

Each probe is a command that runs on the training thread inside a pause window, so no optimizer
step races it, and leaves the run exactly as it found it: per-module train/eval flags, `.grad`
tensors, the RNGs (the gate's job context guards the global ones; the loaders' own generators and
sampler cursors are guarded here) and no hook left behind, also when a probe fails.
Every reply carries `text`, a readable report that starts `Run:` / `Step: | Epoch:` / `<Title>:`.
"""

from __future__ import annotations

from .activations import ActivationsHealth, ActivationsHealthMixin
from .determinism import DeterminismHealth, DeterminismHealthMixin
from .dist import DistHealth, DistHealthMixin
from .numerics import NumericsHealth, NumericsHealthMixin
from .throughput import ThroughputHealth, ThroughputHealthMixin

__all__ = ["ActivationsHealth", "DeterminismHealth", "DistHealth", "HealthMixin", "NumericsHealth",
           "ThroughputHealth"]


class HealthMixin(DistHealthMixin, ActivationsHealthMixin, NumericsHealthMixin, DeterminismHealthMixin,
                  ThroughputHealthMixin):
    """The five health commands (no state of their own)."""
