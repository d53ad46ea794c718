"""The five health commands, driven over the in-memory wire on a real (small) training session."""

from __future__ import annotations

import hashlib
import threading

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from onthefly import Trainer
from onthefly.mixins.health.activations import activation_bounds, is_activation
from onthefly.mixins.health.common import evenly_spaced, upper_median
from onthefly.mixins.health.dist import metadata_hash

from .helpers import CountingLoss, MemoryDashboard, make_dataset, wait_until


def make_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 16), nn.BatchNorm1d(16),
                         nn.Tanh(), nn.Linear(16, 3))


class Run:
    """A session that trained one epoch and now serves the dashboard."""

    def __init__(self, tmp_path, *, policy: str = "user", train_loader: DataLoader | None = None,
                 val: bool = True, loss_fn: nn.Module | None = None, start: bool = True) -> None:
        self.trainer = Trainer(project="health", max_epochs=1, transport="memory", save_dir=str(tmp_path),
                               allowed_paths=(str(tmp_path),), serve_after_training=True)
        self.session = self.trainer.session
        self.session.channel.connect()
        self.dash = MemoryDashboard(self.session.channel)
        self.data = make_dataset(240)
        self.val_data = make_dataset(256, seed=3)
        self.model = make_net()
        self.loss_fn = loss_fn or CountingLoss()
        loader = train_loader or DataLoader(self.data, batch_size=16, shuffle=True)
        self.thread = threading.Thread(
            target=self.trainer.fit,
            kwargs=dict(model=self.model, optimizer=torch.optim.SGD(self.model.parameters(), lr=0.05),
                        loss_fn=self.loss_fn, train_loader=loader,
                        val_loader=DataLoader(self.val_data, batch_size=64) if val else None,
                        seed=0, data_order_policy=policy),
            daemon=True,
        )
        if start:
            self.train()

    def train(self) -> "Run":
        self.thread.start()
        wait_until(lambda: self.dash.events("trainingFinished"), 30, "training to finish")
        return self

    def request(self, cmd: str, payload: dict | None = None) -> dict:
        return self.dash.request(cmd, payload)

    def error(self, cmd: str, payload: dict | None = None) -> dict:
        reply = self.dash.reply(self.dash.send(cmd, payload))
        assert not reply["ok"], reply
        return reply

    def close(self) -> None:
        if self.thread.is_alive():
            self.dash.request("stop")
            self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture
def run(tmp_path):
    r = Run(tmp_path)
    yield r
    r.close()


def flags(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def no_hooks(model: nn.Module) -> bool:
    return all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in model.modules())


def header(run: Run, title: str) -> str:
    st = run.session.state
    return f"Run: baseline\nStep: {st.step} | Epoch: {st.epoch}\n{title}:"


# ---- helpers ------------------------------------------------------------------------------------
def test_evenly_spaced_and_upper_median():
    items = list("abcdefghij")
    assert evenly_spaced(items, 3) == ["a", "e", "j"]
    assert evenly_spaced(items, 1) == ["a"]
    assert evenly_spaced(items, 20) == items
    assert upper_median([3.0, 1.0]) == 3.0 and upper_median([5.0, 1.0, 3.0]) == 3.0 and upper_median([]) is None


