"""Benchmark: finding flipped labels on real data with the library's training dynamics.

scikit-learn's digits (bundled, no network): 80% train / 20% validation (stratified), 10% of the
labels of both flipped to another class (fixed seeds). A small MLP (64-256-256-10, Adam 1e-3,
batch 64) trains 100 epochs; at each epoch end a `DynamicsRecorder` scores every training sample,
called from the loop exactly where a session calls it. Figures per method, over 3 seeds: P@k
(k = number of flipped training labels) and AUROC of the flipped-vs-clean ranking.

- end loss: the loss after the last epoch (what a report scan shows then);
- early-stopped loss: the recorded loss at the epoch of best (noisy) validation accuracy;
- dynamics: the library's `mislabel` score (the mean recorded loss), 1 - confidence, -AUM,
  forgetting events;
- session: the same training run by an `OnTheFlySession` with `dynamics_every_epochs=1`, and the
  `mislabel` view read back through `generate_report` — the library end to end;
- 5-fold CV confident learning (cleanlab-style, implemented here): each fold's model trains the
  same 100 epochs on the other folds; out-of-fold probabilities ranked by self-confidence.

Then the suggested cut-offs (no k given): precision / recall of the flagged set and the
estimated noise rate, for confident learning on the CV probabilities and for the mixture
cut-off (`suggest_cutoff(losses=...)`) on the mislabel score, the end loss and the
early-stopped loss.

    python benchmarks/mislabel_mining.py              # 3 seeds, 100 epochs
    python benchmarks/mislabel_mining.py --quick      # 1 seed, 30 epochs, no CV (smoke run)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _digits import (
    ArrayDataset,
    auroc,
    flip_labels,
    load_digits_arrays,
    make_loader,
    make_mlp,
    precision_at_k,
    predict_probs,
    stratified_split,
    train_epoch,
)

from onthefly.data_explorer import DynamicsRecorder, confident_learning, suggest_cutoff

BATCH = 64
LR = 1e-3
NOISE = 0.10


def train_model(x: np.ndarray, y: np.ndarray, epochs: int, seed: int, *, recorder: DynamicsRecorder | None = None,
                val: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[nn.Module, list[float]]:
    """Train the MLP; with a recorder, record every epoch end (the session's callback point)."""
    model = make_mlp(seed)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    ds = ArrayDataset(x, y)
    loader = make_loader(ds, BATCH, seed)
    step = 0
    val_acc: list[float] = []
    for epoch in range(epochs):
        step += train_epoch(model, loader, opt, loss_fn)
        if recorder is not None:
            recorder.record(model, loader, loss_fn, step=step, epoch=epoch)  # the epoch-end callback
        if val is not None:
            val_acc.append(float((predict_probs(model, val[0]).argmax(1) == val[1]).mean()))
    return model, val_acc


def session_mislabel_scores(x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> np.ndarray:
    """The same training driven by the library: a session records the dynamics at every epoch end
    (`dynamics_every_epochs=1`) and a report asks for the `mislabel` view, as a dashboard would."""
    from onthefly import OnTheFlySession, SessionConfig

    model = make_mlp(seed)
    with tempfile.TemporaryDirectory(prefix="otf-mislabel-session-") as folder:
        cfg = SessionConfig(project="mislabel", transport="off", save_dir=folder, max_epochs=epochs,
                            dynamics_every_epochs=1)
        with OnTheFlySession(cfg) as session:
            session.bind(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=LR),
                         loss_fn=nn.CrossEntropyLoss(), train_loader=make_loader(ArrayDataset(x, y), BATCH, seed))
            session.train()
            report = session.call("generate_report", {"subset_on": "train", "metric": "mislabel"})
    scores = np.full(len(y), np.nan)
    scores[np.asarray(report["sample_indices"])] = np.asarray(report["losses"], dtype=np.float64)
    return scores


def cross_validated_probs(x: np.ndarray, y: np.ndarray, epochs: int, seed: int, folds: int = 5) -> np.ndarray:
    from sklearn.model_selection import StratifiedKFold

    probs = np.zeros((len(y), 10), dtype=np.float64)
    for f, (fit, held) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y)):
        model, _ = train_model(x[fit], y[fit], epochs, seed * 100 + f)
        probs[held] = predict_probs(model, x[held])
    return probs


