"""Per-sample classification statistics from a batch's model outputs and targets: the probability
of the labelled class, the predicted class and its probability, the margin, and correctness.

A batch is treated as classification when the outputs are `(B, C)` scores with `C >= 2` and the
targets are `(B,)` integer labels in `[0, C)` (multiclass), or the outputs are `(B,)`/`(B, 1)`
scores and the targets are 0/1 values (binary, one logit or probability per sample). Anything
else (regression, sequences, soft labels) is "loss only": only the per-sample loss is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

OUTPUT_KINDS = ("auto", "logits", "log_probs", "probs")
MULTICLASS = "multiclass"
BINARY = "binary"
LOSS_ONLY = "loss_only"

# Margins are clamped here: a probability of exactly 0 gives an infinite log-ratio.
MARGIN_LIMIT = 1e4
_TINY = 1e-12


class ClassificationShapeError(ValueError):
    """A batch does not fit the classification task inferred from the first batch."""


@dataclass(frozen=True)
class TaskSpec:
    """What the outputs and targets are: `kind` (multiclass, binary, loss_only), the number of
    classes, how outputs read as probabilities (`logits`, `log_probs`, `probs`), and for
    loss-only tasks the reason the batch was not classification."""

    kind: str
    num_classes: int | None = None
    output_kind: str | None = None
    reason: str | None = None

    @property
    def is_classification(self) -> bool:
        return self.kind != LOSS_ONLY

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_classes": self.num_classes, "output_kind": self.output_kind,
                "reason": self.reason}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskSpec:
        return cls(d["kind"], d.get("num_classes"), d.get("output_kind"), d.get("reason"))


def _loss_hint(loss_fn: Any) -> str | None:
    """The output kind a standard torch loss implies (None when the loss says nothing)."""
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.BCEWithLogitsLoss)):
        return "logits"
    if isinstance(loss_fn, nn.NLLLoss):
        return "log_probs"
    if isinstance(loss_fn, nn.BCELoss):
        return "probs"
    fn = getattr(loss_fn, "__name__", None)
    if loss_fn is torch.nn.functional.cross_entropy or fn == "binary_cross_entropy_with_logits":
        return "logits"
    if fn == "nll_loss":
        return "log_probs"
    if fn == "binary_cross_entropy":
        return "probs"
    return None


def _labels_of(targets: Any, n: int) -> torch.Tensor | None:
    if not isinstance(targets, torch.Tensor) or targets.dim() == 0 or targets.shape[0] != n:
        return None
    if targets.dim() == 2 and targets.shape[1] == 1:
        targets = targets[:, 0]
    return targets if targets.dim() == 1 else None


def infer_task(outputs: Any, targets: Any, *, loss_fn: Any = None, output_kind: str = "auto") -> TaskSpec:
    """Decide from one batch whether it is classification, and how to read its outputs.

    `output_kind="auto"` takes the kind a standard loss implies (`CrossEntropyLoss`/
    `BCEWithLogitsLoss`: logits, `NLLLoss`: log-probabilities, `BCELoss`: probabilities); for
    other losses, multiclass outputs whose rows are non-negative and sum to 1 are read as
    probabilities and everything else as logits (binary outputs: logits).
    """
    if output_kind not in OUTPUT_KINDS:
        raise ValueError(f"output_kind must be one of {OUTPUT_KINDS}, got {output_kind!r}")
    if not isinstance(outputs, torch.Tensor) or outputs.dim() == 0:
        return TaskSpec(LOSS_ONLY, reason="the model output is not a tensor with a batch dimension")
    n = outputs.shape[0]
    if not outputs.is_floating_point():
        return TaskSpec(LOSS_ONLY, reason=f"the model output has dtype {outputs.dtype}, not floating point")
    labels = _labels_of(targets, n)
    if labels is None:
        return TaskSpec(LOSS_ONLY, reason="the targets are not one label per sample")
    scores = outputs.detach().float()
    kind = output_kind if output_kind != "auto" else _loss_hint(loss_fn)
    if scores.dim() == 2 and scores.shape[1] >= 2:
        if labels.is_floating_point() or labels.dtype == torch.bool:
            return TaskSpec(LOSS_ONLY, reason=f"(B, C) outputs with {labels.dtype} targets (not class indices)")
        c = int(scores.shape[1])
        if n and (int(labels.min()) < 0 or int(labels.max()) >= c):
            return TaskSpec(LOSS_ONLY, reason=f"labels outside [0, {c}) for {c} output columns")
        if kind is None:
            sums = scores.sum(dim=1)
            is_probs = bool((scores >= 0).all()) and bool(((sums - 1).abs() < 1e-3).all())
            kind = "probs" if is_probs else "logits"
        return TaskSpec(MULTICLASS, c, kind)
    if scores.dim() == 1 or (scores.dim() == 2 and scores.shape[1] == 1):
        values = labels.float()
        if not bool(((values == 0) | (values == 1)).all()):
            return TaskSpec(LOSS_ONLY, reason="one output per sample with targets that are not 0/1")
        return TaskSpec(BINARY, 2, kind or "logits")
    return TaskSpec(LOSS_ONLY, reason=f"model output of shape {tuple(outputs.shape)} is not (B, C) or (B,)")


def class_log_probs(outputs: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    """(B, C) float32 log-probabilities of each class (C = 2 for binary tasks)."""
    if not spec.is_classification:
        raise ValueError("class_log_probs needs a classification task")
    scores = outputs.detach().float()
    if spec.kind == BINARY:
        z = scores.reshape(-1)
        if spec.output_kind == "logits":
            return torch.stack([nn.functional.logsigmoid(-z), nn.functional.logsigmoid(z)], dim=1)
        p = (z.exp() if spec.output_kind == "log_probs" else z).clamp(_TINY, 1 - _TINY)
        return torch.stack([torch.log1p(-p), p.log()], dim=1)
    if scores.dim() != 2 or scores.shape[1] != spec.num_classes:
        raise ClassificationShapeError(
            f"expected outputs of shape (B, {spec.num_classes}) as in the first batch, got {tuple(scores.shape)}"
        )
    if spec.output_kind == "probs":
        return scores.clamp_min(_TINY).log().log_softmax(dim=1)  # renormalises rows
    return scores.log_softmax(dim=1)


def classification_stats(outputs: torch.Tensor, targets: Any, spec: TaskSpec) -> dict[str, torch.Tensor]:
    """Per-sample statistics of a batch: `labels`, `p_true` (probability of the labelled class),
    `pred` (argmax class), `p_pred`, `margin` (log p_true minus the largest other log-probability,
    which equals the logit margin for softmax outputs; clamped to ±1e4), `correct` (pred == label),
    and `log_probs` (B, C). All on the outputs' device."""
    n = outputs.shape[0]
    labels = _labels_of(targets, n)
    if labels is None:
        raise ClassificationShapeError(f"targets of this batch are not one label for each of its {n} samples")
    labels = labels.to(outputs.device).long() if spec.kind == MULTICLASS else labels.to(outputs.device).float().round().long()
    c = int(spec.num_classes or 2)
    if n and (int(labels.min()) < 0 or int(labels.max()) >= c):
        raise ClassificationShapeError(f"a label of this batch lies outside [0, {c})")
    logp = class_log_probs(outputs, spec)
    rows = torch.arange(n, device=logp.device)
    lp_true = logp[rows, labels]
    lp_pred, pred = logp.max(dim=1)
    others = logp.clone()
    others[rows, labels] = -torch.inf
    margin = (lp_true - others.max(dim=1).values).clamp(-MARGIN_LIMIT, MARGIN_LIMIT)
    return {
        "labels": labels,
        "p_true": lp_true.exp(),
        "pred": pred,
        "p_pred": lp_pred.exp(),
        "margin": margin,
        "correct": pred == labels,
        "log_probs": logp,
    }
