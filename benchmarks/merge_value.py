"""Benchmark: is forking a specialist on hard samples and merging it back worth it?

scikit-learn's digits (bundled): 60% train / 40% test (stratified, fixed seeds). A small MLP
(64-64-10, Adam 1e-3, batch 32) trains `--base-epochs` epochs in an `onthefly.OnTheFlySession`
(transport off, `session.train()` with `cfg.max_steps`), driven from Python with `session.call`
between two `train()` calls, as docs/runs.md shows. The "hard" sub-population is what that early
model gets wrong:
on the training set it is what the fork trains on, on the test set it is the held-out hard set.
Then, with the same budget of N extra optimizer steps:

- base + N steps: the base model (weights and optimizer state as at the fork) trains N more
  steps on the whole training set (plain PyTorch, same loader settings);
- fork: `session.call("fork", {"selection": {"kind": "indices", "ids": hard}, ...})`, then
  `session.train()` for N steps on the hard training samples (`cfg.max_steps` moved N on; no
  fork budget, which pauses and never returns without a dashboard), then the specialist alone,
  and `session.call("merge", {"parents": ["baseline", <fork>],
  "strategy": s})` for each strategy (the merge itself trains nothing, except `distill`, which
  distils for `distill_steps` = 100 steps on the union of the parents' data);
- siblings: a second fork from the same point (`parent_run_id: "baseline"`) trains N steps on
  all the data, and the two branches are merged with each strategy (2N steps in all).

Accuracy overall / on the held-out hard samples / on the rest, mean over 3 seeds (per-seed
values with --verbose). With `--selection quantile` the fork takes the docs' recipe instead:
the top 15% per-sample losses of the session's report scan.

    python benchmarks/merge_value.py                  # 3 seeds, base 10 epochs, N = 100
    python benchmarks/merge_value.py --quick          # 1 seed
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _digits import (
    ArrayDataset,
    load_digits_arrays,
    make_loader,
    predict_probs,
    stratified_split,
)

import onthefly

STRATEGIES = ("swa", "fisher", "ties", "task_arithmetic", "adapter", "distill")
BATCH = 32
LR = 1e-3


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, hard: np.ndarray) -> dict[str, float]:
    right = predict_probs(model, x).argmax(1) == y
    return {"all": float(right.mean()), "hard": float(right[hard].mean()), "rest": float(right[~hard].mean())}


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, loader: Any, steps: int) -> int:
    """`steps` plain optimizer steps, cycling over `loader`."""
    loss_fn = nn.CrossEntropyLoss()
    done = 0
    model.train()
    while done < steps:
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xb), yb).backward()
            opt.step()
            done += 1
            if done == steps:
                break
    return done


def train_session_until(session: Any, step: int) -> None:
    session.cfg.max_steps = step
    status = session.train()
    if status != "completed" or session.state.step != step:
        raise RuntimeError(f"session.train() ended {status!r} at step {session.state.step}, expected {step}")


def merge_all(session: Any, parents: list[str], label: str, rows: dict[str, Any], notes: dict[str, str],
              evaluate: Any) -> None:
    """Merge `parents` with every strategy in turn (each merge is a new run) and evaluate each."""
    for strategy in STRATEGIES:
        try:
            session.call("merge", {"parents": parents, "strategy": strategy})
        except onthefly.ProtocolError as exc:
            notes[strategy] = str(exc).splitlines()[0][:90]
            continue
        rows[f"{label} {strategy}"] = evaluate()


def run_seed(seed: int, base_epochs: int, n_steps: int, selection: str, fork_lr: float,
             save_dir: str) -> dict[str, Any]:
    x_all, y_all = load_digits_arrays()
    train, test = stratified_split(y_all, 0.4, seed)
    x_tr, y_tr, x_te, y_te = x_all[train], y_all[train], x_all[test], y_all[test]
    train_ds = ArrayDataset(x_tr, y_tr)
    model = make_model(seed)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    loader = make_loader(train_ds, BATCH, seed)
    rows: dict[str, dict[str, float]] = {}
    notes: dict[str, str] = {}
    cfg = onthefly.SessionConfig(project="merge-value", run_name="baseline", max_epochs=None, transport="off",
                                 save_dir=save_dir, seed=seed)
    session = onthefly.OnTheFlySession(cfg)
    try:
        session.bind(model=model, optimizer=opt, loss_fn=nn.CrossEntropyLoss(), train_loader=loader,
                     model_factory=lambda: make_model(seed))
        base_steps = base_epochs * len(loader)
        train_session_until(session, base_steps)
        hard_train = predict_probs(model, x_tr).argmax(1) != y_tr
        hard_test = predict_probs(model, x_te).argmax(1) != y_te
        rows["base (at the fork)"] = accuracy(model, x_te, y_te, hard_test)
        snapshot = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
        if selection == "indices":
            sel = {"kind": "indices", "ids": np.flatnonzero(hard_train).tolist()}
        else:
            sel = {"kind": "quantile", "from": 0.85, "to": 1.0}
        fork = session.call("fork", {"selection": sel, "hparams": {"lr": fork_lr}})
        picked = np.asarray(fork["subset_indices"])
        train_session_until(session, base_steps + n_steps)
        rows["fork alone (specialist)"] = accuracy(model, x_te, y_te, hard_test)
        merge_all(session, ["baseline", fork["new_run"]], "fork + merge", rows, notes,
                  lambda: accuracy(model, x_te, y_te, hard_test))
        # A sibling from the same point trains the same N steps on all the data; then the two
        # branches are merged (2N steps in all): can a merge combine what each learnt?
        sibling = session.call("fork", {"parent_run_id": "baseline", "hparams": {"lr": LR},
                                        "selection": {"kind": "indices", "ids": list(range(len(y_tr)))}})
        if session.state.step != base_steps:
            raise RuntimeError(f"the sibling starts at step {session.state.step}, not at the fork point {base_steps}")
        train_session_until(session, base_steps + n_steps)
        rows["sibling: fork on all data, N steps"] = accuracy(model, x_te, y_te, hard_test)
        merge_all(session, [sibling["new_run"], fork["new_run"]], "siblings (2N) + merge", rows, notes,
                  lambda: accuracy(model, x_te, y_te, hard_test))
    finally:
        session.close()

    base = make_model(seed)
    base.load_state_dict(snapshot[0])
    base_opt = torch.optim.Adam(base.parameters(), lr=LR)
    base_opt.load_state_dict(snapshot[1])
    plain_loader = make_loader(train_ds, BATCH, seed + 1000)
    train_steps(base, base_opt, plain_loader, n_steps)
    first = {"base + N steps (all data)": accuracy(base, x_te, y_te, hard_test)}
    train_steps(base, base_opt, plain_loader, n_steps)
    first["base + 2N steps (all data)"] = accuracy(base, x_te, y_te, hard_test)
    rows = {**first, **rows}
    return {"rows": rows, "notes": notes, "hard_train": int(hard_train.sum()), "hard_test": int(hard_test.sum()),
            "fork_size": len(picked), "fork_precision": float(hard_train[picked].mean()),
            "n_train": len(y_tr), "n_test": len(y_te)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--base-epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=100, help="N: the extra optimizer steps")
    parser.add_argument("--selection", choices=["indices", "quantile"], default="indices")
    parser.add_argument("--fork-lr", type=float, default=LR, help="the fork's learning rate (hparams.lr)")
    parser.add_argument("--verbose", action="store_true", help="per-seed figures")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = list(range(1 if args.quick else args.seeds))
    started = time.perf_counter()
    results = []
    for seed in seeds:
        with tempfile.TemporaryDirectory(prefix="otf-merge-value-") as folder:
            results.append(run_seed(seed, args.base_epochs, args.steps, args.selection, args.fork_lr, folder))
    r0 = results[0]
    print(f"digits: {r0['n_train']} train / {r0['n_test']} test; base {args.base_epochs} epochs; "
          f"N = {args.steps} steps; seeds {seeds}; fork selection: {args.selection}, fork lr {args.fork_lr:g}")
    print("hard = misclassified by the base at the fork: "
          + "; ".join(f"seed {s}: {r['hard_train']} train, {r['hard_test']} test, fork on {r['fork_size']} "
                      f"({r['fork_precision']:.0%} hard)" for s, r in zip(seeds, results)))
    print(f"\n{'test accuracy (mean over seeds)':38} {'all':>7} {'hard':>7} {'rest':>7}")
    for name in results[0]["rows"]:
        vals = [r["rows"][name] for r in results if name in r["rows"]]
        line = f"{name:38} " + " ".join(f"{np.mean([v[k] for v in vals]):7.3f}" for k in ("all", "hard", "rest"))
        if args.verbose:
            line += "   per seed hard: " + " ".join(f"{v['hard']:.3f}" for v in vals)
        print(line)
    for strategy in STRATEGIES:
        msgs = {r["notes"][strategy] for r in results if strategy in r["notes"]}
        if msgs:
            print(f"merge {strategy}: not available: {'; '.join(sorted(msgs))}")
    print(f"({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
