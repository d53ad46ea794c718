"""HFDelegate: the session's requests translated into the Hugging Face `Trainer`.

Stop is HF's own `control.should_training_stop`; a test is `trainer.evaluate` on the test set;
the native checkpoint is HF's checkpoint folder (weights, optimizer, scheduler, RNG,
`trainer_state.json`: `trainer.train(resume_from_checkpoint=folder)` resumes from it); the
Trainer's batches come from the session (see `data.py`), so a new train loader or a checkpoint
load reaches HF's loop through the session's one data path, and HF's `TrainerState` follows the
run's position.
"""

from __future__ import annotations

import json
import math
import os
import random
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import Trainer

from ...checkpoints import CheckpointError, fsync_directory
from ...control.errors import CommandError, ErrorCode
from ...session.delegate import FrameworkDelegate, TestOutcome
from .data import SessionBatches, plain_loader
from .state import restore_progress, trainer_state_json

if TYPE_CHECKING:
    from .callback import HFCallback
    from .session import HFSession

#: File names inside an HF checkpoint folder (as `Trainer._save_checkpoint` writes them).
TRAINER_STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
SCALER_FILE = "scaler.pt"
RNG_FILE = "rng_state.pth"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CONTROL_FLAGS = ("should_training_stop", "should_epoch_stop", "should_save", "should_evaluate", "should_log")


def inner_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside Accelerate's `AcceleratedOptimizer` (the optimizer itself otherwise)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


