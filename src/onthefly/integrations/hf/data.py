"""The Trainer's training batches, drawn from the session: its train loader, positioned where the run is.

The HF `Trainer` iterates an Accelerate `DataLoaderShard` that wraps a plain torch `DataLoader`
(`shard.base_dataloader`) and adds device placement. onthefly keeps the shard and puts
`SessionBatches` in its `base_dataloader` place: every epoch iterator the Trainer opens is then
the session's (`open_epoch_iterator` over the session's train loader, at the run's epoch and
batch), so the one train-data path of `mixins/data.py` serves HF too — a fork's subset, a merge,
a reset, a checkpoint load mid-epoch (also in a fresh process) all reach HF's loop without a
second re-pointing path. Nothing else of the shard changes: batches still go to the device the
Trainer trains on.

`plain_loader` gives the session its train loader: a `DataLoader` equal to the shard's (same
dataset, sampler, batch size, collator, workers), written with `batch_size`/`sampler` so the
session can clone it over a `Subset`. Accelerate's seeded sampler advances its own epoch each
time it is iterated, so two reads of the training set (a loss scan and an embedding scan) would
see different orders; it is kept, inside `StableEpochSampler`, which leaves the epoch as it was.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from ...sampler_utils import common_loader_kwargs

if TYPE_CHECKING:
    from ...session.external import OnTheFlyExternalSession


def base_loader_of(loader: Any) -> Any:
    """The torch loader inside an Accelerate-prepared loader (the loader itself if it is not wrapped)."""
    seen = 0
    while hasattr(type(loader), "__getattr__") and "base_dataloader" in vars(loader) and seen < 8:
        loader = vars(loader)["base_dataloader"]
        seen += 1
    return loader


def plain_loader(loader: Any) -> Any:
    """A `DataLoader` drawing exactly the batches `loader` draws, built from batch_size and sampler.

    Accelerate builds its inner loader with `batch_sampler=BatchSampler(sampler, ...)`, which a
    session cannot narrow to a subset; the equivalent loader with the same sampler object can be.
    Loaders whose batch sampler is anything but a plain `BatchSampler` (e.g. sharded across
    processes) are returned as they are.
    """
    base = base_loader_of(loader)
    if not isinstance(base, DataLoader) or isinstance(base, SessionBatches):
        return base
    batches = base.batch_sampler
    if base.batch_size is not None or type(batches) is not BatchSampler:
        return base
    kwargs = common_loader_kwargs(base, base.worker_init_fn)
    kwargs["generator"] = base.generator
    sampler = batches.sampler
    if isinstance(sampler, RandomSampler) and callable(getattr(sampler, "set_epoch", None)) and hasattr(sampler, "epoch"):
        sampler = StableEpochSampler(sampler)
    return DataLoader(base.dataset, batch_size=batches.batch_size, sampler=sampler,
                      drop_last=batches.drop_last, **kwargs)


class StableEpochSampler(RandomSampler):
    """An epoch-seeded random sampler (Accelerate's) whose iteration leaves its epoch unchanged.

    The order is the wrapped sampler's own for the epoch set with `set_epoch` (the loops set it
    before every epoch); reading it again gives the same order.
    """

    def __init__(self, inner: RandomSampler) -> None:
        super().__init__(inner.data_source, replacement=inner.replacement, num_samples=inner.num_samples,
                         generator=inner.generator)
        self.inner = inner

    @property
    def epoch(self) -> int:
        return int(self.inner.epoch)

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        epoch = self.inner.epoch
        order = list(self.inner)  # the wrapped sampler draws its whole permutation at once anyway
        self.inner.set_epoch(epoch)
        return iter(order)


class SessionBatches(DataLoader):
    """Stands in the Trainer's `DataLoaderShard` for the loader it wraps: each epoch comes from the session.

    A `DataLoader` by type only (so `isinstance` checks on the shard keep passing; torch's own
    `__init__` is not run): every attribute the shard or the Trainer reads (`dataset`,
    `batch_sampler`, `sampler`, `batch_size`, ...) is the session train loader's, and `len()` is
    its length.
    """

    def __init__(self, session: OnTheFlyExternalSession) -> None:  # noqa: D107 (no DataLoader.__init__)
        object.__setattr__(self, "session", session)

    @property
    def current(self) -> Any:
        """The loader the session trains on now."""
        loader = self.session.train_loader
        if loader is None:
            raise RuntimeError("the onthefly session has no train loader (the Trainer has not started training)")
        return loader

    def __getattr__(self, name: str) -> Any:
        if name == "session":
            raise AttributeError(name)
        return getattr(self.current, name)

    def __len__(self) -> int:
        return len(self.current)

    def __iter__(self) -> Iterator[Any]:
        """The session's batches for the epoch the run is in, after the batches it already trained on."""
        session = self.session
        if not session.state.running:
            return iter(())  # a stop before the epoch began: the Trainer gets no batch to train on
        state = session.state
        return session.open_epoch_iterator(self.current, state.epoch, state.batch_in_epoch)

    def __repr__(self) -> str:
        return f"SessionBatches({type(self.session.train_loader).__name__})"
