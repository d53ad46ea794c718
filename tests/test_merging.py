"""Tests for onthefly.merging: every strategy against values worked out by hand."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onthefly.merging import (
    STRATEGIES,
    MergeError,
    adapter_merge,
    check_compatible,
    distill_merge,
    estimate_fisher,
    fisher_merge,
    merge_state_dicts,
    resolve_strategy,
    swa_merge,
    task_arithmetic_merge,
    ties_merge,
)


def t(*values: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-6) -> None:
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def snapshot(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sd.items()}


def bn_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def run_batches(model: nn.Module, count: int) -> None:
    """Update BatchNorm statistics `count` times so num_batches_tracked == count."""
    model.train()
    gen = torch.Generator().manual_seed(count)
    with torch.no_grad():
        for _ in range(count):
            model(torch.randn(8, 3, generator=gen))


def classifier(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def toy_data(n: int = 64, batch: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(n, 4, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


# --------------------------------------------------------------------------------------------
# SWA and the shared rules


def test_swa_is_the_mean_of_two_dicts():
    a = {"w": t(1, 2, 3), "b": t(-1)}
    b = {"w": t(3, 6, -1), "b": t(5)}
    out = swa_merge([a, b])
    assert_close(out["w"], t(2, 4, 1))
    assert_close(out["b"], t(2))


def test_swa_weighted_normalises_weights():
    a = {"w": t(1, 2, 3)}
    b = {"w": t(3, 6, -1)}
    out = swa_merge([a, b], weights=[1, 3])  # 0.25 * a + 0.75 * b
    assert_close(out["w"], t(2.5, 5, 0))


@pytest.mark.parametrize(
    "weights, needle",
    [([1.0], "got 1 weights for 2"), ([-1.0, 2.0], "weights[0]"), ([0, 0], "sum to zero"),
     ([float("nan"), 1.0], "weights[0]"), (["a", 1.0], "weights[0] must be a number")],
)
def test_swa_rejects_bad_weights(weights, needle):
    with pytest.raises(MergeError, match=re.escape(needle)):
        swa_merge([{"w": t(1)}, {"w": t(2)}], weights=weights)


def test_inputs_are_not_mutated_and_results_are_new_tensors():
    a = {"w": t(1, 2), "n": torch.tensor(3)}
    b = {"w": t(3, 4), "n": torch.tensor(1)}
    before = [snapshot(a), snapshot(b)]
    outs = [
        swa_merge([a, b]),
        swa_merge([a]),
        fisher_merge([a, b], [{"w": t(1, 0)}, {"w": t(0, 0)}]),
        task_arithmetic_merge(a, [b]),
        ties_merge(a, [b], density=1.0),
    ]
    for sd, saved in zip([a, b], before):
        for key in sd:
            assert torch.equal(sd[key], saved[key])
    inputs = {v.data_ptr() for sd in (a, b) for v in sd.values()}
    for out in outs:
        for value in out.values():
            assert value.data_ptr() not in inputs
    out = swa_merge([a])
    out["w"].add_(100.0)
    assert torch.equal(a["w"], t(1, 2))


def test_float16_is_merged_in_float32_and_cast_back():
    a = {"w": torch.tensor([1.0, 2049.0], dtype=torch.float16)}
    b = {"w": torch.tensor([1.0009765625, 2051.0], dtype=torch.float16)}
    out = swa_merge([a, b])
    assert out["w"].dtype == torch.float16
    expected = ((a["w"].float() + b["w"].float()) / 2).half()
    assert torch.equal(out["w"], expected)


def test_float64_is_merged_in_float64():
    a = {"w": torch.tensor([1.0 + 1e-12], dtype=torch.float64)}
    b = {"w": torch.tensor([1.0], dtype=torch.float64)}
    out = swa_merge([a, b])
    assert out["w"].dtype == torch.float64
    assert abs(out["w"].item() - (1.0 + 5e-13)) < 1e-20


def test_integer_buffers_take_the_max_and_bools_the_first_parent():
    a = {"n": torch.tensor(5), "c": torch.tensor([1, 7], dtype=torch.int32), "m": torch.tensor([True, False])}
    b = {"n": torch.tensor(9), "c": torch.tensor([4, 2], dtype=torch.int32), "m": torch.tensor([False, True])}
    for out in (swa_merge([a, b]), adapter_merge([a, b], pattern="n|c|m"), fisher_merge([a, b], [{}, {}])):
        assert out["n"].dtype == torch.int64 and out["n"].item() == 9
        assert out["c"].dtype == torch.int32 and out["c"].tolist() == [4, 7]
        assert out["m"].dtype == torch.bool and out["m"].tolist() == [True, False]


@pytest.mark.parametrize("strategy", ["swa", "fisher", "task_arithmetic", "ties"])
def test_batchnorm_merge_keeps_num_batches_tracked_integer(strategy):
    base, p1, p2 = bn_model(0), bn_model(1), bn_model(2)
    run_batches(p1, 5)
    run_batches(p2, 9)
    sds = [p1.state_dict(), p2.state_dict()]
    kwargs: dict = {}
    if strategy in ("task_arithmetic", "ties"):
        kwargs["base"] = base.state_dict()
    if strategy == "fisher":
        kwargs["fishers"] = [{}, {}]
    out = merge_state_dicts(strategy, sds, **kwargs)
    counter = out["1.num_batches_tracked"]
    assert counter.dtype == torch.int64
    assert counter.item() == 9
    if strategy in ("swa", "fisher"):
        expected = (sds[0]["1.running_mean"] + sds[1]["1.running_mean"]) / 2
        assert_close(out["1.running_mean"], expected)
    merged = bn_model(3)
    merged.load_state_dict(out, strict=True)


def test_mismatched_keys_raise_naming_the_key():
    a = {"w": t(1), "extra.bias": t(2)}
    b = {"w": t(1)}
    with pytest.raises(MergeError, match="'extra.bias'"):
        check_compatible([a, b])
    with pytest.raises(MergeError, match="'extra.bias'"):
        check_compatible([b, a])
    with pytest.raises(MergeError, match="'extra.bias'"):
        swa_merge([a, b])


def test_mismatched_shapes_raise_naming_key_and_both_shapes():
    a = {"layer.weight": torch.zeros(2, 3)}
    b = {"layer.weight": torch.zeros(3, 2)}
    with pytest.raises(MergeError) as info:
        swa_merge([a, b])
    message = str(info.value)
    assert "'layer.weight'" in message and "(2, 3)" in message and "(3, 2)" in message
    with pytest.raises(MergeError, match="'layer.weight'.*base"):
        task_arithmetic_merge(a, [b])


def test_mismatched_dtypes_empty_input_and_wrong_types_raise():
    with pytest.raises(MergeError, match="'w': dtype torch.float32.*torch.float64"):
        swa_merge([{"w": t(1)}, {"w": t(1, dtype=torch.float64)}])
    with pytest.raises(MergeError, match="empty"):
        swa_merge([])
    with pytest.raises(MergeError, match="single mapping"):
        swa_merge({"w": t(1)})
    with pytest.raises(MergeError, match="'w'.*not a tensor"):
        swa_merge([{"w": [1.0]}])
    with pytest.raises(MergeError, match="'z'.*complex"):
        swa_merge([{"z": torch.zeros(2, dtype=torch.complex64)}])


# --------------------------------------------------------------------------------------------
# Fisher


def test_fisher_merge_by_hand():
    a = {"w": t(1, 2, 3, 4)}
    b = {"w": t(5, 6, 7, 8)}
    fa = {"w": t(0, 1, 0, 3)}
    fb = {"w": t(2, 0, 0, 1)}
    out = fisher_merge([a, b], [fa, fb])
    # elem 0: only b informed -> 5; elem 1: only a -> 2; elem 2: none -> mean 5;
    # elem 3: (3*4 + 1*8) / 4 = 5
    assert_close(out["w"], t(5, 2, 5, 5))


def test_fisher_merge_is_scale_free_and_missing_entries_mean_uniform():
    a = {"w": t(1, 2, 3, 4), "v": t(0, 10)}
    b = {"w": t(5, 6, 7, 8), "v": t(4, 20)}
    fa = {"w": t(0, 1, 0, 3) * 1e-12, "v": t(1, 1)}
    fb = {"w": t(2, 0, 0, 1) * 1e-12}
    out = fisher_merge([a, b], [fa, fb])
    assert_close(out["w"], t(5, 2, 5, 5))
    assert_close(out["v"], t(2, 15))  # fb has no "v": plain mean


def test_fisher_merge_rejects_bad_fishers():
    a, b = {"w": t(1, 2)}, {"w": t(3, 4)}
    with pytest.raises(MergeError, match="got 1 Fisher dicts for 2"):
        fisher_merge([a, b], [{"w": t(1, 1)}])
    with pytest.raises(MergeError, match="negative"):
        fisher_merge([a, b], [{"w": t(1, -1)}, {}])
    with pytest.raises(MergeError, match="'w'.*\\(2,\\).*\\(3,\\)"):
        fisher_merge([a, b], [{"w": t(1, 1, 1)}, {}])
    with pytest.raises(MergeError, match="'nope'"):
        fisher_merge([a, b], [{"nope": t(1)}, {}])
    with pytest.raises(MergeError, match="NaN"):
        fisher_merge([a, b], [{"w": t(float("nan"), 1)}, {}])


def test_estimate_fisher_matches_hand_computed_squared_gradients():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.5)
    batches = [
        (t(1, 2).reshape(2, 1), t(1, 0).reshape(2, 1)),
        (t(-1, 3).reshape(2, 1), t(2, 1).reshape(2, 1)),
        (t(100).reshape(1, 1), t(0).reshape(1, 1)),  # beyond max_batches: must be ignored
    ]
    fisher = estimate_fisher(model, batches, F.mse_loss, max_batches=2)
    # loss = mean((w x - y)^2) -> grad = mean(2 (w x - y) x)
    # batch 1: x=(1,2), y=(1,0): residuals (-0.5, 1) -> grad = (2*-0.5*1 + 2*1*2) / 2 = 1.5
    # batch 2: x=(-1,3), y=(2,1): residuals (-2.5, 0.5) -> grad = (2*-2.5*-1 + 2*0.5*3) / 2 = 4
    expected = (1.5**2 + 4.0**2) / 2
    assert set(fisher) == {"weight"}
    assert_close(fisher["weight"], torch.tensor([[expected]]))


def test_estimate_fisher_keys_modes_grads_and_buffers():
    model = bn_model(0)
    run_batches(model, 2)
    model.train()
    model[1].eval()  # a per-module flag that must survive
    frozen = model[3].bias
    frozen.requires_grad_(False)
    sentinel = torch.full_like(model[0].weight, 7.0)
    model[0].weight.grad = sentinel
    buffers_before = {k: v.clone() for k, v in model.named_buffers()}

    data = [(x, (y > 0).long()) for x, y in ((torch.randn(8, 3), torch.randn(8)) for _ in range(3))]
    fisher = estimate_fisher(model, data, F.cross_entropy)

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(fisher) == trainable
    assert "3.bias" not in fisher and "1.running_mean" not in fisher
    for key, value in fisher.items():
        assert value.shape == model.state_dict()[key].shape
        assert bool((value >= 0).all())
    assert sum(float(v.sum()) for v in fisher.values()) > 0
    assert model.training and model[0].training and not model[1].training
    assert model[0].weight.grad is sentinel and torch.equal(sentinel, torch.full_like(sentinel, 7.0))
    assert model[0].bias.grad is None
    for key, value in model.named_buffers():
        assert torch.equal(value, buffers_before[key])


def test_estimate_fisher_covers_tied_parameters_and_custom_forward():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Linear(2, 2, bias=False)
            self.dec = nn.Linear(2, 2, bias=False)
            self.dec.weight = self.enc.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dec(self.enc(x))

    torch.manual_seed(0)
    model = Tied()
    data = [{"inputs": torch.randn(4, 2)} for _ in range(2)]
    fisher = estimate_fisher(
        model, data, None, forward=lambda m, batch: (m(batch["inputs"]) ** 2).mean()
    )
    assert set(fisher) == {"enc.weight", "dec.weight"}
    assert torch.equal(fisher["enc.weight"], fisher["dec.weight"])
    with pytest.raises(MergeError, match="\\(x, y\\)"):
        estimate_fisher(model, data, F.mse_loss)
    with pytest.raises(MergeError, match="no batches"):
        estimate_fisher(model, [], F.mse_loss)


def test_fisher_merge_with_estimated_fishers_differs_from_swa():
    data = toy_data()
    parents = [classifier(1), classifier(2)]
    fishers = [estimate_fisher(m, data, F.cross_entropy) for m in parents]
    sds = [m.state_dict() for m in parents]
    fisher_out = fisher_merge(sds, fishers)
    swa_out = swa_merge(sds)
    biggest = max(float((fisher_out[k] - swa_out[k]).abs().max()) for k in swa_out)
    assert biggest > 1e-3
    via_data = merge_state_dicts(
        "fisher_soup", sds, model_factory=lambda: classifier(9), loader=data, loss_fn=F.cross_entropy
    )
    for key in fisher_out:
        assert torch.equal(via_data[key], fisher_out[key])


# --------------------------------------------------------------------------------------------
# Adapter, task arithmetic, TIES


def test_adapter_merge_only_changes_adapter_keys():
    a = {"backbone.weight": t(1, 2), "block.adapter.down": t(0, 4), "block.LoRA_A": t(2)}
    b = {"backbone.weight": t(9, 9), "block.adapter.down": t(2, 0), "block.LoRA_A": t(4)}
    a["n"], b["n"] = torch.tensor(3), torch.tensor(8)
    out = adapter_merge([a, b])
    assert_close(out["backbone.weight"], t(1, 2))
    assert_close(out["block.adapter.down"], t(1, 2))
    assert_close(out["block.LoRA_A"], t(3))
    assert out["n"].item() == 3  # not an adapter key: copied from the first parent
    weighted = adapter_merge([a, b], pattern="adapter", weights=[3, 1])
    assert_close(weighted["block.adapter.down"], t(0.5, 3))
    assert_close(weighted["block.LoRA_A"], t(2))
    with pytest.raises(MergeError, match="no key matches"):
        adapter_merge([a, b], pattern="prefix_tuning")
    with pytest.raises(MergeError, match="not a valid regular expression"):
        adapter_merge([a, b], pattern="(")


def test_task_arithmetic_by_hand():
    base = {"w": t(1, 1, 1)}
    p1 = {"w": t(2, 1, 0)}  # tau = ( 1, 0, -1)
    p2 = {"w": t(1, 3, 1)}  # tau = ( 0, 2,  0)
    out = task_arithmetic_merge(base, [p1, p2], scale=0.5)
    assert_close(out["w"], t(1.5, 2, 0.5))
    assert_close(task_arithmetic_merge(base, [p1, p2])["w"], t(2, 3, 0))


def test_ties_by_hand():
    base = {"w": torch.ones(6)}
    taus = [t(3, -1, 2, 0.5, -4, 0.1), t(-2, 1.5, 1, -3, -5, 0.2), t(1, -0.5, -6, 0.3, 2, 0.4)]
    parents = [{"w": base["w"] + tau} for tau in taus]
    out = ties_merge(base, parents, density=0.5, scale=2.0)
    # top 3 by magnitude: [3,0,2,0,-4,0], [-2,0,0,-3,-5,0], [1,0,-6,0,2,0]
    # sum [2,0,-4,-3,-7,0] -> elected signs [+,0,-,-,-,0]
    # agreeing means [(3+1)/2, 0, -6, -3, (-4-5)/2, 0] = [2,0,-6,-3,-4.5,0]
    assert_close(out["w"], t(1, 1, 1, 1, 1, 1) + 2 * t(2, 0, -6, -3, -4.5, 0))


def test_ties_trim_breaks_ties_by_position_and_density_one_single_parent_is_task_arithmetic():
    base = {"w": torch.zeros(3)}
    out = ties_merge(base, [{"w": t(2, -2, 1)}], density=1 / 3)
    assert_close(out["w"], t(2, 0, 0))
    parent = {"w": t(0.5, -1.5, 2.5)}
    assert_close(ties_merge(base, [parent], density=1.0, scale=0.7)["w"],
                 task_arithmetic_merge(base, [parent], scale=0.7)["w"])
    with pytest.raises(MergeError, match="density"):
        ties_merge(base, [parent], density=0.0)


# --------------------------------------------------------------------------------------------
# Distillation


def teacher_kl(student: nn.Module, teachers: list[nn.Module], data, temperature: float) -> float:
    total = 0.0
    with torch.no_grad():
        for x, _ in data:
            p_t = torch.stack([F.softmax(m(x) / temperature, dim=1) for m in teachers]).mean(0)
            log_s = F.log_softmax(student(x) / temperature, dim=1)
            total += float(F.kl_div(log_s, p_t, reduction="batchmean"))
    return total / len(data)


def test_distill_reduces_kl_to_the_teachers_mean_and_leaves_teachers_alone():
    data = toy_data()
    teachers = [classifier(1), classifier(2)]
    teacher_states = [snapshot(m.state_dict()) for m in teachers]
    student = classifier(3)
    student[1].eval()  # a per-module flag that must survive
    student.load_state_dict(swa_merge([m.state_dict() for m in teachers]))
    before = teacher_kl(student, teachers, data, 2.0)
    rng_before = torch.get_rng_state()

    out = distill_merge(student, teachers, data, steps=60, lr=1e-2, temperature=2.0)

    after = teacher_kl(student, teachers, data, 2.0)
    assert after < 0.5 * before, (before, after)
    assert torch.equal(torch.get_rng_state(), rng_before)
    for key, value in student.state_dict().items():
        assert torch.equal(out[key], value)
    for teacher, saved in zip(teachers, teacher_states):
        for key, value in teacher.state_dict().items():
            assert torch.equal(value, saved[key])
        assert all(p.grad is None for p in teacher.parameters())
    assert teachers[0].training and teachers[1].training  # put in eval for distillation, then restored
    assert student.training and not student[1].training
    assert all(p.grad is None for p in student.parameters())


def test_distill_is_deterministic_for_a_seed_and_dispatch_matches():
    data = toy_data()
    teachers = [classifier(1), classifier(2)]
    sds = [m.state_dict() for m in teachers]

    def run(seed: int) -> dict[str, torch.Tensor]:
        student = classifier(5)
        student.load_state_dict(swa_merge(sds))
        return distill_merge(student, teachers, data, steps=10, lr=1e-2, seed=seed)

    first, second = run(7), run(7)
    assert all(torch.equal(first[k], second[k]) for k in first)
    via_dispatch = merge_state_dicts(
        "distillation", sds, model_factory=lambda: classifier(11), loader=data, steps=10, lr=1e-2, seed=7
    )
    assert all(torch.equal(first[k], via_dispatch[k]) for k in first)


def test_distill_regression_uses_mse_to_teachers_mean():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(32, 3, generator=gen)
    data = [(x[i : i + 8], torch.randn(8, 1, generator=gen)) for i in range(0, 32, 8)]
    torch.manual_seed(1)
    teachers = [nn.Linear(3, 1), nn.Linear(3, 1)]
    student = nn.Linear(3, 1)

    def mse() -> float:
        with torch.no_grad():
            target = (teachers[0](x) + teachers[1](x)) / 2
            return float(F.mse_loss(student(x), target))

    before = mse()
    distill_merge(student, teachers, data, steps=80, lr=5e-2)
    assert mse() < 0.2 * before
    with pytest.raises(MergeError, match="no batches"):
        distill_merge(student, teachers, [], steps=2)
    with pytest.raises(MergeError, match="temperature"):
        distill_merge(student, teachers, data, temperature=0.0)
    with pytest.raises(MergeError, match="classes >= 2"):
        distill_merge(student, teachers, data, steps=2, task="classification")
    with pytest.raises(MergeError, match="teachers\\[1\\] output shape \\(8, 2\\)"):
        distill_merge(student, [teachers[0], nn.Linear(3, 2)], data, steps=2)


# --------------------------------------------------------------------------------------------
# Dispatch


def test_dispatch_by_name_and_unknown_strategy_lists_strategies():
    a, b = {"w": t(1, 2)}, {"w": t(3, 4)}
    assert_close(merge_state_dicts(" SWA ", [a, b])["w"], t(2, 3))
    assert_close(merge_state_dicts("task_arithmetic", [b], base=a, scale=0.5)["w"], t(2, 3))
    assert resolve_strategy("adapter_fuse") == "adapter"
    with pytest.raises(MergeError) as info:
        merge_state_dicts("average", [a, b])
    for name in STRATEGIES:
        assert name in str(info.value)
    with pytest.raises(MergeError, match="does not take density"):
        merge_state_dicts("swa", [a, b], density=0.5)
    with pytest.raises(MergeError, match="needs base"):
        merge_state_dicts("ties", [a, b])
    with pytest.raises(MergeError, match="fishers="):
        merge_state_dicts("fisher", [a, b])