class HFDelegate(FrameworkDelegate):
    """Translates session requests into the HF `Trainer`: stop, test, checkpoints, data, its state."""

    runtime = "hf"
    native_folders = True
    session: HFSession | None

    def __init__(self, trainer: Trainer, callback: HFCallback, *, test_dataset: Any = None,
                 native_checkpoints: bool = False) -> None:
        if not isinstance(trainer, Trainer):
            raise TypeError(f"attach_hf needs a transformers.Trainer, got {type(trainer).__module__}."
                            f"{type(trainer).__qualname__}")
        self.trainer = trainer
        self.callback = callback
        self.test_dataset = test_dataset
        self.native_checkpoints = native_checkpoints
        #: The Trainer's train `DataLoaderShard` once training began (None: HF iterates its own loader).
        self.shard: Any = None
        self._measured: tuple[Any, int | None] = (None, None)  # (loader, its length), asked every step
        #: A test (`trainer.evaluate` on the test set) is running, and the batches it has scored.
        self.testing = False
        self.test_batches = 0
        #: (checkpoint or bundle, run) to continue from, loaded before the first batch.
        self.pending_resume: tuple[Any, str | None] | None = None

    # ---- attach ----------------------------------------------------------------------------
    def attach(self, session: HFSession) -> None:
        """Add the callback to the Trainer (last, so HF's own flow callback decides before it)."""
        super().attach(session)
        if not any(cb is self.callback for cb in self.trainer.callback_handler.callbacks):
            self.trainer.add_callback(self.callback)

    def install_data(self, train_dataloader: Any) -> None:
        """At the start of training: the session's train loader, and the Trainer's batches drawn from it."""
        session = self.session
        if session.train_root_loader is None:
            session.configure_loaders(train_loader=plain_loader(train_dataloader))
        if train_dataloader is not None and "base_dataloader" in getattr(train_dataloader, "__dict__", {}):
            train_dataloader.base_dataloader = SessionBatches(session)
            session.session_positions_data = True
            self.shard = train_dataloader
        else:
            self.shard = None
            session.session_positions_data = False
            session.log(f"[data] the Trainer's train dataloader is a {type(train_dataloader).__name__}, not an "
                        "Accelerate DataLoaderShard: HF keeps its own data order, and forks cannot switch it",
                        level="warn")

    # ---- stop --------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """HF's way: `control.should_training_stop`; the Trainer ends after this step."""
        self.trainer.control.should_training_stop = True

    # ---- loop settings -----------------------------------------------------------------------
    def loop_settings(self) -> dict[str, Any]:
        """HF clips with `args.max_grad_norm` (read at every optimizer step); 0 or None: no clipping."""
        norm = getattr(self.trainer.args, "max_grad_norm", None)
        return {"grad_clip_norm": float(norm) if norm else None}

    def apply_loop_settings(self, changes: dict[str, Any]) -> None:
        if "grad_clip_norm" in changes:
            self.trainer.args.max_grad_norm = float(changes["grad_clip_norm"] or 0.0)

    # ---- data --------------------------------------------------------------------------------
    def data_edit_timing(self) -> str | None:
        """From HF's next epoch while it draws its batches from the session; never from a loader of its own.

        Not at once: ending HF's epoch early would use up one of its `num_train_epochs`.
        """
        return "next_epoch" if self.shard is not None else None

    def refresh_train_loader(self, loader: Any) -> None:
        """HF's next epoch iterator comes from `loader` (`SessionBatches` reads the session's loader).

        A command that also moves the run (fork, merge, load) ends HF's current epoch at this
        boundary (see `HFCallback.on_step_end`); a data edit alone waits for HF's next epoch.
        """
        if self.shard is None:
            raise CommandError("the Trainer's train dataloader is not an Accelerate DataLoaderShard, so onthefly "
                               "cannot switch the data it trains on", ErrorCode.FAILED)

    def eval_loader(self) -> Any:
        """A plain loader over the Trainer's eval set, with its batch size and collator (for val reports)."""
        return plain_loader(self.trainer.get_eval_dataloader())

    def epoch_length(self) -> int | None:
        """Batches in one epoch of the session's train loader (None: it has no length)."""
        loader = self.session.train_loader if self.session is not None else None
        if loader is not self._measured[0]:
            try:
                length = len(loader) if loader is not None else None
            except TypeError:
                length = None
            self._measured = (loader, length)
        return self._measured[1]

    # ---- tests -------------------------------------------------------------------------------
    def has_own_test(self) -> bool:
        return self.test_dataset is not None

    def reports_validation(self) -> bool:
        args = self.trainer.args
        return self.trainer.eval_dataset is not None and str(getattr(args.eval_strategy, "value", args.eval_strategy)) != "no"

    def run_test(self, label: str) -> TestOutcome | None:
        """`trainer.evaluate` on the test set (metrics prefixed `test_`); None without a test set.

        HF's control flags are put back afterwards: `evaluate` clears `should_evaluate`/`should_log`,
        which must not cancel an evaluation or a log HF planned for this step.
        """
        if self.test_dataset is None:
            return None
        trainer = self.trainer
        flags = {name: getattr(trainer.control, name) for name in CONTROL_FLAGS}
        self.testing, self.test_batches = True, 0
        try:
            metrics = trainer.evaluate(eval_dataset=self.test_dataset, metric_key_prefix="test")
        finally:
            self.testing = False
            for name, value in flags.items():
                setattr(trainer.control, name, value)
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return TestOutcome(numbers.get("test_loss"), numbers)

    # ---- HF's checkpoint folder --------------------------------------------------------------
    def save_native_checkpoint(self, path: Path) -> Path | None:
        """HF's checkpoint folder beside `path` (named like it, without the suffix), written atomically.

        The folder holds what `Trainer._save_checkpoint` writes (weights through `save_model`,
        optimizer, scheduler, scaler, RNG, `trainer_state.json`), so HF itself resumes from it.
        """
        if not self.native_checkpoints:
            return None
        trainer = self.trainer
        folder = Path(path).with_suffix("")
        folder.parent.mkdir(parents=True, exist_ok=True)
        temp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        temp.mkdir()
        try:
            trainer.save_model(str(temp), _internal_call=True)  # internal: never pushes to the Hub
            torch.save(trainer.optimizer.state_dict(), temp / OPTIMIZER_FILE)
            if trainer.lr_scheduler is not None:
                torch.save(trainer.lr_scheduler.state_dict(), temp / SCHEDULER_FILE)
            scaler = getattr(trainer.accelerator, "scaler", None)
            if scaler is not None:
                torch.save(scaler.state_dict(), temp / SCALER_FILE)
            torch.save(hf_rng_state(), temp / RNG_FILE)
            (temp / TRAINER_STATE_FILE).write_text(json.dumps(json.loads(trainer_state_json(trainer)), indent=2))
            for file in temp.rglob("*"):
                if file.is_file():
                    with open(file, "rb+") as fh:
                        os.fsync(fh.fileno())
            fsync_directory(temp)
            if folder.exists():
                shutil.rmtree(folder)  # an earlier save of the same step
            os.replace(temp, folder)
            fsync_directory(folder.parent)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        return folder

    def load_native_checkpoint(self, path: Path, document: dict[str, Any]) -> dict[str, Any] | None:
        """Load an HF checkpoint folder into the live objects: weights, optimizer, scheduler, scaler, progress.

        The session's position becomes the folder's (`trainer_state.json`: step and fractional
        epoch); once the caller requests a reposition, the batches come from that epoch, after the
        ones trained on. RNG states are not restored (as for Lightning's native checkpoints).
        """
        folder = Path(path)
        state_file = folder / TRAINER_STATE_FILE
        if not folder.is_dir() or not state_file.is_file():
            raise CheckpointError(path, f"is not a Hugging Face checkpoint folder (no {TRAINER_STATE_FILE})")
        trainer, session = self.trainer, self.session
        load_weights(trainer.model, folder)
        try:
            optimizer = inner_optimizer(trainer.optimizer)
            if (folder / OPTIMIZER_FILE).is_file() and optimizer is not None:
                optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, weights_only=True))
            if (folder / SCHEDULER_FILE).is_file() and trainer.lr_scheduler is not None:
                trainer.lr_scheduler.load_state_dict(torch.load(folder / SCHEDULER_FILE, weights_only=True))
            scaler = getattr(trainer.accelerator, "scaler", None)
            if (folder / SCALER_FILE).is_file() and scaler is not None:
                scaler.load_state_dict(torch.load(folder / SCALER_FILE, weights_only=True))
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(path, f"optimizer/scheduler state does not fit: {exc}") from exc
        try:
            saved = json.loads(state_file.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(path, f"{TRAINER_STATE_FILE} is unreadable: {exc}") from exc
        restore_progress(trainer, saved)
        self.callback.forget_logged_loss(trainer)
        step = int(trainer.state.global_step)
        epoch, batch = self.position_of(float(trainer.state.epoch or 0.0))
        if session is not None:
            session.align_with_framework(step, epoch, batch)
        return {"path": str(folder), "step": step, "epoch": epoch, "last_val_loss": None}

    def position_of(self, fractional_epoch: float) -> tuple[int, int]:
        """(epoch, batches into it) of HF's fractional epoch `e + batches / batches_per_epoch`."""
        epoch = int(math.floor(fractional_epoch + 1e-9))
        length = self.epoch_length()
        batch = int(round((fractional_epoch - epoch) * length)) if length else 0
        if length and batch >= length:
            epoch, batch = epoch + 1, 0
        return epoch, batch

    # ---- HF's loop position in onthefly checkpoints ------------------------------------------
    def capture_state(self) -> dict[str, Any] | None:
        """HF's `TrainerState` (as JSON text) and the accumulation the position counts in."""
        if not self.callback.training:
            return None
        return {"trainer_state": trainer_state_json(self.trainer),
                "gradient_accumulation_steps": int(self.trainer.args.gradient_accumulation_steps)}

    def restore_state(self, state: dict[str, Any] | None, document: dict[str, Any]) -> None:
        """Bring HF's `TrainerState` to the checkpoint's position (the session's data path moves the batches).

        Without HF state in the checkpoint (saved by another runtime) only weights and optimizers
        move; HF's step counter then stays and the session counts from the checkpoint's step.
        """
        session, trainer = self.session, self.trainer
        if session is None or state is None or not self.callback.training:
            return
        try:
            saved = json.loads(state["trainer_state"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError("checkpoint", f"holds no readable Hugging Face trainer state: {exc}") from exc
        accumulation = state.get("gradient_accumulation_steps")
        if accumulation is not None and int(accumulation) != int(trainer.args.gradient_accumulation_steps):
            session.log(f"[resume] the checkpoint was trained with gradient_accumulation_steps={accumulation}, "
                        f"this Trainer uses {trainer.args.gradient_accumulation_steps}", level="warn")
        if self.shard is None:
            session.log("[resume] HF iterates its own train loader here: weights and optimizer are restored, "
                        "the data order is not", level="warn")
        restore_progress(trainer, saved)
        self.callback.forget_logged_loss(trainer)
        session.align_with_framework(trainer.state.global_step, session.state.epoch, session.state.batch_in_epoch)


def hf_rng_state() -> dict[str, Any]:
    """Every RNG's state, under the keys HF's `rng_state.pth` uses."""
    states: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                              "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.random.get_rng_state()
    return states


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load a folder's weights (safetensors or a `.bin`, not sharded) into `model`; tied weights may be absent."""
    file = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if file is None:
        raise CheckpointError(folder, f"holds no weights file ({' or '.join(WEIGHT_FILES)}; sharded weights "
                                      "are not supported here)")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        weights = load_file(str(file))
    else:
        weights = torch.load(file, weights_only=True)
    result = model.load_state_dict(weights, strict=False)
    loaded = {p.data_ptr() for name, p in model.state_dict().items() if name in weights}
    missing = [k for k in result.missing_keys if model.state_dict()[k].data_ptr() not in loaded]
    if missing or result.unexpected_keys:
        raise CheckpointError(folder, f"weights do not fit this model (missing {missing[:5]}, unexpected "
                                      f"{list(result.unexpected_keys)[:5]})")
