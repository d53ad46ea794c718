"""How much `import onthefly` (and `from onthefly import Trainer`) costs on top of `import torch`.

    python benchmarks/import_time.py [--runs 7]

Each measurement is a fresh interpreter; medians are printed. Target: < 0.3 s more than torch.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

SNIPPETS = {
    "import torch": "import torch",
    "import onthefly": "import torch; import onthefly",
    "from onthefly import Trainer": "import torch; from onthefly import Trainer",
    "import onthefly.control (no torch)": "import onthefly.control",
}


def measure(statement: str) -> float:
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args(argv)
    results: dict[str, list[float]] = {name: [] for name in SNIPPETS}
    for _ in range(args.runs):  # interleaved, so machine noise hits all alike
        for name, statement in SNIPPETS.items():
            results[name].append(measure(statement))
    base = statistics.median(results["import torch"])
    for name, values in results.items():
        m = statistics.median(values)
        extra = f"  (+{m - base:.3f} s over torch)" if name.startswith(("import onthefly", "from")) and "control" not in name else ""
        print(f"{name:<36} {m:7.3f} s{extra}")
    worst = max(statistics.median(results[n]) for n in ("import onthefly", "from onthefly import Trainer")) - base
    print(f"target: < 0.3 s over torch -> {'OK' if worst < 0.3 else 'MISSED'} (+{worst:.3f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
