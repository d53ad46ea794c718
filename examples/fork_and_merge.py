"""Find a hard sub-population, fork a specialist on it, merge it back, and compare.

The data has a rare sub-population (about 8% of samples, where x[0] > 1.4) whose labels follow a
different rule. A short baseline run learns the common rule and stays poor on the rare one. The
example scores every training sample (the same scan as the dashboard's report), forks a specialist
run on the hardest samples, trains it briefly, merges it with its parent, and prints the loss on
the sub-population and on the rest, before and after.

    python examples/fork_and_merge.py [--strategy fisher] [--seed 0]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from onthefly import OnTheFlySession, SessionConfig


def make_data(n: int, seed: int) -> tuple[TensorDataset, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    common = torch.randn(10, 4, generator=torch.Generator().manual_seed(100))
    rare = torch.randn(10, 4, generator=torch.Generator().manual_seed(200))
    hard = x[:, 0] > 1.4
    y = torch.where(hard, (x @ rare).argmax(1), (x @ common).argmax(1))
    return TensorDataset(x, y), hard


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


@torch.no_grad()
def split_losses(model: nn.Module, data: TensorDataset, hard: torch.Tensor) -> tuple[float, float]:
    model.eval()
    x, y = data.tensors
    per = nn.functional.cross_entropy(model(x), y, reduction="none")
    model.train()
    return per[hard].mean().item(), per[~hard].mean().item()


def run(strategy: str = "fisher", seed: int = 0, save_dir: str | None = None, verbose: bool = True) -> dict:
    """The whole workflow; returns the losses before and after (used by the test suite)."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    train, hard_train = make_data(6000, seed=1)
    test, hard_test = make_data(3000, seed=2)
    model = make_model()
    cfg = SessionConfig(project="fork-and-merge", run_name="baseline", max_epochs=4, transport="off",
                        save_dir=save_dir or tempfile.mkdtemp(prefix="onthefly-example-"), seed=seed)
    session = OnTheFlySession(cfg)
    try:
        session.bind(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=3e-3),
                     loss_fn=nn.CrossEntropyLoss(), train_loader=DataLoader(train, batch_size=64, shuffle=True),
                     model_factory=make_model)
        session.train()
        before = split_losses(model, test, hard_test)

        # The dashboard's report: per-sample losses of the whole training set.
        report = session.call("generate_report", {"subset_on": "train"})
        # Fork a specialist on the hardest 10% of the training samples.
        fork = session.call("fork", {"selection": {"kind": "quantile", "from": 0.9, "to": 1.0},
                                     "hparams": {"lr": 1e-3}})
        picked = torch.tensor(fork["subset_indices"])
        precision = hard_train[picked].float().mean().item()
        session.cfg.max_epochs = 8
        session.train()  # the specialist trains on its subset
        specialist = split_losses(model, test, hard_test)

        merge = session.call("merge", {"parents": ["baseline", fork["new_run"]], "strategy": strategy})
        after = split_losses(model, test, hard_test)
    finally:
        session.close()
    result = {
        "baseline_hard": before[0], "baseline_rest": before[1],
        "specialist_hard": specialist[0], "specialist_rest": specialist[1],
        "merged_hard": after[0], "merged_rest": after[1],
        "fork": fork["new_run"], "merge": merge["new_run"], "subset": len(picked),
        "subset_precision": precision, "report_samples": len(report["losses"]),
        "seconds": time.perf_counter() - started,
    }
    if verbose:
        print(f"scored {result['report_samples']} samples; forked {result['fork']} on {result['subset']} "
              f"({precision:.0%} from the rare sub-population)")
        print(f"{'':>12} {'hard':>8} {'rest':>8}")
        for name in ("baseline", "specialist", "merged"):
            print(f"{name:>12} {result[name + '_hard']:8.4f} {result[name + '_rest']:8.4f}")
        print(f"merge ({strategy}): hard loss {before[0]:.4f} -> {after[0]:.4f}; "
              f"rest {before[1]:.4f} -> {after[1]:.4f} ({(after[1] / before[1] - 1):+.1%}); "
              f"{result['seconds']:.1f} s")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="fisher", choices=["swa", "fisher", "ties", "task_arithmetic", "distill"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run(args.strategy, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