class MySigmoid(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sigmoid()


class ReluBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(2, 2)


def test_activation_detection_and_saturation_bounds():
    assert is_activation(nn.SiLU()) and is_activation(MySigmoid())  # by type, and by a leaf's class name
    assert not is_activation(ReluBlock()) and not is_activation(nn.Linear(2, 2))  # containers are not activations
    assert activation_bounds(nn.Sigmoid()) == (0.0, 1.0) and activation_bounds(MySigmoid()) == (0.0, 1.0)
    assert activation_bounds(nn.Hardtanh(-2.0, 2.0)) == (-2.0, 2.0) and activation_bounds(nn.ReLU6()) == (None, 6.0)
    assert activation_bounds(nn.LogSigmoid()) is None and activation_bounds(nn.Tanhshrink()) is None
    assert activation_bounds(nn.ReLU()) is None


# ---- numerics_health ------------------------------------------------------------------------------
def test_numerics_health_finds_nan_param_inf_grad_and_amp_overflow(run):
    model, session = run.session.model, run.session
    clean = run.request("numerics_health")
    assert clean["ok"] is True and clean["problems"] == [] and clean["amp_overflow_sum"] is None
    assert clean["checked"] == {"params": 8, "grads": 8, "buffers": 3}
    assert clean["text"].startswith(header(run, "Numerics health"))

    with torch.no_grad():
        model[0].weight[2, 1] = float("nan")
        model[6].bias.grad[0] = float("inf")
        model[4].running_var[3] = float("inf")
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.ones(()))  # a scaler that has started scaling
    session.scaler = scaler
    try:
        sick = run.request("numerics_health", {"sample_layers": 25})
    finally:
        session.scaler = None
    problems = {(p["kind"], p["name"]): p for p in sick["problems"]}
    assert set(problems) == {("param", "0.weight"), ("grad", "6.bias"), ("buffer", "4.running_var")}
    assert problems[("param", "0.weight")] == {"kind": "param", "name": "0.weight", "has_nan": True,
                                               "has_inf": False, "nan_count": 1, "inf_count": 0, "numel": 256}
    assert problems[("grad", "6.bias")]["inf_count"] == 1 and not problems[("grad", "6.bias")]["has_nan"]
    assert sick["amp_overflow_sum"] == 1.0  # the scaler's own check saw the inf grad on the one device
    assert sick["ok"] is False
    assert len(scaler._per_optimizer_states) == 0  # the scaler's bookkeeping is as it was
    assert "param 0.weight: nan=1 inf=0 of 256" in sick["text"]

    # Sampling is by sorted name, first and last included, never by hash(): parameters 0.bias and
    # 6.weight, buffers 4.num_batches_tracked and 4.running_var.
    two = run.request("numerics_health", {"sample_layers": 2})
    assert two["checked"] == {"params": 2, "grads": 2, "buffers": 2}
    assert [(p["kind"], p["name"]) for p in two["problems"]] == [("buffer", "4.running_var")]

    bad = run.error("numerics_health", {"sample_layers": 0})
    assert bad["code"] == "bad_payload" and "sample_layers" in bad["error"]


# ---- activations_health ---------------------------------------------------------------------------
def test_activations_health_values_and_dead_relu(run):
    model = run.session.model
    model[2].eval()  # an unusual mix of flags must come back exactly
    before = flags(model)

    # Expected figures, computed by hand over the first two validation batches in eval mode.
    x = run.val_data.tensors[0][:128]
    with torch.no_grad():
        model.eval()
        relu = model[1](model[0](x))
        tanh = model[5](model[4](model[3](relu)))
    for m, f in zip(model.modules(), before):
        m.training = f

    reply = run.request("activations_health", {"budget_steps": 2, "topk": 10, "eps": 0.05})
    assert reply["budget_steps"] == 2 and reply["samples_seen"] == 128 and reply["source"] == "val"
    assert reply["total_layers"] == 2 and reply["text"].startswith(header(run, "Activations health"))
    rows = {r["layer"]: r for r in reply["top"]}
    assert rows["1"]["type"] == "ReLU" and rows["5"]["type"] == "Tanh"
    assert rows["1"]["zero_frac"] == pytest.approx((relu == 0).float().mean().item())
    assert rows["1"]["dead_frac"] == pytest.approx((relu == 0).all(dim=0).float().mean().item())
    assert rows["1"]["mean"] == pytest.approx(relu.mean().item(), rel=1e-5)
    assert rows["1"]["std"] == pytest.approx(relu.std(unbiased=False).item(), rel=1e-4)
    assert rows["5"]["sat_frac"] == pytest.approx(((tanh < -0.95) | (tanh > 0.95)).float().mean().item())
    assert rows["1"]["count"] == relu.numel() and rows["1"]["units"] == 32
    assert flags(model) == before and no_hooks(model)

    with torch.no_grad():
        saved_bias = model[0].bias.clone()
        model[0].bias.fill_(-1e3)  # every pre-activation of the ReLU is negative
    try:
        dead = run.request("activations_health", {"budget_steps": 1, "topk": 1})
    finally:
        with torch.no_grad():
            model[0].bias.copy_(saved_bias)
    assert dead["budget_steps"] == 1 and len(dead["top"]) == 1
    top = dead["top"][0]
    assert top["layer"] == "1" and top["dead_frac"] == 1.0 and top["zero_frac"] == 1.0 and top["score"] == 1.0
    assert dead["ok"] is False and dead["flagged"] == ["1"]
    assert flags(model) == before and no_hooks(model)

    bad = run.error("activations_health", {"topk": 0})
    assert bad["code"] == "bad_payload" and "topk" in bad["error"]


