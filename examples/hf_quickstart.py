"""A Hugging Face causal LM steered from a dashboard: `transformers.Trainer` or an Accelerate loop.

Run it with a dashboard listening (e.g. `onthefly listen` in another terminal, or the VS Code
extension). Nothing is downloaded: the model is a two-layer GPT-2 built from its config, and the
"language" is integer sequences that count up with a per-sequence stride (padded to one length,
padding labelled -100), which the model learns within a few epochs.

    python examples/hf_quickstart.py [--runtime trainer|accelerate] [--epochs 3] [--samples 2048]

With the Trainer, "Test now" runs `trainer.evaluate` on the test set; reports score each
sequence by the mean loss over its real tokens; pause, save and stop act between two optimizer
steps (after the whole gradient accumulation).
"""

from __future__ import annotations

import argparse

import torch

import onthefly

VOCAB, LENGTH, PAD = 32, 16, 0


class Counting(torch.utils.data.Dataset):
    """Sequences `start, start + stride, ...` (mod the vocabulary, skipping the pad id), of 6..16 tokens."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(1, VOCAB, (n, 1), generator=g)
        stride = torch.randint(1, 4, (n, 1), generator=g)
        steps = torch.arange(LENGTH).expand(n, LENGTH)
        self.ids = (start - 1 + stride * steps) % (VOCAB - 1) + 1
        lengths = torch.randint(6, LENGTH + 1, (n, 1), generator=g)
        real = steps < lengths
        self.ids[~real] = PAD
        self.mask = real.long()
        self.labels = self.ids.masked_fill(~real, -100)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def tiny_gpt2():  # type: ignore[no-untyped-def]
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=LENGTH,
                                      bos_token_id=1, eos_token_id=1))


def with_trainer(args: argparse.Namespace) -> dict[str, float]:
    import transformers

    transformers.logging.set_verbosity_error()
    model = tiny_gpt2()
    training = transformers.TrainingArguments(
        output_dir=args.output_dir, num_train_epochs=args.epochs, per_device_train_batch_size=16,
        gradient_accumulation_steps=2, learning_rate=3e-3, eval_strategy="epoch", save_strategy="no",
        logging_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=training, train_dataset=Counting(args.samples, seed=1),
                                   eval_dataset=Counting(min(256, args.samples), seed=2))
    session = onthefly.attach_hf(trainer, project=args.project, test_dataset=Counting(min(256, args.samples), seed=3),
                                 do_test_after=True)
    trainer.train()  # unchanged
    evals = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    print(f"finished: {session.state.status} at step {session.state.step}; eval_loss by epoch "
          + ", ".join(f"{v:.3f}" for v in evals))
    print(f"session folder : {session.storage.folder}")
    session.close()
    return {"first_eval": evals[0], "last_eval": evals[-1], "steps": session.state.step}


def with_accelerate(args: argparse.Namespace) -> dict[str, float]:
    from accelerate import Accelerator

    import transformers

    from onthefly.integrations.hf import ModelOutputLoss

    transformers.logging.set_verbosity_error()
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=2)
    model = tiny_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train = torch.utils.data.DataLoader(Counting(args.samples, seed=1), batch_size=16, shuffle=True)
    model, optimizer, train = accelerator.prepare(model, optimizer, train)
    session = onthefly.attach(model=model, optimizer=optimizer, train_loader=train, accelerator=accelerator,
                              loss_fn=ModelOutputLoss(shift_labels=True),
                              project=args.project)
    first = last = None
    with session:
        for epoch in session.epochs(args.epochs):
            total, batches = torch.zeros((), device=accelerator.device), 0
            for batch in session.batches():
                with accelerator.accumulate(model):
                    loss = model(**batch).loss
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad()
                total, batches = total + loss.detach(), batches + 1  # stays on the device: no sync
                if not session.step(loss):  # counts optimizer steps; pauses only between accumulations
                    break
            mean = float(total) / max(batches, 1)
            first = mean if first is None else first
            last = mean
            print(f"epoch {epoch}: train loss {mean:.3f}")
    print(f"finished: {session.state.status} at step {session.state.step}")
    return {"first_eval": first, "last_eval": last, "steps": session.state.step}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", choices=("trainer", "accelerate"), default="trainer")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--project", default="hf-quickstart")
    parser.add_argument("--output-dir", default="hf-quickstart-output", help="HF's output_dir (nothing is saved)")
    args = parser.parse_args(argv)
    result = with_trainer(args) if args.runtime == "trainer" else with_accelerate(args)
    return 0 if result["last_eval"] < result["first_eval"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
