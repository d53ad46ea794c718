"""Training-loop overhead of onthefly against plain PyTorch, Lightning and HF, measured in the same run.

    python benchmarks/overhead.py [--runs 15] [--samples 20000] [--only native,own,lightning,hf]
                                  [--slice 8] [--sequential]

The same MLP (32-256-256-10, batch 64, Adam, `torch.set_num_threads(1)`) is trained for one
epoch by each variant; every comparison has its own baseline:

- native:    a plain PyTorch loop vs `Trainer.fit` with no dashboard, and (a second comparison)
             with a loopback dashboard listening (target <= 1.05x, the issue's target being the
             one with the dashboard);
- own loop:  the same plain loop vs that loop with `onthefly.attach` + `session.step(loss)`, a
             dashboard listening (target <= 1.03x);
- lightning: `L.Trainer.fit` vs the same with `attach_lightning`, a dashboard listening; progress
             bar, logger, checkpointing and model summary off in both (target <= 1.05x);
- hf:        `transformers.Trainer.train` vs the same with `attach_hf`, a dashboard listening; the
             MLP takes `(x, labels)` and returns its loss and logits, the samples are dicts put
             together by HF's default collator; reporting, saving, logging and progress bars off
             in both (target <= 1.05x).

A variant's time is its whole training call as the user sees it (`fit`, or the loop plus
`session.close()`), not the construction of the trainer or session before it.

Method. On a shared virtual machine the CPU's speed drifts by 10-30% over seconds, so two
trainings run one after the other differ by more than the few percent measured here. The
variants of a comparison therefore run *interleaved*: each in its own thread, one at a time,
handing the turn to the next every `--slice` batches (about 10-20 ms), so all of them see the
same machine speed. A variant's time is the wall time it held the turn, from the start of its
training call to its end; the hand-offs are not counted on either side, and the same hand-off
hook runs in every variant (a loader wrapper, a Lightning callback at batch start, an HF callback
at step begin). Anything
a variant runs on other threads (onthefly's writer) keeps running during the others' turns, as
it would on a second core. A run's ratio is the variant's time over the baseline's in that run;
the figure is the median over `--runs` runs (with the interquartile range).
`--sequential` instead times whole trainings back to back in ABBA order (the method of most
benchmarks; on a quiet machine it agrees, on a noisy one its spread is several times larger).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(__file__))
from _common import loopback_dashboard  # noqa: E402
from _interleave import Interleaved, Tick, Ticking, Timer, Variant, quartiles, sequential, settle  # noqa: E402

import onthefly  # noqa: E402
from onthefly import Trainer  # noqa: E402


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def make_loader(samples: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 32, generator=g)
    y = torch.randint(0, 10, (samples,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)


def fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = make_mlp()
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The plain step every PyTorch variant runs."""
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss


def wait_connected(session: Any) -> None:
    deadline = time.monotonic() + 5
    while not session.bus.connected:
        if time.monotonic() > deadline:
            raise RuntimeError("the loopback dashboard did not accept the connection within 5 s")
        time.sleep(0.005)


# ---- the variants (setup outside `start()`..`stop()` is not timed) ---------------------------------
def plain_loop(loader: DataLoader) -> Variant:
    def run(tick: Tick, timer: Timer) -> None:
        model, opt = fresh()
        timer.start()
        for x, y in Ticking(loader, tick):
            train_step(model, opt, x, y)
        timer.stop()
    return run


def trainer_fit(loader: DataLoader, root: str, port: int | None) -> Variant:
    def run(tick: Tick, timer: Timer) -> None:
        model, opt = fresh()
        trainer = Trainer(project="bench", max_epochs=1, transport="off" if port is None else "tcp",
                          dashboard_port=port, save_dir=root, serve_after_training=False)
        if port is not None:
            wait_connected(trainer.session)
        timer.start()
        trainer.fit(model=model, optimizer=opt, loss_fn=nn.CrossEntropyLoss(), train_loader=Ticking(loader, tick))
        timer.stop()
    return run