def test_activations_health_without_loaders_is_not_found_and_registers_nothing(run):
    s = run.session
    saved = s.val_loader, s.data.root_loader, s.data.loader
    s.val_loader = s.data.root_loader = s.data.loader = None
    try:
        reply = run.error("activations_health")
    finally:
        s.val_loader, s.data.root_loader, s.data.loader = saved
    assert reply["code"] == "not_found" and "loader" in reply["error"]
    assert no_hooks(s.model)
    # No validation loader: the training data is probed instead.
    s.val_loader = None
    try:
        reply = run.request("activations_health", {"budget_steps": 3})
    finally:
        s.val_loader = saved[0]
    assert reply["source"] == "train" and reply["budget_steps"] == 3 and reply["samples_seen"] == 48

    # A forward that fails mid-probe: the error reaches the dashboard, hooks and flags do not linger.
    before = flags(s.model)
    s.val_loader = DataLoader(TensorDataset(torch.randn(8, 5), torch.zeros(8, dtype=torch.long)), batch_size=4)
    try:
        failed = run.error("activations_health")
    finally:
        s.val_loader = saved[0]
    assert failed["code"] == "failed" and "activations_health" in failed["error"]
    assert no_hooks(s.model) and flags(s.model) == before and not s.gate.paused


# ---- throughput_health ----------------------------------------------------------------------------
def test_throughput_health_times_forward_and_real_backward_leaving_grads(run):
    model = run.session.model
    model[0].bias.grad = None  # a parameter without a grad must stay without one
    params = list(model.parameters())
    grads = [p.grad for p in params]
    values = [g.clone() if g is not None else None for g in grads]
    before = flags(model)
    rng = torch.get_rng_state()
    calls = run.loss_fn.calls
    backward_hits = []
    handle = model[6].weight.register_hook(lambda g: backward_hits.append(g.abs().sum().item()))
    try:
        reply = run.request("throughput_health", {"budget_steps": 3, "micro_backward": True})
    finally:
        handle.remove()
    assert reply["steps_probed"] == 3 and reply["samples_seen"] == 192 and reply["backward_steps"] == 3
    assert reply["forward_batch_ms_med"] > 0 and reply["forward_only_ms_per_sample_med"] > 0
    assert reply["backward_batch_ms_med"] > 0 and reply["train_step_ms_med"] >= reply["backward_batch_ms_med"]
    assert reply["samples_per_s"] > 0 and reply["notes"] == []
    assert run.loss_fn.calls == calls + 3 and len(backward_hits) == 3 and all(h > 0 for h in backward_hits)
    for p, g, v in zip(params, grads, values):
        assert p.grad is g  # the very same tensor objects
        if v is not None:
            assert torch.equal(p.grad, v)
    assert model[0].bias.grad is None
    assert flags(model) == before and torch.equal(torch.get_rng_state(), rng)
    assert reply["text"].startswith(header(run, "Throughput health"))
    assert "forward+loss+backward" in reply["text"]

    forward_only = run.request("throughput_health", {})
    assert forward_only["steps_probed"] == 2 and forward_only["backward_batch_ms_med"] is None


def test_throughput_on_train_loader_keeps_its_generator(tmp_path):
    gen = torch.Generator().manual_seed(7)
    loader = DataLoader(make_dataset(240), batch_size=16, shuffle=True, generator=gen)
    r = Run(tmp_path, train_loader=loader, val=False)
    try:
        state = gen.get_state()
        reply = r.request("throughput_health", {"budget_steps": 2})
        assert reply["source"] == "train" and reply["steps_probed"] == 2
        assert torch.equal(gen.get_state(), state)
    finally:
        r.close()


# ---- determinism_health ---------------------------------------------------------------------------
def test_determinism_health_user_policy_shuffled_without_generator(run):
    s = run.session
    reply = run.request("determinism_health")
    assert reply["ok"] is True and reply["handled"] is True
    assert reply["data_order_policy"] == "user" and reply["effective_policy"] == "user"
    assert reply["session_managed"] is False and reply["train_sampler"] == "RandomSampler"
    assert reply["train_sampler_is_ours"] is False and reply["train_sampler_state"] is None
    assert reply["base_seed"] == 0 and reply["batch_cursor"] == s.state.batch_in_epoch
    assert reply["epoch"] == s.state.epoch == 1
    assert reply["torch_rng_len"] == torch.get_rng_state().numel() and reply["numpy_state_len"] == 624
    assert reply["deterministic_algorithms"] == torch.are_deterministic_algorithms_enabled()
    assert reply["cudnn"]["benchmark"] == torch.backends.cudnn.benchmark
    assert any("records the RNG state at each epoch start" in n for n in reply["notes"])
    assert reply["text"].startswith(header(run, "Determinism health"))

    # Already paused: the probe runs inside that pause and leaves the run paused.
    run.request("pause")
    again = run.request("determinism_health")
    assert again["ok"] is True and s.gate.paused
    run.request("resume")
    assert not s.gate.paused


