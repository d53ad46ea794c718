"""A conformance run in a process of its own: train one runtime to the end, save the final weights.

    python -m tests.conformance.fresh_process RUNTIME OUT STORE [--epochs E] [--ckpt-every N]
                                              [--port P] [--resume PATH] [--resume-run RUN] [--delay S]

With `--port` the run connects to a dashboard there (which may send `load_ckpt` before the first
step); without it the transport is off. `--resume` continues from a checkpoint or a bundle.
`--delay` slows each batch down (numerics unchanged), so a dashboard can pause it where it wants.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .runtimes import RUNTIMES, weights


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runtime", choices=sorted(RUNTIMES))
    parser.add_argument("out")
    parser.add_argument("store")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--ckpt-every", type=int, default=0)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--resume-run", default=None)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = {"ckpt_every_steps": args.ckpt_every, "allowed_paths": (str(Path(args.store).parent),)}
    if args.port is None:
        settings["transport"] = "off"
    if args.resume is not None:
        settings["resume_from"] = args.resume
        if args.resume_run is not None:
            settings["resume_run"] = args.resume_run
    run = RUNTIMES[args.runtime](args.port or 0, Path(args.store), epochs=args.epochs, delay=args.delay,
                                 **settings).start()
    run.join(300)
    torch.save({"weights": weights(run.model), "folder": str(run.session.storage.folder)}, args.out)


if __name__ == "__main__":
    main()
