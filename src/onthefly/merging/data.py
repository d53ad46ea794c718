"""Data-driven merges: Fisher-weighted averaging and distillation read batches through the models."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import (
    INTEGER_DTYPES,
    MergeError,
    StateDict,
    as_state_dict_list,
    check_compatible,
    combine,
    finite_number,
    positive_int,
    weighted_sum,
    work_dtype,
)


def _validate_fishers(
    fishers: Any, items: Sequence[StateDict]
) -> list[Mapping[str, Tensor]]:
    """Check that every Fisher dict matches its parent's keys and shapes and is finite and >= 0."""
    fisher_list = as_state_dict_list(fishers, "fishers")
    if len(fisher_list) != len(items):
        raise MergeError(f"got {len(fisher_list)} Fisher dicts for {len(items)} state dicts")
    ref = items[0]
    for i, fisher in enumerate(fisher_list):
        for key, value in fisher.items():
            if key not in ref:
                raise MergeError(f"fishers[{i}] has key {key!r}, which is not in the state dicts")
            if not isinstance(value, Tensor):
                raise MergeError(f"fishers[{i}][{key!r}] is a {type(value).__name__}, not a tensor")
            if value.shape != ref[key].shape:
                raise MergeError(
                    f"key {key!r}: parameter shape {tuple(ref[key].shape)} "
                    f"but fishers[{i}] shape {tuple(value.shape)}"
                )
            if value.is_complex() or value.dtype == torch.bool:
                raise MergeError(
                    f"fishers[{i}][{key!r}] has dtype {value.dtype}; expected a real number type"
                )
            if not ref[key].is_floating_point():
                continue  # integer/bool buffers follow the max/reference rule, not the Fisher
            as_float = value.detach().to(work_dtype(value.dtype))
            if not bool(torch.isfinite(as_float).all()):
                raise MergeError(f"fishers[{i}][{key!r}] contains NaN or infinity")
            if bool((as_float < 0).any()):
                raise MergeError(f"fishers[{i}][{key!r}] has negative entries; a Fisher diagonal is >= 0")
    return fisher_list

def fisher_merge(
    state_dicts: Sequence[Mapping[str, Tensor]],
    fishers: Sequence[Mapping[str, Tensor]],
    *,
    eps: float = 1e-8,
) -> dict[str, Tensor]:
    """Fisher-weighted average: per element sum_i F_i * theta_i / sum_i F_i.

    `eps` is relative: where the summed Fisher of an element is at most `eps` times the largest
    summed Fisher of that tensor (exact zeros included) the parents carry no information and the
    element gets the plain mean. Being relative, the result does not change when every Fisher is
    scaled by the same constant. A key missing from any parent's Fisher dict (a frozen parameter,
    a floating-point buffer such as BatchNorm's running statistics) means "no information": that
    key gets the plain mean across all parents. Fisher entries for integer or bool buffers are
    ignored; those buffers follow the module rule (max / reference value).
    """
    items = as_state_dict_list(state_dicts)
    check_compatible(items)
    eps = finite_number("eps", eps)
    if eps < 0:
        raise MergeError(f"eps must be >= 0, got {eps}")
    fisher_list = _validate_fishers(fishers, items)
    uniform = [1.0 / len(items)] * len(items)

    def rule(key: str, values: list[Tensor]) -> Tensor:
        mean = weighted_sum(values, uniform)
        if any(key not in fisher for fisher in fisher_list):
            return mean
        like = values[0]
        weights = [f[key].detach().to(device=like.device, dtype=like.dtype) for f in fisher_list]
        total = torch.stack(weights).sum(dim=0)
        numerator = torch.stack([w * v for w, v in zip(weights, values)]).sum(dim=0)
        threshold = eps * total.max() if total.numel() else total.new_zeros(())
        informed = (total > threshold) & (total > 0)
        safe_total = torch.where(informed, total, torch.ones_like(total))
        return torch.where(informed, numerator / safe_total, mean)

    return combine(items, rule)

def _move_to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor inside a (nested) tuple/list/dict batch to `device`."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move_to_device(v, device) for v in batch)
    return batch

def _split_xy(batch: Any, what: str) -> tuple[Any, Any]:
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    raise MergeError(
        f"{what}: the default forward expects each batch to be (x, y), got "
        f"{type(batch).__name__}{f' of length {len(batch)}' if isinstance(batch, (list, tuple)) else ''}; "
        "pass forward=(model, batch) -> ... for other batch shapes"
    )

def _model_device(model: nn.Module, device: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    for p in model.parameters():
        return p.device
    return torch.device("cpu")

def _save_modes(modules: Iterable[nn.Module]) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for root in modules for m in root.modules()]

def _restore_modes(saved: Iterable[tuple[nn.Module, bool]]) -> None:
    for module, training in saved:
        module.training = training

