"""Calling any model and loss on any batch shape: candidates, patterns, caching, coercion."""

from __future__ import annotations

import warnings
from collections import OrderedDict, namedtuple
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onthefly.data_explorer import (
    ALREADY_PER_SAMPLE,
    ONE_BY_ONE,
    REDUCTION_NONE,
    VMAP,
    CallCache,
    LossCallError,
    LossShapeError,
    ModelCallError,
    _call_batch_loss,
    apply_loss_with_warning_guard,
    batch_size_of,
    call_batch_loss,
    call_model,
    coerce_to_per_sample,
    compute_batch_loss,
    ensure_tensor_output,
    extract_loss_value,
    model_input_candidates,
    move_to_device,
    select_sample,
    split_batch,
)

from .conftest import N_CLASSES, N_FEATURES, MLP

B = 5
PairNT = namedtuple("PairNT", ["x", "y"])
TripleNT = namedtuple("TripleNT", ["a", "b", "y"])


class AttrBatch:
    """A custom batch class with attributes, as some libraries collate into."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        self.inputs = inputs
        self.labels = labels


class DictModel(nn.Module):
    """Takes the whole feature dict as one argument."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(N_FEATURES, N_CLASSES)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.lin(batch["x"]) * batch["scale"]


class KwargsModel(nn.Module):
    """HuggingFace style: keyword inputs, returns a ModelOutput-like mapping."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(N_FEATURES, N_CLASSES)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> "FakeModelOutput":
        return FakeModelOutput(hidden=torch.zeros(1), logits=self.lin(input_ids) * attention_mask)


class FakeModelOutput(OrderedDict):
    """Mimics transformers.ModelOutput: an ordered mapping whose keys are also attributes."""

    def __init__(self, **kw: torch.Tensor) -> None:
        super().__init__(**kw)

    def __getattr__(self, name: str) -> torch.Tensor:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class TwoInputModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(N_FEATURES, N_CLASSES)
        self.b = nn.Linear(3, N_CLASSES)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.a(a) + self.b(b)


class CountingModel(MLP):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(x)


@pytest.fixture
def xy() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, N_FEATURES, generator=g), torch.randint(0, N_CLASSES, (B,), generator=g)


def _ref(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


# ---------------------------------------------------------------------------------------------
# batch shapes x model signatures


@pytest.mark.parametrize("shape", ["tuple", "dict", "list3", "namedtuple", "attrs"])
def test_single_input_model_every_batch_shape(shape: str, model: MLP, xy) -> None:
    x, y = xy
    batch = {
        "tuple": (x, y),
        "dict": {"x": x, "y": y},
        "list3": [x, y, torch.arange(B)],
        "namedtuple": PairNT(x, y),
        "attrs": AttrBatch(x, y),
    }[shape]
    with torch.no_grad():
        per = compute_batch_loss(model, batch, nn.CrossEntropyLoss(), per_sample=True, cache=CallCache())
    torch.testing.assert_close(per, _ref(model, x, y), atol=1e-6, rtol=0)


def test_dict_input_model(xy) -> None:
    x, y = xy
    torch.manual_seed(0)
    model = DictModel()
    batch = {"x": x, "scale": torch.full((B, 1), 2.0), "label": y}
    cache = CallCache()
    with torch.no_grad():
        per = compute_batch_loss(model, batch, F.cross_entropy, per_sample=True, cache=cache)
        ref = F.cross_entropy(model.lin(x) * 2.0, y, reduction="none")
    torch.testing.assert_close(per, ref, atol=1e-6, rtol=0)
    assert cache.inputs is not None and cache.inputs.kind == "positional"  # model(fields)


def test_kwargs_model_with_model_output(xy) -> None:
    x, y = xy
    torch.manual_seed(0)
    model = KwargsModel()
    mask = torch.ones(B, 1)
    batch = {"input_ids": x, "attention_mask": mask, "labels": y}
    cache = CallCache()
    with torch.no_grad():
        per = compute_batch_loss(model, batch, nn.CrossEntropyLoss(), per_sample=True, cache=cache)
        ref = F.cross_entropy(model.lin(x), y, reduction="none")
    torch.testing.assert_close(per, ref, atol=1e-6, rtol=0)
    assert cache.inputs.kind == "kwargs"


@pytest.mark.parametrize("shape", ["list3", "namedtuple"])
def test_multiple_positional_inputs(shape: str, xy) -> None:
    x, y = xy
    b = torch.randn(B, 3, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    model = TwoInputModel()
    batch = [x, b, y] if shape == "list3" else TripleNT(x, b, y)
    with torch.no_grad():
        per = compute_batch_loss(model, batch, nn.CrossEntropyLoss(), per_sample=True, cache=CallCache())
        ref = F.cross_entropy(model(x, b), y, reduction="none")
    torch.testing.assert_close(per, ref, atol=1e-6, rtol=0)


def test_embedding_model_hook_candidate() -> None:
    class TokenModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding_model = nn.Embedding(10, N_FEATURES)
            self.head = nn.Linear(N_FEATURES, N_CLASSES)

        def forward(self, emb: torch.Tensor) -> torch.Tensor:
            if emb.dtype != torch.float32:
                raise TypeError("expects embeddings, got token ids")
            return self.head(emb)

    torch.manual_seed(0)
    model = TokenModel()
    ids = torch.tensor([1, 4, 7])
    y = torch.tensor([0, 2, 3])
    cache = CallCache()
    with torch.no_grad():
        per = compute_batch_loss(model, (ids, y), nn.CrossEntropyLoss(), per_sample=True, cache=cache)
        ref = F.cross_entropy(model.head(model.embedding_model(ids)), y, reduction="none")
    torch.testing.assert_close(per, ref, atol=1e-6, rtol=0)
    assert cache.inputs.kind == "embedding"


# ---------------------------------------------------------------------------------------------
# loss forms


def _loss_forms(model: nn.Module):
    def scalar(out, target):
        return F.cross_entropy(out, target)

    def host_scalar(out, target):  # .item() cannot run under vmap
        return F.cross_entropy(out, target).item()

    def per_sample(out, target):
        return F.cross_entropy(out, target, reduction="none")

    def batch_only(batch):
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="none")

    def model_batch(model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y)

    def outputs_batch(outputs, batch):
        return F.cross_entropy(outputs, batch[1], reduction="none")

    def as_dict(out, target):
        return {"loss": F.cross_entropy(out, target, reduction="none"), "acc": torch.tensor(0.5)}

    def as_tuple(out, target):
        return F.cross_entropy(out, target, reduction="none"), {"n": 5}

    return {
        "module_reduction_attr": (nn.CrossEntropyLoss(), REDUCTION_NONE),
        "functional_reduction_kwarg": (F.cross_entropy, REDUCTION_NONE),
        "scalar_vmap": (scalar, VMAP),
        "scalar_one_by_one": (host_scalar, ONE_BY_ONE),
        "per_sample": (per_sample, ALREADY_PER_SAMPLE),
        "loss_batch": (batch_only, ALREADY_PER_SAMPLE),
        "loss_model_batch": (model_batch, VMAP),
        "loss_outputs_batch": (outputs_batch, ALREADY_PER_SAMPLE),
        "dict_return": (as_dict, ALREADY_PER_SAMPLE),
        "tuple_return": (as_tuple, ALREADY_PER_SAMPLE),
    }


@pytest.mark.parametrize(
    "form",
    [
        "module_reduction_attr",
        "functional_reduction_kwarg",
        "scalar_vmap",
        "scalar_one_by_one",
        "per_sample",
        "loss_batch",
        "loss_model_batch",
        "loss_outputs_batch",
        "dict_return",
        "tuple_return",
    ],
)
def test_every_loss_form_gives_reference_per_sample_losses(form: str, model: MLP, xy) -> None:
    x, y = xy
    loss_fn, method = _loss_forms(model)[form]
    cache = CallCache()
    with torch.inference_mode():
        per = compute_batch_loss(model, (x, y), loss_fn, per_sample=True, cache=cache)
    torch.testing.assert_close(per, _ref(model, x, y), atol=1e-6, rtol=0)
    assert cache.per_sample_method == method


def test_reduction_attribute_is_restored_and_scalar_mode_keeps_it(model: MLP, xy) -> None:
    x, y = xy
    crit = nn.CrossEntropyLoss(reduction="sum")
    cache = CallCache()
    with torch.no_grad():
        per = compute_batch_loss(model, (x, y), crit, per_sample=True, cache=cache)
        assert crit.reduction == "sum"
        total = compute_batch_loss(model, (x, y), crit, per_sample=False, cache=cache)
    assert per.shape == (B,)
    torch.testing.assert_close(total, _ref(model, x, y).sum(), atol=1e-5, rtol=0)


def test_reduction_restored_when_loss_raises(model: MLP, xy) -> None:
    x, _ = xy
    crit = nn.CrossEntropyLoss()
    bad_targets = torch.full((B,), 99)  # out of range class -> the loss raises
    with pytest.raises((LossCallError, IndexError, RuntimeError)):
        compute_batch_loss(model, (x, bad_targets), crit, per_sample=True, cache=CallCache())
    assert crit.reduction == "mean"


def test_per_sample_false_returns_scalar_mean_with_gradients(model: MLP, xy) -> None:
    x, y = xy
    loss = compute_batch_loss(model, (x, y), nn.CrossEntropyLoss(reduction="none"), per_sample=False, cache=CallCache())
    assert loss.dim() == 0 and loss.requires_grad
    torch.testing.assert_close(loss.detach(), _ref(model, x, y).mean(), atol=1e-6, rtol=0)
    loss.backward()
    assert model.head.weight.grad is not None


def test_token_level_losses_are_averaged_per_sample(model: MLP) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, 7, N_FEATURES, generator=g)  # (B, T, F)
    y = torch.randint(0, N_CLASSES, (B, 7), generator=g)

    def token_loss(out, target):
        return F.cross_entropy(out.reshape(-1, N_CLASSES), target.reshape(-1), reduction="none")  # (B*T,)

    with torch.no_grad():
        per = compute_batch_loss(model, (x, y), token_loss, per_sample=True, cache=CallCache())
        ref = F.cross_entropy(model(x).reshape(-1, N_CLASSES), y.reshape(-1), reduction="none").reshape(B, 7).mean(1)
    torch.testing.assert_close(per, ref, atol=1e-6, rtol=0)


def test_input_only_batch_uses_outputs_and_batch(xy) -> None:
    x, _ = xy
    torch.manual_seed(0)
    ae = nn.Linear(N_FEATURES, N_FEATURES)
    with torch.no_grad():
        per = compute_batch_loss(ae, x, nn.MSELoss(), per_sample=True, cache=CallCache())
        ref = ((ae(x) - x) ** 2).mean(1)
    torch.testing.assert_close(per, ref, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# caching


def test_pattern_is_cached_on_loss_and_never_reprobed(xy) -> None:
    x, y = xy
    model = CountingModel()
    calls = []

    def loss(a, b):
        calls.append(1)
        return F.cross_entropy(a, b["y"], reduction="none")  # needs the dict batch: loss(outputs, batch)

    batch = {"x": x, "y": y}
    cache = CallCache()
    with torch.no_grad():
        first = compute_batch_loss(model, batch, loss, per_sample=True, cache=cache)
        assert loss._otf_batch_call_cfg["pattern"] == "outputs_batch"
        assert len(calls) == 2  # loss(outputs, targets) failed, loss(outputs, batch) worked
        assert model.calls == 1  # the model output was reused across patterns
        second = compute_batch_loss(model, batch, loss, per_sample=True, cache=cache)
    assert len(calls) == 3 and model.calls == 2
    torch.testing.assert_close(first, second)


def test_cached_pattern_errors_reach_the_user_unchanged(model: MLP, xy) -> None:
    x, y = xy

    def loss(out, target):
        if target.shape[0] != B:
            raise RuntimeError("user bug on the second batch")
        return F.cross_entropy(out, target)

    cache = CallCache()
    compute_batch_loss(model, (x, y), loss, per_sample=False, cache=cache)
    with pytest.raises(RuntimeError, match="user bug on the second batch"):
        compute_batch_loss(model, (x[:2], y[:2]), loss, per_sample=False, cache=cache)


def test_model_cache_is_stored_on_model_when_none_given(model: MLP, xy) -> None:
    x, y = xy
    out = call_model(model, (x, y))
    assert isinstance(model._otf_call_cache, CallCache)
    assert model._otf_call_cache.inputs.kind == "positional"
    torch.testing.assert_close(out, model(x))


def test_call_batch_loss_and_seed_alias(model: MLP, xy) -> None:
    x, y = xy
    assert _call_batch_loss is call_batch_loss
    value = call_batch_loss(nn.CrossEntropyLoss(), model, (x, y), cache=CallCache())
    torch.testing.assert_close(value, _ref(model, x, y).mean())


# ---------------------------------------------------------------------------------------------
# errors and the warning guard


def test_loss_failing_every_pattern_lists_what_was_tried(xy) -> None:
    x, _ = xy
    model = nn.Linear(N_FEATURES, 1)
    batch = (x, torch.randn(B))  # (B,) target against (B, 1) output: MSELoss broadcasts
    with pytest.raises(LossCallError) as err:
        compute_batch_loss(model, batch, nn.MSELoss(), per_sample=False, cache=CallCache())
    text = str(err.value)
    assert "loss(outputs, targets)" in text and "LossShapeError" in text
    assert "loss(outputs, batch)" in text and "loss(model, batch)" in text


def test_model_that_cannot_be_called_lists_attempts(xy) -> None:
    x, y = xy

    class NeedsFlag(nn.Module):
        def forward(self, x, *, flag):
            return x

    with pytest.raises(ModelCallError) as err:
        call_model(NeedsFlag(), (x, y), CallCache())
    assert "model(first)" in str(err.value) and "flag" in str(err.value)


def test_warning_guard_turns_shape_warnings_into_errors() -> None:
    def broadcasting():
        warnings.warn("Using a target size (torch.Size([4])) that is different to the input size", UserWarning)
        return 1.0

    with pytest.raises(LossShapeError, match="target size"):
        apply_loss_with_warning_guard(broadcasting)


def test_warning_guard_lets_other_warnings_through() -> None:
    def chatty(a, b=0):
        warnings.warn("something unrelated", DeprecationWarning)
        return a + b

    with pytest.warns(DeprecationWarning, match="unrelated"):
        assert apply_loss_with_warning_guard(chatty, 2, b=3) == 5


# ---------------------------------------------------------------------------------------------
# outputs, values, coercion


@dataclass
class DataclassOut:
    features: torch.Tensor
    logits: torch.Tensor


def test_ensure_tensor_output_shapes() -> None:
    a, b = torch.ones(2), torch.zeros(2)
    assert ensure_tensor_output(a) is a
    assert ensure_tensor_output((a, b)) is a
    assert ensure_tensor_output([[None, a], b]) is a
    assert ensure_tensor_output({"aux": a, "logits": b}) is b
    assert ensure_tensor_output({"loss": a, "out": b}) is b
    assert ensure_tensor_output(DataclassOut(a, b)) is b
    assert ensure_tensor_output(FakeModelOutput(loss=a, logits=b)) is b
    with pytest.raises(TypeError, match="NoneType"):
        ensure_tensor_output(None)


def test_extract_loss_value_forms() -> None:
    t = torch.tensor([1.0, 2.0])
    assert extract_loss_value(t) is t
    assert extract_loss_value({"loss": t, "other": torch.ones(1)}) is t
    assert extract_loss_value({"total": t}) is t
    assert extract_loss_value((t, {"log": 1})) is t
    assert extract_loss_value(2.5).item() == 2.5

    class HasLoss:
        loss = t

    assert extract_loss_value(HasLoss()) is t
    with pytest.raises(TypeError, match="without a 'loss' key"):
        extract_loss_value({"a": t, "b": t})
    with pytest.raises(TypeError, match="str"):
        extract_loss_value("nope")


def test_coerce_to_per_sample() -> None:
    assert torch.equal(coerce_to_per_sample(torch.tensor([1.0, 2.0, 3.0]), 3), torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(coerce_to_per_sample(torch.tensor([[1.0, 3.0], [5.0, 7.0]]), 2), torch.tensor([2.0, 6.0]))
    torch.testing.assert_close(coerce_to_per_sample(torch.arange(6.0), 2), torch.tensor([1.0, 4.0]))
    assert torch.equal(coerce_to_per_sample(torch.tensor(4.0), 1), torch.tensor([4.0]))
    assert coerce_to_per_sample(torch.tensor(4.0), 3) is None
    with pytest.raises(LossShapeError, match="shape \\(5,\\)"):
        coerce_to_per_sample(torch.ones(5), 2)
    with pytest.raises(ValueError, match="batch_size"):
        coerce_to_per_sample(torch.ones(2), 0)


# ---------------------------------------------------------------------------------------------
# candidates and batch helpers


def test_candidates_are_pruned_by_signature(xy) -> None:
    x, y = xy
    w = torch.ones(B)
    single = [c.describe() for c in model_input_candidates(MLP(), x, (y, w))]
    assert single == ["model(first)"]
    two = [c.describe() for c in model_input_candidates(TwoInputModel(), x, (y, w))]
    assert two == ["model(first, rest[0])"]

    class Varargs(nn.Module):
        def forward(self, *args):
            return args[0]

    assert [c.recipe.n_rest for c in model_input_candidates(Varargs(), x, (y, w))] == [0, 1, 2]
    kw = [c.describe() for c in model_input_candidates(KwargsModel(), {"input_ids": x, "attention_mask": w})]
    assert kw[0] == "model(**first)"


def test_split_batch_shapes(xy) -> None:
    x, y = xy
    assert split_batch(x) == (x, (), None)
    first, rest, targets = split_batch([x, y, 3])
    assert first is x and rest == (y, 3) and targets is y
    first, rest, targets = split_batch({"input_ids": x, "labels": y})
    assert first == {"input_ids": x} and rest == () and targets is y
    first, _, targets = split_batch(AttrBatch(x, y))
    assert first == {"inputs": x} and targets is y
    with pytest.raises(ValueError, match="empty batch"):
        split_batch(())
    with pytest.raises(ValueError, match="no input fields"):
        split_batch({"labels": y})


def test_batch_size_move_and_select(xy) -> None:
    x, y = xy
    batch = {"x": x, "meta": ["a", "b", "c", "d", "e"], "nt": PairNT(x, y), "obj": AttrBatch(x, y)}
    assert batch_size_of(batch) == B
    assert batch_size_of(["p", "q"]) == 2
    with pytest.raises(ValueError, match="batch size"):
        batch_size_of({"a": 1})
    moved = move_to_device(batch, "cpu")
    assert moved["x"] is x and isinstance(moved["nt"], PairNT) and isinstance(moved["obj"], AttrBatch)
    one = select_sample(batch, 2, B)
    assert torch.equal(one["x"], x[2:3]) and one["meta"] == ["c"]
    assert torch.equal(one["nt"].y, y[2:3]) and torch.equal(one["obj"].labels, y[2:3])
    assert batch["obj"].labels is y  # the original is not modified
    with pytest.raises(IndexError):
        select_sample(batch, B, B)
