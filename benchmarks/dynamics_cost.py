"""Benchmark: what recording training dynamics costs.

1. Time: a plain training epoch against the same epoch followed by `DynamicsRecorder.record`
   (what a session does at each recorded epoch end), and against the epoch followed by a bare
   hand-written `torch.no_grad()` pass with `reduction='none'` (the least one extra forward pass
   can cost). 50k samples, MLP 64-256-256-10, batch 256, one thread; interleaved repeats, medians.
   Forward passes are counted with a forward hook on the model (target: at most 1 extra forward
   per sample per recorded epoch).
2. Memory and disk: in a fresh process, 3 records of 2 million samples and a summary over them;
   peak RSS growth from /proc and bytes on disk per record.

    python benchmarks/dynamics_cost.py             # full run
    python benchmarks/dynamics_cost.py --quick     # smoke run (10k samples, 200k for memory)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

FEATURES = 64
CLASSES = 10


class PoolDataset(Dataset):
    """`n` samples drawn from a fixed pool, fetched a batch at a time, so loading costs little."""

    POOL = 8192

    def __init__(self, n: int) -> None:
        self.n = n
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(self.POOL, FEATURES, generator=g)
        self.y = torch.randint(0, CLASSES, (self.POOL,), generator=g)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i % self.POOL], self.y[i % self.POOL]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices) % self.POOL
        return self.x[idx], self.y[idx]


def keep_batch(batch: Any) -> Any:
    return batch


def make_mlp(hidden: int = 256) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, CLASSES))


def plain_epoch(model: nn.Module, loader: DataLoader, opt: torch.optim.Optimizer, loss_fn: nn.Module) -> int:
    model.train()
    steps = 0
    for x, y in loader:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        steps += 1
    return steps


def bare_forward_pass(model: nn.Module, loader: DataLoader) -> torch.Tensor:
    crit = nn.CrossEntropyLoss(reduction="none")
    was = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for x, y in loader:
            out.append(crit(model(x), y))
    model.train(was)
    return torch.cat(out)


def timing(samples: int, repeats: int, batch_size: int) -> dict[str, Any]:
    from onthefly.data_explorer import DynamicsRecorder

    model = make_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    loader = DataLoader(PoolDataset(samples), batch_size=batch_size, shuffle=True, collate_fn=keep_batch,
                        generator=torch.Generator().manual_seed(0))
    counted = [0]
    model.register_forward_hook(lambda _m, inputs, _o: counted.__setitem__(0, counted[0] + inputs[0].shape[0]))
    times: dict[str, list[float]] = {"plain": [], "recorded": [], "bare": []}
    forwards: dict[str, int] = {}
    step = 0
    with tempfile.TemporaryDirectory(prefix="otf-dyn-cost-") as folder:
        recorder = DynamicsRecorder(folder)

        def run(kind: str) -> None:
            nonlocal step
            counted[0] = 0
            t = time.perf_counter()
            step += plain_epoch(model, loader, opt, loss_fn)
            if kind == "recorded":
                recorder.record(model, loader, loss_fn, step=step)
            elif kind == "bare":
                bare_forward_pass(model, loader)
            times[kind].append(time.perf_counter() - t)
            forwards[kind] = counted[0]

        run("plain")  # warm-up (lazy imports, allocator)
        times["plain"].clear()
        order = ["plain", "recorded", "bare"]
        for rep in range(repeats):
            for kind in order[rep % 3:] + order[: rep % 3]:  # rotate who goes first
                run(kind)
        disk = recorder.disk_bytes() / recorder.num_records
        record_s = statistics.median(r.elapsed_s for r in recorder.records)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "samples": samples, "batch_size": batch_size, "repeats": repeats, "median_s": med,
        "recorded_over_plain": med["recorded"] / med["plain"], "bare_over_plain": med["bare"] / med["plain"],
        "record_over_bare_pass": (med["recorded"] - med["plain"]) / max(med["bare"] - med["plain"], 1e-9),
        "forwards": forwards, "extra_forwards_per_sample": (forwards["recorded"] - forwards["plain"]) / samples,
        "record_scan_s": record_s, "disk_bytes_per_record": disk,
    }


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(samples: int, records: int) -> None:
    """Runs in a fresh process: prints JSON with the peak-RSS growth of recording and summarising."""
    torch.set_num_threads(1)
    from onthefly.data_explorer import DynamicsRecorder

    model = nn.Linear(FEATURES, CLASSES)
    loss_fn = nn.CrossEntropyLoss()
    loader = DataLoader(PoolDataset(samples), batch_size=4096, collate_fn=keep_batch)
    with tempfile.TemporaryDirectory(prefix="otf-dyn-mem-") as folder:
        warm = DynamicsRecorder(Path(folder) / "warm")
        warm.record(model, DataLoader(PoolDataset(20_000), batch_size=4096, collate_fn=keep_batch), loss_fn, step=0)
        warm.summary()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
            reset = True
        except OSError:
            reset = False
        base_rss, base_hwm = _proc_status_kb("VmRSS"), _proc_status_kb("VmHWM")
        recorder = DynamicsRecorder(Path(folder) / "big")
        t = time.perf_counter()
        for r in range(records):
            with torch.no_grad():
                model.weight.mul_(1.01)
            recorder.record(model, loader, loss_fn, step=r + 1)
        record_s = (time.perf_counter() - t) / records
        peak_record = _proc_status_kb("VmHWM")
        t = time.perf_counter()
        summary = recorder.summary()
        summary_s = time.perf_counter() - t
        peak_summary = _proc_status_kb("VmHWM")
        base = base_rss if reset else base_hwm
        print(json.dumps({
            "samples": len(summary), "records": recorder.num_records, "peak_reset": reset,
            "record_rss_growth_mb": (peak_record - base) / 1024,
            "summary_rss_growth_mb": (peak_summary - base) / 1024,
            # The summary's own output: 9 per-sample arrays (float32/int32/bool), unavoidable.
            "summary_output_mb": sum(getattr(summary, n).nbytes for n in (
                "loss", "mean_loss", "loss_std", "confidence", "variability", "correctness", "forgetting",
                "never_learned", "aum", "mislabel")) / 2**20,
            "disk_mb_per_record": recorder.disk_bytes() / recorder.num_records / 2**20,
            "record_s": record_s, "summary_s": summary_s,
        }))


def memory(samples: int, records: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--memory-child", str(samples), "--records", str(records)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 10k samples, 200k for memory")
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--memory-samples", type=int, default=2_000_000)
    parser.add_argument("--records", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child is not None:
        memory_child(args.memory_child, args.records)
        return
    if args.quick:
        args.samples, args.memory_samples, args.repeats = 10_000, 200_000, 3
    torch.set_num_threads(1)
    t = timing(args.samples, args.repeats, args.batch_size)
    m = t["median_s"]
    print(f"time: {t['samples']:,} samples, batch {t['batch_size']}, 1 thread, median of {t['repeats']}")
    print(f"  plain epoch                          {m['plain']:.3f} s")
    print(f"  epoch + DynamicsRecorder.record      {m['recorded']:.3f} s   x{t['recorded_over_plain']:.3f} of plain")
    print(f"  epoch + bare no_grad forward pass    {m['bare']:.3f} s   x{t['bare_over_plain']:.3f} of plain")
    print(f"  record cost / bare pass cost         {t['record_over_bare_pass']:.2f}")
    f = t["forwards"]
    print(f"forward passes (samples through the model): plain {f['plain']:,}, recorded {f['recorded']:,} "
          f"-> {t['extra_forwards_per_sample']:.2f} extra per sample per recorded epoch (target <= 1)")
    print(f"disk: {t['disk_bytes_per_record'] / t['samples']:.0f} bytes per sample per record")
    mem = memory(args.memory_samples, args.records)
    note = "" if mem["peak_reset"] else " (peak not reset: growth above the earlier peak)"
    print(f"memory: {mem['samples']:,} samples x {mem['records']} records{note}: peak RSS grew "
          f"{mem['record_rss_growth_mb']:.1f} MB while recording ({mem['record_s']:.1f} s per record), "
          f"{mem['summary_rss_growth_mb']:.1f} MB with the summary (its own output is "
          f"{mem['summary_output_mb']:.1f} MB; {mem['summary_s']:.1f} s); "
          f"{mem['disk_mb_per_record']:.1f} MB on disk per record")


if __name__ == "__main__":
    main()
