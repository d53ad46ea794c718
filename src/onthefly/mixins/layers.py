"""Edits of the model's modules during training: `list_modules` and `layer_op`.

A module is named by its `model.named_modules()` path (`""` is the whole model). `layer_op`
resets a module's parameters (every submodule with a `reset_parameters`, drawing from the RNG
as it stands at the boundary, or from `seed`; the optimizer state of those parameters is
cleared so Adam-like moments do not carry over), freezes or unfreezes its parameters, or sets
the dropout probability of its dropout layers. Every check comes first (the path exists, the
op applies to it, `p` is a probability), so a refused edit changes nothing.

Freezing and dropout are not in `state_dict()`, so what onthefly changed is part of the run's
state in checkpoints (`layer_state` / `restore_layer_state`): a resumed run freezes the same
parameters and uses the same dropout.

Commands: `list_modules` (read-only), `layer_op`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Optional

import torch
from torch import nn

from ..control.constraints import Length, Range
from ..control.errors import CommandError, ErrorCode
from .command import command

LayerOpName = Literal["reset_parameters", "freeze", "unfreeze", "set_dropout"]


@dataclass
class ListModules:
    #: Only the subtree under this module path ("" is the whole model).
    path: Annotated[str, Length(max=4096)] = ""
    #: Depth of the returned tree below `path` (deeper modules are counted, not listed).
    max_depth: Annotated[int, Range(ge=0, le=64)] = 8


@dataclass
class LayerOp:
    path: Annotated[str, Length(max=4096)] = field(metadata={"aliases": ("module",)})
    op: LayerOpName
    #: The dropout probability for `set_dropout`, in [0, 1).
    p: Optional[Annotated[float, Range(ge=0, lt=1)]] = None
    #: For `reset_parameters`: draw the new weights from this seed instead of the RNG as it stands.
    seed: Optional[Annotated[int, Range(ge=0)]] = None
    #: For `reset_parameters`: also forget the optimizer state of the reset parameters.
    reset_optimizer_state: bool = True


@dataclass
class LayersState:
    """What LayersMixin owns: what onthefly changed in the model, and how it was before."""

    requires_grad: dict[str, bool] = field(default_factory=dict)  # parameter name -> set by layer_op
    original_requires_grad: dict[str, bool] = field(default_factory=dict)
    dropout: dict[str, float] = field(default_factory=dict)  # module path -> p set by layer_op
    original_dropout: dict[str, float] = field(default_factory=dict)


def module_tree(module: nn.Module, path: str, depth: int, max_depth: int) -> dict[str, Any]:
    """`{path, type, params, trainable, own_params, children}`; children below `max_depth` are cut."""
    own = list(module.parameters(recurse=False))
    everything = list(module.parameters())
    node: dict[str, Any] = {
        "path": path,
        "type": type(module).__name__,
        "params": sum(p.numel() for p in everything),
        "trainable": sum(p.numel() for p in everything if p.requires_grad),
        "own_params": sum(p.numel() for p in own),
        "resettable": callable(getattr(module, "reset_parameters", None)),
    }
    if isinstance(module, nn.modules.dropout._DropoutNd):
        node["dropout_p"] = float(module.p)
    children = list(module.named_children())
    if depth < max_depth:
        node["children"] = [module_tree(child, f"{path}.{name}" if path else name, depth + 1, max_depth)
                            for name, child in children]
    elif children:
        node["children_cut"] = len(children)
    return node


def is_dropout(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.dropout._DropoutNd)


class LayersMixin:
    """Owns `self.layers` (a `LayersState`)."""

    def _init_layers(self) -> None:
        self.layers = LayersState()

    # ---- lookup ------------------------------------------------------------------------------
    def require_model(self) -> nn.Module:
        if self.model is None:
            raise CommandError("no model is bound to the session", ErrorCode.NOT_FOUND)
        return self.model

    def find_module(self, path: str, field_name: str = "payload.path") -> nn.Module:
        """The module at `path` (`""`: the model); `not_found` naming the closest paths otherwise."""
        modules = dict(self.require_model().named_modules())
        found = modules.get(path)
        if found is None:
            close = difflib.get_close_matches(path, [name for name in modules if name], n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else \
                " (list_modules shows the tree)"
            raise CommandError(f"{field_name}: the model has no module {path!r}{hint}", ErrorCode.NOT_FOUND)
        return found

    def parameter_names(self, path: str) -> list[str]:
        """Full names (as in `model.named_parameters()`) of the parameters under module `path`."""
        prefix = f"{path}." if path else ""
        return [name for name, _ in self.require_model().named_parameters() if name.startswith(prefix)]

    # ---- commands ----------------------------------------------------------------------------
    @command("list_modules", ListModules, mutating=False,
             description="the model's module tree with parameter counts (paths for layer_op)")
    def cmd_list_modules(self, p: ListModules) -> dict[str, Any]:
        root = self.find_module(p.path)
        return {"tree": module_tree(root, p.path, 0, p.max_depth),
                "total_params": sum(x.numel() for x in self.require_model().parameters())}

    @command("layer_op", LayerOp, mutating=True,
             description="on one module (a named_modules path): reset_parameters, freeze, unfreeze, set_dropout p")
    def cmd_layer_op(self, p: LayerOp) -> dict[str, Any]:
        module = self.find_module(p.path)
        if p.op == "set_dropout":
            result = self.set_dropout(p.path, module, p.p)
        elif p.op == "reset_parameters":
            result = self.reset_module(p.path, module, p.seed, p.reset_optimizer_state)
        else:
            result = self.set_trainable(p.path, p.op == "unfreeze")
        self.mark_state_changed()
        self.emit("layer_changed", path=p.path, op=p.op, **result)
        return {"path": p.path, "op": p.op, **result}

    def set_dropout(self, path: str, module: nn.Module, p: float | None) -> dict[str, Any]:
        if p is None:
            raise CommandError("payload.p: set_dropout needs the dropout probability p", ErrorCode.BAD_PAYLOAD)
        targets = [(f"{path}.{name}" if path and name else name or path, m)
                   for name, m in module.named_modules() if is_dropout(m)]
        if not targets:
            raise CommandError(f"payload.path: {path!r} ({type(module).__name__}) has no dropout layer",
                               ErrorCode.BAD_PAYLOAD)
        state = self.layers
        for name, layer in targets:
            state.original_dropout.setdefault(name, float(layer.p))
            layer.p = float(p)
            state.dropout[name] = float(p)
        return {"modules": [name for name, _ in targets], "p": float(p)}

    def reset_module(self, path: str, module: nn.Module, seed: int | None, forget_state: bool) -> dict[str, Any]:
        resettable = [(name, m) for name, m in module.named_modules() if callable(getattr(m, "reset_parameters", None))]
        if not resettable:
            raise CommandError(f"payload.path: {path!r} ({type(module).__name__}) has no module with "
                               "reset_parameters()", ErrorCode.BAD_PAYLOAD)
        params = [prm for _, m in resettable for prm in m.parameters(recurse=False)]
        devices = sorted({prm.device.index for prm in params if prm.device.type == "cuda"})
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            with torch.no_grad():
                for _, m in resettable:
                    m.reset_parameters()
        forgotten = 0
        if forget_state:
            for optimizer in [o for o in [self.optimizer, *self.extra_optimizers] if o is not None]:
                for prm in params:
                    if optimizer.state.pop(prm, None) is not None:
                        forgotten += 1
        for prm in params:
            prm.grad = None
        names = [(f"{path}.{name}" if path and name else name or path) for name, _ in resettable]
        return {"modules": names, "params": sum(prm.numel() for prm in params), "optimizer_states_cleared": forgotten}

    def set_trainable(self, path: str, trainable: bool) -> dict[str, Any]:
        names = self.parameter_names(path)
        if not names:
            raise CommandError(f"payload.path: {path!r} has no parameters to "
                               f"{'unfreeze' if trainable else 'freeze'}", ErrorCode.BAD_PAYLOAD)
        params = dict(self.require_model().named_parameters())
        state = self.layers
        changed = 0
        for name in names:
            prm = params[name]
            state.original_requires_grad.setdefault(name, bool(prm.requires_grad))
            if prm.requires_grad != trainable:
                changed += 1
            prm.requires_grad_(trainable)
            if not trainable:
                prm.grad = None  # optimizers skip parameters without a gradient
            state.requires_grad[name] = trainable
        count = sum(params[name].numel() for name in names)
        return {"parameters": len(names), "changed": changed, "numel": count, "trainable": trainable}

    # ---- checkpoints -------------------------------------------------------------------------
    def layer_state(self) -> dict[str, Any] | None:
        """What onthefly changed in the model that `state_dict()` does not hold (None: nothing)."""
        state = self.layers
        if not state.requires_grad and not state.dropout:
            return None
        return {"requires_grad": dict(state.requires_grad), "dropout": dict(state.dropout)}

    def restore_layer_state(self, saved: dict[str, Any] | None) -> None:
        """Make the model's freezing and dropout what `saved` recorded (None: undo onthefly's changes)."""
        if self.model is None:
            return
        state = self.layers
        params = dict(self.model.named_parameters())
        modules = dict(self.model.named_modules())
        if saved:  # remember how the model was before the saved changes (a fresh process has no record)
            for name in saved.get("requires_grad") or {}:
                if name in params:
                    state.original_requires_grad.setdefault(name, bool(params[name].requires_grad))
            for name in saved.get("dropout") or {}:
                if name in modules and is_dropout(modules[name]):
                    state.original_dropout.setdefault(name, float(modules[name].p))
        wanted_grad = dict(state.original_requires_grad)
        wanted_dropout = dict(state.original_dropout)
        if saved:
            wanted_grad.update(saved.get("requires_grad") or {})
            wanted_dropout.update(saved.get("dropout") or {})
        for name, flag in wanted_grad.items():
            if name in params:
                params[name].requires_grad_(bool(flag))
        for name, p in wanted_dropout.items():
            if name in modules and is_dropout(modules[name]):
                modules[name].p = float(p)
        state.requires_grad = dict((saved or {}).get("requires_grad") or {})
        state.dropout = dict((saved or {}).get("dropout") or {})
