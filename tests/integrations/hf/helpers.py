"""Tiny Hugging Face setups for the HF tests: models built from config, integer datasets, a trigger callback.

Nothing is downloaded: models come from `GPT2Config`/`BertConfig` with two layers of 32 units,
datasets are random integer sequences (no tokenizer), and the Trainer runs on the CPU with no
reporting, no saving and no progress bar.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

transformers.logging.set_verbosity_error()

VOCAB = 48
PAD = 0
SEQ = 12


class Sequences(torch.utils.data.Dataset):
    """Integer token sequences of different lengths, right-padded: input_ids, attention_mask, labels.

    Labels are the tokens themselves (the model shifts them), -100 on padding and, with `prompt`,
    on the first `prompt` tokens as well.
    """

    def __init__(self, n: int = 48, seed: int = 1, prompt: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.lengths = torch.randint(4, SEQ + 1, (n,), generator=g)
        self.ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
        positions = torch.arange(SEQ).expand(n, SEQ)
        real = positions < self.lengths[:, None]
        self.ids[~real] = PAD
        self.mask = real.long()
        self.labels = self.ids.clone()
        self.labels[~real] = -100
        if prompt:
            self.labels[:, :prompt] = -100

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQ, bos_token_id=1,
                        eos_token_id=1, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    return GPT2LMHeadModel(config)


def hf_args(tmp_path: Path, **overrides: Any) -> TrainingArguments:
    options: dict[str, Any] = dict(output_dir=str(tmp_path / "hf-out"), per_device_train_batch_size=4,
                                   per_device_eval_batch_size=8, num_train_epochs=2, learning_rate=5e-3,
                                   report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                                   disable_tqdm=True, seed=3)
    options.update(overrides)
    return TrainingArguments(**options)


def make_trainer(tmp_path: Path, *, callbacks: list[TrainerCallback] | None = None, n: int = 48,
                 eval_n: int = 0, **overrides: Any) -> Trainer:
    model = tiny_gpt2()
    return Trainer(model=model, args=hf_args(tmp_path, **overrides), train_dataset=Sequences(n),
                   eval_dataset=Sequences(eval_n, seed=9) if eval_n else None, callbacks=callbacks or [])


def session_options(tmp_path: Path, server: Any = None, **settings: Any) -> dict[str, Any]:
    options: dict[str, Any] = dict(project="hf", save_dir=str(tmp_path / "store"), log_every_n_steps=1,
                                   allowed_paths=(str(tmp_path),))
    if server is None:
        options["transport"] = "off"
    else:
        options.update(transport="tcp", dashboard_port=server.port)
    options.update(settings)
    return options


class AtStep(TrainerCallback):
    """Runs `action(trainer_state)` once, at the end of optimizer step `step` (before onthefly's boundary)."""

    def __init__(self, step: int, action: Callable[[Any], None]) -> None:
        self.step = step
        self.action = action
        self.done = False

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.done and state.global_step == self.step:
            self.done = True
            self.action(state)
