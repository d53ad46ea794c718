"""The Trainer's own progress (`TrainerState`) as onthefly stores it in checkpoints, and putting it back.

Only the fields that say *where* the run is and what it has seen are restored (the step, the
fractional epoch, the log history, the best metric, the token and FLOP counts, and — when the
Trainer's `restore_callback_states_from_checkpoint` asks for it, as in HF's own resume — the
state of stateful callbacks such as early stopping). Fields that describe the current
configuration (max_steps, logging/eval/save steps, batch size, process ranks) stay as the live
Trainer set them.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from transformers import Trainer, TrainerControl
from transformers.trainer_callback import ExportableState

PROGRESS_FIELDS = ("epoch", "global_step", "num_input_tokens_seen", "total_flos", "log_history", "best_metric",
                   "best_global_step", "best_model_checkpoint")


def stateful_callbacks(trainer: Trainer) -> list[Any]:
    """The Trainer's callbacks that export state (HF's rule: `ExportableState`), its control included."""
    return [cb for cb in [*trainer.callback_handler.callbacks, trainer.control] if isinstance(cb, ExportableState)]


def trainer_state_document(trainer: Trainer) -> dict[str, Any]:
    """`trainer.state` as HF writes it to `trainer_state.json`, with the callbacks' current states."""
    states: dict[str, Any] = {}
    for callback in stateful_callbacks(trainer):
        name = type(callback).__name__
        exported = callback.state()
        if name in states:
            previous = states[name]
            states[name] = [*previous, exported] if isinstance(previous, list) else [previous, exported]
        else:
            states[name] = exported
    document = dataclasses.asdict(trainer.state)
    document["stateful_callbacks"] = states
    return document


def trainer_state_json(trainer: Trainer) -> str:
    """`trainer_state_document` as JSON text (what onthefly checkpoints store: a plain string)."""
    return json.dumps(trainer_state_document(trainer), sort_keys=True)


def restore_progress(trainer: Trainer, document: dict[str, Any]) -> None:
    """Put a saved `TrainerState`'s progress into the live `trainer.state` (see the module docstring)."""
    state = trainer.state
    for name in PROGRESS_FIELDS:
        if name in document:
            value = document[name]
            setattr(state, name, list(value) if name == "log_history" else value)
    state.global_step = int(state.global_step)
    if not getattr(trainer.args, "restore_callback_states_from_checkpoint", False):
        return
    saved = document.get("stateful_callbacks") or {}
    for callback in stateful_callbacks(trainer):
        if isinstance(callback, TrainerControl):
            continue  # the control flags belong to the moment, not to the checkpoint
        entries = saved.get(type(callback).__name__)
        if entries is None:
            continue
        same_kind = [cb for cb in stateful_callbacks(trainer) if type(cb) is type(callback)]
        entries = entries if isinstance(entries, list) else [entries]
        entry = entries[same_kind.index(callback)] if same_kind.index(callback) < len(entries) else None
        for attribute, value in ((entry or {}).get("attributes") or {}).items():
            setattr(callback, attribute, value)
