"""The interleaved timing harness the overhead benchmarks share.

On a shared virtual machine the CPU's speed drifts by 10-30% over seconds, so two trainings run one
after the other differ by more than the few percent a benchmark wants to see. `Interleaved` runs
the variants of a comparison in threads, one at a time, passing the turn every few batches, so
all of them see the same machine speed; a variant's time is the wall time it held the turn.
`sequential` is the usual back-to-back (ABBA) method, for comparison.
"""

from __future__ import annotations

import gc
import statistics
import threading
import time
from typing import Any, Callable, Iterator

from torch.utils.data import DataLoader

Tick = Callable[[], None]


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


class Timer:
    """Marks where a variant's timed part starts and ends; the harness fills it in."""

    start: Callable[[], None]
    stop: Callable[[], None]


Variant = Callable[[Tick, Timer], None]  # trains once, calling tick() at every batch boundary


class Interleaved:
    """Runs variants in threads, one at a time, passing the turn on every `slice_batches` batches."""

    def __init__(self, slice_batches: int, on_turn: Callable[[], None] | None = None) -> None:
        self.slice = slice_batches
        self.on_turn = on_turn  # runs, untimed, whenever a variant takes the turn inside its training
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

    def run(self, variants: dict[str, Variant]) -> dict[str, float]:
        """Train every variant once, interleaved; returns each one's timed wall seconds."""
        spent = {name: 0.0 for name in variants}
        errors: list[BaseException] = []
        self._active = list(variants)
        self._turn = self._active[0]

        def worker(name: str, fn: Variant) -> None:
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
                if self.on_turn is not None:
                    self.on_turn()
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


def sequential(variants: dict[str, Variant]) -> dict[str, float]:
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


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3