def estimate_fisher(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: Callable[[Any, Any], Tensor] | None,
    *,
    max_batches: int = 32,
    device: Any = None,
    forward: Callable[[nn.Module, Any], Tensor] | None = None,
) -> dict[str, Tensor]:
    """Diagonal empirical Fisher: the mean over batches of each trainable parameter's squared grad.

    The model runs in eval mode (no dropout noise, BatchNorm statistics untouched) and every
    module's train/eval flag is restored afterwards. Gradients come from `torch.autograd.grad`,
    so `.grad` is left exactly as it was. Keys are the model's state_dict keys (tied parameters
    get an entry under each name); buffers and frozen parameters get none. Batches are moved to
    `device` (default: the device of the model's parameters); the model itself is not moved.
    `forward(model, batch) -> loss` replaces the default `loss_fn(model(x), y)` for batches that
    are not `(x, y)`.
    """
    if not isinstance(model, nn.Module):
        raise MergeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    max_batches = positive_int("max_batches", max_batches)
    if forward is None and loss_fn is None:
        raise MergeError("estimate_fisher needs loss_fn, or forward=(model, batch) -> loss")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise MergeError("estimate_fisher: the model has no trainable parameters")
    target = _model_device(model, device)
    sums = [torch.zeros_like(p, dtype=work_dtype(p.dtype)) for p in params]
    saved = _save_modes([model])
    model.eval()
    batches = 0
    try:
        with torch.enable_grad():
            for batch in itertools.islice(loader, max_batches):
                batch = _move_to_device(batch, target)
                if forward is not None:
                    loss = forward(model, batch)
                else:
                    x, y = _split_xy(batch, "estimate_fisher")
                    loss = loss_fn(model(x), y)  # type: ignore[misc]
                if not isinstance(loss, Tensor) or loss.numel() != 1:
                    shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                    raise MergeError(f"estimate_fisher: the loss must be a scalar tensor, got {shape}")
                if not loss.requires_grad:
                    raise MergeError("estimate_fisher: the loss does not depend on any trainable parameter")
                grads = torch.autograd.grad(loss.reshape(()), params, allow_unused=True)
                for acc, grad in zip(sums, grads):
                    if grad is not None:
                        g = grad.detach().to(acc.dtype)
                        acc.addcmul_(g, g)
                batches += 1
    finally:
        _restore_modes(saved)
    if batches == 0:
        raise MergeError("estimate_fisher: the loader yielded no batches")
    by_id = {id(p): acc / batches for p, acc in zip(params, sums)}
    fisher: dict[str, Tensor] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if isinstance(value, nn.Parameter) and id(value) in by_id:
            fisher[key] = by_id[id(value)].clone()
    for key, value in fisher.items():
        if not bool(torch.isfinite(value).all()):
            raise MergeError(
                f"estimate_fisher: the Fisher of {key!r} is not finite (NaN/inf loss or gradient)"
            )
    return fisher

def _default_outputs(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, Mapping) and batch:
        # Keyword inputs (a Hugging Face batch): the model's output is a mapping holding `logits`.
        out = model(**batch)
        logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
        return out if logits is None else logits
    if isinstance(batch, (list, tuple)) and batch:
        return model(batch[0])
    raise MergeError(
        f"distill_merge: the default forward expects a tensor, an (x, ...) batch or a mapping of keyword "
        f"inputs, got {type(batch).__name__}; pass forward=(model, batch) -> outputs"
    )

def _resolve_task(task: str, batch: Any, output: Tensor) -> str:
    """Pick the distillation loss: integer labels or class-shaped outputs mean classification."""
    if task != "auto":
        return task
    if isinstance(batch, (list, tuple)) and len(batch) >= 2 and isinstance(batch[1], Tensor):
        labels = batch[1]
        if labels.dtype == torch.bool or labels.dtype in INTEGER_DTYPES:
            return "classification"
        if labels.is_floating_point():
            return "regression"
    return "classification" if output.dim() >= 2 and output.shape[1] >= 2 else "regression"

def _distillation_loss(
    student_out: Tensor, teacher_outs: Sequence[Tensor], task: str, temperature: float
) -> Tensor:
    """KL(p_teachers || p_student) on softened class scores (dim 1), or MSE for regression."""
    s = student_out.float()
    if task == "classification":
        log_s = F.log_softmax(s / temperature, dim=1)
        p_t = torch.stack([F.softmax(t.float() / temperature, dim=1) for t in teacher_outs]).mean(dim=0)
        kl = (torch.special.xlogy(p_t, p_t) - p_t * log_s).sum(dim=1).mean()
        return kl * (temperature**2)
    target = torch.stack([t.float() for t in teacher_outs]).mean(dim=0)
    return F.mse_loss(s, target)

def _output_tensor(value: Any, who: str) -> Tensor:
    if not isinstance(value, Tensor) or not value.is_floating_point():
        kind = f"{value.dtype} tensor" if isinstance(value, Tensor) else type(value).__name__
        raise MergeError(f"distill_merge: {who} returned a {kind}; expected a floating-point tensor "
                         "(pass forward=(model, batch) -> tensor to pick the output)")
    return value

