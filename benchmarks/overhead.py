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
import gc
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(__file__))
from _common import loopback_dashboard  # noqa: E402

import onthefly  # noqa: E402
from onthefly import Trainer  # noqa: E402

Tick = Callable[[], None]
Variant = Callable[[Tick], None]  # trains once, calling tick() at every batch boundary


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


class Ticking:
    """A loader that calls `tick()` before fetching each batch (the hand-off point)."""

    def __init__(self, loader: DataLoader, tick: Tick) -> None:
        self.loader, self.tick = loader, tick

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.loader)
        while True:
            self.tick()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            yield batch

    def __len__(self) -> int:
        return len(self.loader)


# ---- the variants (setup outside `start()`..`stop()` is not timed) ---------------------------------
class Timer:
    """Marks where a variant's timed part starts and ends; the harness fills it in."""

    start: Callable[[], None]
    stop: Callable[[], None]


def plain_loop(loader: DataLoader) -> Callable[[Tick, Timer], None]:
    def run(tick: Tick, timer: Timer) -> None:
        model, opt = fresh()
        timer.start()
        for x, y in Ticking(loader, tick):
            train_step(model, opt, x, y)
        timer.stop()
    return run


def trainer_fit(loader: DataLoader, root: str, port: int | None) -> Callable[[Tick, Timer], None]:
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


def attached_loop(loader: DataLoader, root: str, port: int) -> Callable[[Tick, Timer], None]:
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


def lightning_variants(loader: DataLoader, root: str, port: int) -> tuple[Callable[[Tick, Timer], None], ...]:
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


def hf_variants(loader: DataLoader, root: str, port: int) -> tuple[Callable[[Tick, Timer], None], ...]:
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
class Interleaved:
    """Runs variants in threads, one at a time, passing the turn on every `slice_batches` batches."""

    def __init__(self, slice_batches: int) -> None:
        self.slice = slice_batches
        self._cv = threading.Condition()
        self._turn: str | None = None
        self._active: list[str] = []

    def _next_after(self, name: str) -> str | None:
        if not self._active:
            return None
        order = self._active
        if name in order:
            return order[(order.index(name) + 1) % len(order)]
        return order[0]

    def run(self, variants: dict[str, Callable[[Tick, Timer], None]]) -> dict[str, float]:
        """Train every variant once, interleaved; returns each one's timed wall seconds."""
        spent = {name: 0.0 for name in variants}
        errors: list[BaseException] = []
        self._active = list(variants)
        self._turn = self._active[0]

        def worker(name: str, fn: Callable[[Tick, Timer], None]) -> None:
            held_since: list[float | None] = [None]  # start of the current timed stretch

            def wait_turn() -> None:
                with self._cv:
                    self._cv.wait_for(lambda: self._turn == name)

            def pass_turn(finished: bool) -> None:
                with self._cv:
                    if finished:
                        self._active.remove(name)
                    self._turn = self._next_after(name)
                    self._cv.notify_all()

            def pause_clock() -> None:
                if held_since[0] is not None:
                    spent[name] += time.perf_counter() - held_since[0]

            def resume_clock() -> None:
                if held_since[0] is not None:
                    held_since[0] = time.perf_counter()

            count = [0]

            def tick() -> None:
                count[0] += 1
                if count[0] % self.slice:
                    return
                pause_clock()
                pass_turn(False)
                wait_turn()
                resume_clock()

            timer = Timer()
            timer.start = lambda: held_since.__setitem__(0, time.perf_counter())

            def stop() -> None:
                pause_clock()
                held_since[0] = None

            timer.stop = stop
            wait_turn()
            try:
                fn(tick, timer)
            except BaseException as exc:  # reported after every thread is done
                errors.append(exc)
            finally:
                pass_turn(True)

        threads = [threading.Thread(target=worker, args=(name, fn), name=f"bench-{name}") for name, fn in variants.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return spent


def settle() -> None:
    """Collect garbage, then freeze what exists, before each run.

    A full collection scans every object alive; after `import torch` (and Lightning) that takes
    up to ~120 ms here and fires at moments that depend on allocation counts, landing in one
    variant or the other at random. Frozen objects are skipped by the collector, so collections
    during the timed part only scan what the training itself allocates, in every variant alike.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def sequential(variants: dict[str, Callable[[Tick, Timer], None]]) -> dict[str, float]:
    """Each variant trained alone, back to back in ABBA order; the mean of its two times."""
    names = list(variants)
    spent = {name: 0.0 for name in names}
    for name in names + names[::-1]:
        box: list[float] = [0.0]
        timer = Timer()
        timer.start = lambda: box.__setitem__(0, time.perf_counter())
        timer.stop = lambda: box.__setitem__(0, time.perf_counter() - box[0])
        variants[name](lambda: None, timer)
        spent[name] += box[0] / 2
    return spent


class Comparison:
    def __init__(self, title: str, variants: dict[str, Callable[[Tick, Timer], None]], target: tuple[str, float]) -> None:
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


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


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
    measure: Callable[[dict[str, Callable[[Tick, Timer], None]]], dict[str, float]]
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