def test_determinism_health_epoch_reseed_reports_our_sampler_without_touching_it(tmp_path):
    r = Run(tmp_path, policy="epoch_reseed")
    try:
        sampler = r.session.train_loader.sampler
        state = sampler.state_dict()
        reply = r.request("determinism_health")
        assert reply["ok"] is True and reply["effective_policy"] == "epoch_reseed"
        assert reply["train_sampler_is_ours"] is True and reply["session_managed"] is True
        assert reply["train_sampler"] == "EpochSeededRandomSampler"
        assert reply["train_sampler_state"] == state and sampler.state_dict() == state
        assert reply["train_sampler_has_state"] is True and reply["val_sampler_has_state"] is False
    finally:
        r.close()


def test_determinism_health_flags_a_sampler_with_its_own_generator(tmp_path):
    data = make_dataset(240)
    own = torch.Generator().manual_seed(5)
    loader = DataLoader(data, batch_size=16, sampler=RandomSampler(data, generator=own))
    r = Run(tmp_path, train_loader=loader)
    try:
        state = own.get_state()
        reply = r.request("determinism_health")
        assert reply["ok"] is False and reply["handled"] is False
        assert any("RandomSampler draws from its own torch.Generator" in n for n in reply["notes"])
        assert "bit-exact resume: NO" in reply["text"]
        assert torch.equal(own.get_state(), state)
    finally:
        r.close()


# ---- dist_health ----------------------------------------------------------------------------------
def test_dist_health_not_distributed(run):
    reply = run.request("dist_health", {"require_all_ranks": False, "sample_weights": 0})
    text = reply.pop("text")
    assert reply == {"is_distributed": False, "distributed": False, "fsdp": False, "backend": None,
                     "world_size": 1, "rank": 0, "ok": True,
                     "notes": ["torch.distributed not initialized; skipping parity checks"]}
    assert text.startswith(header(run, "Distributed health"))
    pauses = [e for e in run.dash.events("paused") if e["request"].get("check") == "dist_health"]
    assert len(pauses) == 1 and not run.session.gate.paused


def test_dist_health_single_process_gloo_group(run, tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = run.session.model
        reply = run.request("dist_health", {"require_all_ranks": True, "sample_weights": 2})
        assert reply["is_distributed"] is True and reply["backend"] == "gloo"
        assert reply["world_size"] == 1 and reply["rank"] == 0 and reply["ok"] is None
        records = [f"P|{n}|{tuple(p.shape)}|{p.dtype}\n" for n, p in sorted(model.named_parameters())]
        records += [f"B|{n}|{tuple(b.shape)}|{b.dtype}\n" for n, b in sorted(model.named_buffers())]
        assert reply["metadata_hash"] == hashlib.sha256("".join(records).encode()).hexdigest()
        assert reply["metadata_hash"] == metadata_hash(model)
        assert reply["sampled_weights"] == ["0.bias", "6.weight"]
        assert any("no collective was issued" in n for n in reply["notes"])
        assert any("require_all_ranks" in n for n in reply["notes"])
        again = run.request("dist_health", {"sample_weights": 2})
        assert again["weights_hash"] == reply["weights_hash"]
        with torch.no_grad():
            model[6].weight[0, 0] += 1.0
        changed = run.request("dist_health", {"sample_weights": 2})
        assert changed["weights_hash"] != reply["weights_hash"]
        assert changed["metadata_hash"] == reply["metadata_hash"]
    finally:
        dist.destroy_process_group()


# ---- the run itself ---------------------------------------------------------------------------------
def test_checks_mid_training_leave_the_run_bit_identical(tmp_path):
    def final_weights(path, with_checks: bool) -> dict[str, torch.Tensor]:
        holder: dict[str, Run] = {}
        checks = [("numerics_health", {}), ("activations_health", {"budget_steps": 2}),
                  ("throughput_health", {"budget_steps": 2, "micro_backward": True}),
                  ("determinism_health", {}), ("dist_health", {"sample_weights": 3})]

        def send_checks() -> None:  # on the training thread, inside step 5
            r = holder["run"]
            for cmd, payload in checks:
                r.dash.send(cmd, payload, rid=f"mid-{cmd}")
            wait_until(lambda: r.session.gate.queued >= len(checks), 10, "checks queued at the gate")

        loss = CountingLoss(at_call=5, action=send_checks if with_checks else None)
        path.mkdir()
        r = holder["run"] = Run(path, loss_fn=loss, start=False)
        try:
            r.train()
            if with_checks:
                for cmd, _ in checks:
                    reply = r.dash.reply(f"mid-{cmd}")
                    assert reply["ok"], reply
                    assert "\nStep: 5 | Epoch: 0\n" in reply["data"]["text"]
            return {k: v.detach().clone() for k, v in r.session.model.state_dict().items()}
        finally:
            r.close()

    plain = final_weights(tmp_path / "plain", False)
    checked = final_weights(tmp_path / "checked", True)
    assert plain.keys() == checked.keys()
    for k in plain:
        assert torch.equal(plain[k], checked[k]), f"{k} differs after health checks mid-training"