def distill_merge(
    student: nn.Module,
    teachers: Sequence[nn.Module],
    loader: Iterable[Any],
    *,
    steps: int = 100,
    lr: float = 1e-3,
    temperature: float = 2.0,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    device: Any = None,
    task: str = "auto",
    seed: int | None = 0,
) -> dict[str, Tensor]:
    """Train `student` for `steps` Adam steps to match the teachers' mean output; return its state.

    Classification uses the standard distillation loss T^2 * KL(p_T || p_S), where p_T is the mean
    of the teachers' softmax(z / T) and p_S the student's, over dim 1; regression uses MSE to the
    teachers' mean output. `task="auto"` picks classification when the batch's labels are integers
    (or, without labels, when the output has a class dim 1 of size >= 2). The student is trained
    in place in train mode (initialise it first, e.g. from `swa_merge`); teachers run in eval mode
    under no_grad and are left untouched. The loader is cycled if it is shorter than `steps`.
    With `seed` set, the global RNG is forked and seeded, so the result is deterministic and the
    caller's RNG state is unchanged. Modes and `.grad` of the student are restored afterwards.
    """
    if not isinstance(student, nn.Module):
        raise MergeError(f"student must be a torch.nn.Module, got {type(student).__name__}")
    if isinstance(teachers, nn.Module) or not isinstance(teachers, Iterable):
        raise MergeError("teachers must be a sequence of torch.nn.Module")
    teacher_list = list(teachers)
    if not teacher_list:
        raise MergeError("distill_merge needs at least one teacher")
    for i, teacher in enumerate(teacher_list):
        if not isinstance(teacher, nn.Module):
            raise MergeError(f"teachers[{i}] must be a torch.nn.Module, got {type(teacher).__name__}")
    steps = positive_int("steps", steps)
    lr = finite_number("lr", lr)
    temperature = finite_number("temperature", temperature)
    if lr <= 0:
        raise MergeError(f"lr must be > 0, got {lr}")
    if temperature <= 0:
        raise MergeError(f"temperature must be > 0, got {temperature}")
    if task not in ("auto", "classification", "regression"):
        raise MergeError(f"task must be 'auto', 'classification' or 'regression', got {task!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise MergeError(f"seed must be an integer or None, got {seed!r}")
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise MergeError("distill_merge: the student has no trainable parameters")
    target = _model_device(student, device)
    for i, teacher in enumerate(teacher_list):
        for p in itertools.chain(teacher.parameters(), teacher.buffers()):
            if p.device != target:
                raise MergeError(
                    f"distill_merge: teachers[{i}] is on {p.device}, the student's batches on {target}"
                )
            break
    run = forward if forward is not None else _default_outputs

    saved_modes = _save_modes([student, *teacher_list])
    saved_grads = [p.grad for p in params]
    cuda_devices: list[int] = []
    if target.type == "cuda":
        cuda_devices = [target.index if target.index is not None else torch.cuda.current_device()]
    try:
        with torch.random.fork_rng(devices=cuda_devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            _distill_steps(student, teacher_list, loader, params, run, target, steps, lr, temperature, task)
    finally:
        _restore_modes(saved_modes)
        for p, grad in zip(params, saved_grads):
            p.grad = grad
    return {key: value.detach().clone() for key, value in student.state_dict().items()}

def _distill_steps(
    student: nn.Module,
    teachers: list[nn.Module],
    loader: Iterable[Any],
    params: list[nn.Parameter],
    run: Callable[[nn.Module, Any], Any],
    device: torch.device,
    steps: int,
    lr: float,
    temperature: float,
    task: str,
) -> None:
    """The distillation loop itself, written out plainly; `distill_merge` owns setup and cleanup."""
    optimizer = torch.optim.Adam(params, lr=lr)
    student.train()
    for teacher in teachers:
        teacher.eval()
    resolved: str | None = None
    done = 0
    while done < steps:
        seen_any = False
        for batch in loader:
            seen_any = True
            batch = _move_to_device(batch, device)
            with torch.no_grad():
                teacher_outs = [
                    _output_tensor(run(t, batch), f"teachers[{i}]") for i, t in enumerate(teachers)
                ]
            student_out = _output_tensor(run(student, batch), "the student")
            for i, t_out in enumerate(teacher_outs):
                if t_out.shape != student_out.shape:
                    raise MergeError(
                        f"distill_merge: teachers[{i}] output shape {tuple(t_out.shape)} differs from "
                        f"the student's {tuple(student_out.shape)}"
                    )
            if resolved is None:
                resolved = _resolve_task(task, batch, student_out)
                if resolved == "classification" and (student_out.dim() < 2 or student_out.shape[1] < 2):
                    raise MergeError(
                        "distill_merge: classification needs outputs shaped (batch, classes >= 2, ...), "
                        f"got {tuple(student_out.shape)}; use task='regression'"
                    )
            loss = _distillation_loss(student_out, teacher_outs, resolved, temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            if done >= steps:
                break
        if not seen_any:
            raise MergeError("distill_merge: the loader yielded no batches")
