"""The same small problem run four ways — native Trainer, an own loop (`attach`), Lightning, and the
Hugging Face Trainer (`attach_hf`) — each connected over loopback TCP to a test dashboard, so one
suite can drive all of them alike.

The training set is a `random_split` part of a bigger dataset (so dataset indices are not
0..n-1), training runs on a background thread, and every runtime is configured to keep going
until the dashboard stops it.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset, default_collate, random_split

import onthefly

WAIT = 30.0
N_TOTAL, N_TRAIN, N_VAL, N_TEST = 200, 160, 20, 20
BATCH = 16


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Net(nn.Module):
    """An MLP with a residual adapter layer (so adapter merges have something to merge)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 32)
        self.drop = nn.Dropout(0.1)
        self.adapter = nn.Linear(32, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.relu(self.body(x)))
        return self.head(h + self.adapter(h))


def make_net() -> nn.Module:
    return Net()


@dataclass
class Problem:
    """Data and model of the shared problem; `train_indices` are the training split's dataset indices."""

    train: Any
    val: Any
    test: Any
    train_loader: DataLoader
    val_loader: DataLoader
    test_loader: DataLoader
    train_indices: list[int] = field(default_factory=list)


class SlowCollate:
    """default_collate after a short sleep: a run slow enough to be paused mid-epoch (numerics unchanged)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def __call__(self, items: list[Any]) -> Any:
        time.sleep(self.delay)
        return default_collate(items)


def problem_dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(N_TOTAL, 8, generator=g)
    w = torch.randn(8, 3, generator=g)
    y = (x @ w).argmax(dim=1)
    return TensorDataset(x, y)


def split(full: Any) -> list[Any]:
    """Train, val and test parts of `full` (the same indices for any dataset of N_TOTAL samples)."""
    return random_split(full, [N_TRAIN, N_VAL, N_TEST], generator=torch.Generator().manual_seed(7))


def make_problem(seed: int = 0, *, workers: int = 0, delay: float = 0.0) -> Problem:
    train, val, test = split(problem_dataset())
    loader_gen = torch.Generator().manual_seed(seed)
    return Problem(
        train, val, test,
        DataLoader(train, batch_size=BATCH, shuffle=True, num_workers=workers, generator=loader_gen,
                   collate_fn=SlowCollate(delay) if delay else None),
        DataLoader(val, batch_size=BATCH),
        DataLoader(test, batch_size=BATCH),
        sorted(int(i) for i in train.indices),
    )


def evaluate(model: nn.Module, loader: DataLoader) -> float:
    was = model.training
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            total += float(F.cross_entropy(model(x), y, reduction="sum"))
            n += len(y)
    model.train(was)
    return total / max(n, 1)


class Run:
    """One training run on a background thread; `session` is its onthefly session once it exists."""

    def __init__(self, name: str, target: Callable[["Run"], None]) -> None:
        self.name = name
        self.session: Any = None
        self.model: nn.Module | None = None
        self.initial: dict[str, torch.Tensor] = {}  # the model's weights before training
        self.error: BaseException | None = None
        self.created = threading.Event()
        self.result: Any = None
        self.expected_error: type[BaseException] | None = None

        def main() -> None:
            try:
                target(self)
            except BaseException as exc:  # surfaced by join()
                self.error = exc
            finally:
                self.created.set()

        self.thread = threading.Thread(target=main, name=f"train-{name}", daemon=True)

    def start(self) -> "Run":
        self.thread.start()
        if not self.created.wait(WAIT):
            raise TimeoutError(f"{self.name}: the session was not created")
        if self.session is None and self.error is not None:
            raise self.error
        return self

    def join(self, timeout: float = WAIT, *, expect_error: type[BaseException] | None = None) -> None:
        if expect_error is not None:
            self.expected_error = expect_error
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError(f"{self.name}: training did not end within {timeout} s")
        expected = self.expected_error
        if self.error is not None and not (expected and isinstance(self.error, expected)):
            raise self.error
        if self.session is not None:
            self.session.close()


def session_settings(port: int, tmp_path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    base = dict(project="conformance", run_name="baseline", dashboard_port=port, transport="tcp",
                save_dir=str(tmp_path / "store"), allowed_paths=(str(tmp_path),), log_every_n_steps=1)
    base.update(settings)
    return base


# ---- the three runtimes ------------------------------------------------------------------------
def trainer_run(port: int, tmp_path: Path, *, epochs: int = 1000, seed: int = 0, delay: float = 0.0,
                resume_from: Any = None,
                resume_run: str | None = None, **settings: Any) -> Run:
    def target(run: Run) -> None:
        seed_all(seed)
        problem = make_problem(seed, delay=delay)
        model = make_net()
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        options = session_settings(port, tmp_path, settings)
        trainer = onthefly.Trainer(max_epochs=epochs, **options)
        run.session, run.model, run.initial = trainer.session, model, weights(model)
        run.created.set()
        run.result = trainer.fit(model, opt, nn.CrossEntropyLoss(), problem.train_loader, problem.val_loader,
                                 problem.test_loader, seed=seed, progress=False, resume_from=resume_from,
                                 resume_run=resume_run)

    return Run("trainer", target)


def own_loop_run(port: int, tmp_path: Path, *, epochs: int = 1000, seed: int = 0, delay: float = 0.0,
                resume_from: Any = None,
                 resume_run: str | None = None, **settings: Any) -> Run:
    def target(run: Run) -> None:
        seed_all(seed)
        problem = make_problem(seed, delay=delay)
        model = make_net()
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        options = session_settings(port, tmp_path, settings)
        session = onthefly.attach(model=model, optimizer=opt, loss_fn=nn.CrossEntropyLoss(),
                                  train_loader=problem.train_loader, val_loader=problem.val_loader,
                                  test_loader=problem.test_loader, resume_from=resume_from,
                                  resume_run=resume_run, **options)
        run.session, run.model, run.initial = session, model, weights(model)
        run.created.set()
        with session:
            for _ in session.epochs(epochs):
                for x, y in session.batches():
                    opt.zero_grad()
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                    opt.step()
                    if not session.step(loss):
                        break
                session.end_epoch(val_loss=evaluate(model, problem.val_loader))

    return Run("own_loop", target)


def lightning_run(port: int, tmp_path: Path, *, epochs: int = 1000, seed: int = 0, delay: float = 0.0,
                resume_from: Any = None,
                  resume_run: str | None = None, **settings: Any) -> Run:
    import lightning.pytorch as pl

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", F.cross_entropy(self(x), y))

        def test_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("test_loss", F.cross_entropy(self(x), y))

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=0.01)

    def target(run: Run) -> None:
        pl.seed_everything(seed, verbose=False)
        problem = make_problem(seed, delay=delay)
        module = Lit()
        trainer = pl.Trainer(max_epochs=epochs, deterministic=True, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                             num_sanity_val_steps=0, default_root_dir=str(tmp_path / "lightning"))
        options = session_settings(port, tmp_path, settings)
        session = onthefly.attach_lightning(trainer=trainer, model=module, loss_fn=nn.CrossEntropyLoss(),
                                            test_loader=problem.test_loader, resume_from=resume_from,
                                  resume_run=resume_run, **options)
        run.session, run.model, run.initial = session, module, weights(module)
        run.created.set()
        trainer.fit(module, problem.train_loader, problem.val_loader)

    return Run("lightning", target)


class Named(torch.utils.data.Dataset):
    """The problem's `(x, y)` samples as the dicts a Hugging Face Trainer feeds a model: `{"x", "labels"}`."""

    def __init__(self, base: TensorDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self.base[i]
        return {"x": x, "labels": y}


def hf_run(port: int, tmp_path: Path, *, epochs: int = 1000, seed: int = 0, delay: float = 0.0,
           resume_from: Any = None, resume_run: str | None = None, **settings: Any) -> Run:
    import transformers
    from transformers.modeling_outputs import SequenceClassifierOutput

    class HFNet(nn.Module):
        """The problem's net as HF models are called: keyword inputs, a `ModelOutput` with loss and logits."""

        def __init__(self) -> None:
            super().__init__()
            self.net = make_net()

        def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
            logits = self.net(x)
            loss = None if labels is None else F.cross_entropy(logits, labels)
            return SequenceClassifierOutput(loss=loss, logits=logits)

    def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if delay:
            time.sleep(delay)
        return transformers.default_data_collator(items)

    def target(run: Run) -> None:
        transformers.logging.set_verbosity_error()
        seed_all(seed)
        train, val, test = split(Named(problem_dataset()))
        model = HFNet()
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / "hf"), per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH,
            num_train_epochs=epochs, lr_scheduler_type="constant", eval_strategy="epoch", save_strategy="no",
            logging_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=seed)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                                       data_collator=collate,
                                       optimizers=(torch.optim.Adam(model.parameters(), lr=0.01), None))
        options = session_settings(port, tmp_path, settings)
        session = onthefly.attach_hf(trainer, test_dataset=test, resume_from=resume_from, resume_run=resume_run,
                                     **options)
        run.session, run.model, run.initial = session, model, weights(model)
        run.created.set()
        trainer.train()

    return Run("hf", target)


RUNTIMES: dict[str, Callable[..., Run]] = {
    "trainer": trainer_run,
    "own_loop": own_loop_run,
    "lightning": lightning_run,
    "hf": hf_run,
}


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
