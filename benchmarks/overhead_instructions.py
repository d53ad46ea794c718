"""Training-loop overhead by instruction count (valgrind callgrind): immune to machine noise.

    python benchmarks/overhead_instructions.py [--samples 6400] [--jobs 2]

Wall-clock ratios on a shared VM swing by +-30% from run to run; instruction counts do not.
Each variant runs once under callgrind in a fresh interpreter (all threads counted):
`none` (imports and the data only), `plain` (the plain PyTorch loop), `trainer` (Trainer.fit
with no dashboard) and `dash` (Trainer.fit streaming to a loopback dashboard in another,
untraced process). The loop's cost is the variant minus `none`; the overhead ratio is
(trainer - none) / (plain - none), which includes constructing the Trainer and closing it.
Slow (several minutes per variant): valgrind runs Python about 50x slower.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHILD = r"""
import sys, tempfile, torch
sys.path.insert(0, {bench!r})
from overhead import Timer, make_loader, plain_loop, trainer_fit
torch.set_num_threads(1)
mode, n = sys.argv[1], int(sys.argv[2])
loader = make_loader(n)
timer = Timer()
timer.start = timer.stop = lambda: None
no_hand_off = lambda: None
if mode == "plain":
    plain_loop(loader)(no_hand_off, timer)
elif mode == "trainer":
    trainer_fit(loader, tempfile.mkdtemp(), None)(no_hand_off, timer)
elif mode == "dash":
    from _common import loopback_dashboard
    with loopback_dashboard() as port:
        trainer_fit(loader, tempfile.mkdtemp(), port)(no_hand_off, timer)
"""


def count(mode: str, samples: int, workdir: Path) -> int:
    script = workdir / "child.py"
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={workdir / (mode + '.out')}",
         sys.executable, str(script), mode, str(samples)],
        capture_output=True, text=True, check=True,
    )
    match = re.search(r"Collected\s*:\s*(\d+)", out.stderr)
    if not match:
        raise RuntimeError(f"callgrind printed no total for {mode}:\n{out.stderr[-2000:]}")
    return int(match.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=6400)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)")
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="onthefly-callgrind-"))
    (workdir / "child.py").write_text(CHILD.format(bench=str(Path(__file__).resolve().parent)))
    modes = ["none", "plain", "trainer", "dash"]
    with ThreadPoolExecutor(args.jobs) as pool:
        counts = dict(zip(modes, pool.map(lambda m: count(m, args.samples, workdir), modes)))
    steps = -(-args.samples // 64)
    loop = counts["plain"] - counts["none"]
    print(f"instructions (callgrind), MLP 32-256-256-10, batch 64, {steps} steps, Adam, 1 thread")
    for mode in modes:
        print(f"  {mode:<8} {counts[mode]:>16,}")
    for mode in ("trainer", "dash"):
        extra = counts[mode] - counts["plain"]
        print(f"  {mode}: {extra / 1e6:,.1f} M instructions over the plain loop "
              f"({extra / steps / 1e3:,.0f} k per step, fixed costs included) -> ratio "
              f"{(counts[mode] - counts['none']) / loop:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