def attached_loop(loader: DataLoader, root: str, port: int) -> Variant:
    def run(tick: Tick, timer: Timer) -> None:
        model, opt = fresh()
        session = onthefly.attach(model=model, optimizer=opt, train_loader=loader, project="bench",
                                  transport="tcp", dashboard_port=port, save_dir=root)
        wait_connected(session)
        timer.start()
        for x, y in Ticking(loader, tick):
            loss = train_step(model, opt, x, y)
            if not session.step(loss):
                break
        session.close()
        timer.stop()
    return run


def lightning_variants(loader: DataLoader, root: str, port: int) -> tuple[Variant, ...]:
    import lightning.pytorch as pl

    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)  # "GPU available: ..." on every fit

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_mlp()

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    class HandOff(pl.Callback):
        def __init__(self, tick: Tick) -> None:
            self.tick = tick

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
            self.tick()

    def make(tick: Tick) -> tuple[Lit, pl.Trainer]:
        torch.manual_seed(0)
        return Lit(), pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                 enable_model_summary=False, accelerator="cpu", devices=1, num_sanity_val_steps=0,
                                 callbacks=[HandOff(tick)])

    def plain(tick: Tick, timer: Timer) -> None:
        model, trainer = make(tick)
        timer.start()
        trainer.fit(model, loader)
        timer.stop()

    def attached(tick: Tick, timer: Timer) -> None:
        model, trainer = make(tick)
        session = onthefly.attach_lightning(trainer=trainer, model=model, project="bench", transport="tcp",
                                            dashboard_port=port, save_dir=root)
        wait_connected(session)
        timer.start()
        trainer.fit(model, loader)
        session.close()
        timer.stop()

    return plain, attached


