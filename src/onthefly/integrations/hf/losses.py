"""Per-sample losses of Hugging Face models, computed from the logits and labels a `ModelOutput` holds.

A Hugging Face model called with `labels` returns one loss for the whole batch. The dashboard's
reports need one loss per sample, so `ModelOutputLoss` recomputes it from `logits` and the
batch's labels, the way the model's own loss does:

- causal LM (`shift_labels=True`): position t predicts token t+1; a sequence's loss is the mean
  over its real tokens (labels of -100 — padding, prompts — are ignored). A batch that already
  carries `shift_labels` (padding-free collators) is used as it is, without shifting;
- token-level labels (masked LM, token classification): the mean over the labelled tokens;
- sequence classification: cross-entropy per sample; float labels: MSE when there is one output
  (regression) or binary cross-entropy per label (multi-label), as the models decide.

This module needs only torch: `import transformers` is not required to use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

IGNORE_INDEX = -100


def logits_of(outputs: Any) -> torch.Tensor:
    """The `logits` of a model's output (a `ModelOutput`, a mapping, or a tuple with logits second)."""
    if isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    else:
        logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, (tuple, list)) and len(outputs) >= 2:
        logits = outputs[1]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the model's output ({type(outputs).__name__}) has no 'logits' tensor")
    return logits


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample mean cross-entropy over the tokens whose label is not -100: (B, T, V), (B, T) -> (B,).

    A sample without a single labelled token has no loss: NaN (0 tokens / 0).
    """
    per_token = F.cross_entropy(logits.float().transpose(1, -1), labels.to(logits.device),
                                ignore_index=IGNORE_INDEX, reduction="none")
    real = (labels != IGNORE_INDEX).to(per_token.device)
    dims = tuple(range(1, per_token.dim()))
    return (per_token * real).sum(dim=dims) / real.sum(dim=dims)


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor, *, shift_labels: bool = False,
                    pre_shifted: bool = False) -> torch.Tensor:
    """One loss per sample from a model's logits and the batch's labels (see the module docstring).

    `shift_labels`: the model predicts the next token (causal LM), so `logits[:, t]` is scored
    against `labels[:, t + 1]`; `pre_shifted`: the labels are already the next tokens.
    """
    if labels.dim() >= 2 and logits.dim() == labels.dim() + 1 and not labels.is_floating_point():
        if shift_labels and not pre_shifted:
            logits, labels = logits[:, :-1], labels[:, 1:]
        return token_losses(logits, labels)
    if labels.dim() == 1 and logits.dim() == 2 and not labels.is_floating_point():
        return F.cross_entropy(logits.float(), labels.to(logits.device), ignore_index=IGNORE_INDEX,
                               reduction="none")
    if labels.is_floating_point():
        target = labels.to(logits.device, logits.dtype)
        if logits.shape[-1] == 1 or (logits.dim() == 1 and logits.shape == target.shape):
            diff = F.mse_loss(logits.float().reshape(target.shape), target.float(), reduction="none")
        elif logits.shape == target.shape:
            diff = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
        else:
            raise ValueError(f"float labels of shape {tuple(labels.shape)} do not match logits of shape "
                             f"{tuple(logits.shape)}")
        return diff.reshape(diff.shape[0], -1).mean(dim=1)
    raise ValueError(f"cannot pair labels of shape {tuple(labels.shape)} with logits of shape {tuple(logits.shape)}")


class ModelOutputLoss(nn.Module):
    """`loss(model, batch)` for models that take the batch as keyword arguments and return logits.

    With `reduction="none"` (what the session's scans set) it returns one loss per sample; with
    "mean" (the default) or "sum" it reduces them. The batch is passed to the model unchanged,
    as the Trainer passes it.
    """

    def __init__(self, *, shift_labels: bool = False, label_key: str = "labels", reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
        self.shift_labels = bool(shift_labels)
        self.label_key = label_key
        self.reduction = reduction

    def forward(self, model: nn.Module, batch: Any) -> torch.Tensor:
        if not isinstance(batch, Mapping):
            raise TypeError(f"ModelOutputLoss needs a batch that maps names to inputs, got {type(batch).__name__}")
        pre_shifted = "shift_labels" in batch
        labels = batch["shift_labels"] if pre_shifted else batch.get(self.label_key)
        if not isinstance(labels, torch.Tensor):
            raise KeyError(f"the batch has no {self.label_key!r} tensor (keys: {sorted(batch)})")
        losses = per_sample_loss(logits_of(model(**batch)), labels, shift_labels=self.shift_labels,
                                 pre_shifted=pre_shifted)
        if self.reduction == "none":
            return losses
        return losses.sum() if self.reduction == "sum" else losses.mean()

    def extra_repr(self) -> str:
        return f"shift_labels={self.shift_labels}, reduction={self.reduction!r}"