def run_seed(seed: int, epochs: int, with_cv: bool) -> dict[str, dict[str, float]]:
    x_all, y_all = load_digits_arrays()
    train, val = stratified_split(y_all, 0.2, seed)
    noisy_all, flipped_all = flip_labels(y_all, NOISE, seed)
    x, y, flipped = x_all[train], noisy_all[train], flipped_all[train]
    k = int(flipped.sum())
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="otf-mislabel-") as folder:
        recorder = DynamicsRecorder(folder)
        _, val_acc = train_model(x, y, epochs, seed, recorder=recorder, val=(x_all[val], noisy_all[val]))
        summary = recorder.summary()
        assert np.array_equal(summary.indices, np.arange(len(y)))  # indexed by dataset index
        best = int(np.argmax(val_acc))
        loss_hist = recorder.history("loss")
        scores = {
            "end loss": np.asarray(loss_hist[-1], dtype=np.float64),
            "early-stopped loss (best val epoch)": np.asarray(loss_hist[best], dtype=np.float64),
            "dynamics: mislabel (= mean loss)": summary.mislabel,
            "dynamics: 1 - confidence": 1.0 - summary.confidence,
            "dynamics: -AUM": -summary.aum,
            "dynamics: forgetting events": summary.forgetting + 0.001 * summary.mislabel,
        }
        cutoffs = {
            "dynamics: summary.suggested_cutoff()": summary.suggested_cutoff(),
            "end loss: suggest_cutoff(losses=...)": suggest_cutoff(losses=loss_hist[-1]),
            "early-stopped loss: suggest_cutoff(losses=)": suggest_cutoff(losses=loss_hist[best]),
        }
    scores["session: generate_report(metric='mislabel')"] = session_mislabel_scores(x, y, epochs, seed)
    if with_cv:
        probs = cross_validated_probs(x, y, epochs, seed)
        scores["5-fold CV confident learning"] = 1.0 - probs[np.arange(len(y)), y]
        cutoffs = {"5-fold CV: confident_learning(probs, y)": confident_learning(probs, y), **cutoffs}
    for name, s in scores.items():
        out[name] = {"P@k": precision_at_k(s, flipped, k), "AUROC": auroc(s, flipped)}
    for name, c in cutoffs.items():
        hit = flipped[c.flagged].sum()
        out["cut-off: " + name] = {"flagged": float(len(c.flagged)),
                                   "precision": float(hit / max(len(c.flagged), 1)),
                                   "recall": float(hit / k), "noise_rate": c.noise_rate,
                                   "separation": float(c.meta.get("separation", np.nan)),
                                   "warned": float(c.warning is not None)}
    out["_"] = {"k": float(k), "n": float(len(y)), "best_epoch": float(best + 1)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 30 epochs, no cross-validation")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=100)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = 1 if args.quick else args.seeds
    epochs = 30 if args.quick else args.epochs
    started = time.perf_counter()
    results = [run_seed(s, epochs, with_cv=not args.quick) for s in range(seeds)]
    info = results[0]["_"]
    print(f"digits, {int(info['n'])} training samples, {int(info['k'])} labels flipped ({NOISE:.0%}), "
          f"MLP {epochs} epochs, seeds {list(range(seeds))}")
    print(f"\n{'ranking (k = flipped)':46} {'P@k mean':>9} {'per seed':>22} {'AUROC':>7}")
    for name in results[0]:
        if name == "_" or name.startswith("cut-off"):
            continue
        pk = [r[name]["P@k"] for r in results if name in r]
        au = [r[name]["AUROC"] for r in results if name in r]
        print(f"{name:46} {np.mean(pk):9.3f} {' '.join(f'{v:.3f}' for v in pk):>22} {np.mean(au):7.3f}")
    if not args.quick:
        print("early-stopping epochs: " + ", ".join(str(int(r['_']['best_epoch'])) for r in results))
    print(f"\n{'suggested cut-off (no k given)':46} {'flagged':>8} {'precision':>10} {'recall':>7} {'est. noise':>11}"
          f" {'separation':>11} {'warned':>7}")
    for name in results[0]:
        if not name.startswith("cut-off"):
            continue
        rows = [r[name] for r in results]
        print(f"{name[9:]:46} {np.mean([r['flagged'] for r in rows]):8.1f} "
              f"{np.mean([r['precision'] for r in rows]):10.3f} {np.mean([r['recall'] for r in rows]):7.3f} "
              f"{np.mean([r['noise_rate'] for r in rows]):11.3f} {np.mean([r['separation'] for r in rows]):11.2f} "
              f"{int(sum(r['warned'] for r in rows)):>4}/{len(rows)}")
    print(f"(true noise rate {info['k'] / info['n']:.3f}; {time.perf_counter() - started:.0f} s)")
    dyn = [r["dynamics: mislabel (= mean loss)"]["P@k"] for r in results]
    if not args.quick:
        verdict = "PASS" if min(dyn) >= 0.90 else "FAIL"
        print(f"acceptance: library mislabel score P@k >= 0.90 on every seed: {verdict} ({min(dyn):.3f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