class Named(torch.utils.data.Dataset):
    """`(x, y)` samples as the dicts an HF Trainer feeds a model."""

    def __init__(self, base: TensorDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self.base[i]
        return {"x": x, "labels": y}


def hf_variants(loader: DataLoader, root: str, port: int) -> tuple[Variant, ...]:
    import transformers

    transformers.logging.set_verbosity_error()
    dataset = Named(loader.dataset)

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_mlp()

        def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
            logits = self.net(x)
            return {"loss": None if labels is None else F.cross_entropy(logits, labels), "logits": logits}

    class HandOff(transformers.TrainerCallback):
        def __init__(self, tick: Tick) -> None:
            self.tick = tick

        def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            self.tick()

    def make(tick: Tick) -> transformers.Trainer:
        torch.manual_seed(0)
        model = MLP()
        args = transformers.TrainingArguments(
            output_dir=os.path.join(root, "hf"), per_device_train_batch_size=loader.batch_size, num_train_epochs=1,
            report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, callbacks=[HandOff(tick)],
                                       optimizers=(torch.optim.Adam(model.parameters(), lr=1e-3), None))
        trainer.remove_callback(transformers.PrinterCallback)  # it prints the final metrics to stdout
        return trainer

    def plain(tick: Tick, timer: Timer) -> None:
        trainer = make(tick)
        timer.start()
        trainer.train()
        timer.stop()

    def attached(tick: Tick, timer: Timer) -> None:
        trainer = make(tick)
        session = onthefly.attach_hf(trainer, project="bench", transport="tcp", dashboard_port=port, save_dir=root)
        wait_connected(session)
        timer.start()
        trainer.train()
        session.close()
        timer.stop()

    return plain, attached


# ---- the harness ------------------------------------------------------------------------------------
class Comparison:
    def __init__(self, title: str, variants: dict[str, Variant], target: tuple[str, float]) -> None:
        self.title, self.variants, self.target = title, variants, target
        self.baseline = next(iter(variants))
        self.times: dict[str, list[float]] = {name: [] for name in variants}
        self.ratios: dict[str, list[float]] = {name: [] for name in list(variants)[1:]}

    def add(self, spent: dict[str, float]) -> None:
        for name, seconds in spent.items():
            self.times[name].append(seconds)
            if name != self.baseline:
                self.ratios[name].append(seconds / spent[self.baseline])

    def report(self, steps: int) -> bool:
        print(f"\n{self.title}")
        for name, values in self.times.items():
            m = statistics.median(values)
            line = f"  {name:<36} {m * 1e3:8.1f} ms  {m / steps * 1e6:7.1f} us/step"
            if name in self.ratios:
                q1, q2, q3 = quartiles(self.ratios[name])
                line += f"   ratio {q2:.3f}  (IQR {q1:.3f}-{q3:.3f})"
            print(line)
        name, target = self.target
        ratio = statistics.median(self.ratios[name])
        ok = ratio <= target
        print(f"  target: {name} <= {target:.2f}x baseline -> {'OK' if ok else 'MISSED'} ({ratio:.3f}x)")
        return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="runs per comparison (default 15)")
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--slice", type=int, default=8, help="batches per turn when interleaving (default 8)")
    parser.add_argument("--sequential", action="store_true", help="whole trainings back to back (ABBA) instead")
    parser.add_argument("--only", default="native,own,lightning,hf",
                        help="comma-separated: native, own, lightning, hf (default: all four)")
    args = parser.parse_args(argv)
    wanted = {part.strip() for part in args.only.split(",") if part.strip()}
    if not wanted or wanted - {"native", "own", "lightning", "hf"}:
        parser.error(f"--only takes native, own, lightning, hf; got {args.only!r}")
    if args.runs < 1 or args.slice < 1:
        parser.error("--runs and --slice must be >= 1")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*does not have many workers")
    warnings.filterwarnings("ignore", message=".*LeafSpec")
    loader = make_loader(args.samples)
    root = tempfile.mkdtemp(prefix="onthefly-bench-")
    measure: Callable[[dict[str, Variant]], dict[str, float]]
    measure = sequential if args.sequential else Interleaved(args.slice).run
    with loopback_dashboard() as port:
        comparisons = []
        if "native" in wanted:
            # Two comparisons of two variants each, not one of three: in a three-way rotation
            # each variant always follows the same other one, which skews the hand-offs.
            comparisons.append(Comparison("native Trainer, no dashboard", {
                "plain PyTorch loop": plain_loop(loader),
                "Trainer.fit (no dashboard)": trainer_fit(loader, root, None),
            }, ("Trainer.fit (no dashboard)", 1.05)))
            comparisons.append(Comparison("native Trainer, loopback dashboard listening", {
                "plain PyTorch loop": plain_loop(loader),
                "Trainer.fit (dashboard)": trainer_fit(loader, root, port),
            }, ("Trainer.fit (dashboard)", 1.05)))
        if "own" in wanted:
            comparisons.append(Comparison("own loop", {
                "plain PyTorch loop": plain_loop(loader),
                "attach + session.step (dashboard)": attached_loop(loader, root, port),
            }, ("attach + session.step (dashboard)", 1.03)))
        if "lightning" in wanted:
            lit_plain, lit_attached = lightning_variants(loader, root, port)
            comparisons.append(Comparison("Lightning", {
                "L.Trainer.fit": lit_plain,
                "L.Trainer.fit + attach_lightning": lit_attached,
            }, ("L.Trainer.fit + attach_lightning", 1.05)))
        if "hf" in wanted:
            hf_plain, hf_attached = hf_variants(loader, root, port)
            comparisons.append(Comparison("Hugging Face Trainer", {
                "transformers.Trainer.train": hf_plain,
                "Trainer.train + attach_hf": hf_attached,
            }, ("Trainer.train + attach_hf", 1.05)))
        for comparison in comparisons:
            settle()
            measure(comparison.variants)  # warm-up: first-call costs hit every variant alike
            for _ in range(args.runs):
                settle()
                comparison.add(measure(comparison.variants))
    steps = len(loader)
    how = ("back to back, ABBA" if args.sequential
           else f"interleaved every {args.slice} batches, each variant in its own thread")
    print(f"MLP 32-256-256-10, batch 64, {args.samples} samples = {steps} steps per training, Adam, 1 thread; "
          f"{args.runs} runs per comparison ({how}); ratio = median over runs of variant / baseline")
    results = [comparison.report(steps) for comparison in comparisons]
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
