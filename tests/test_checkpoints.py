"""Tests for the checkpoint file format: round trips, RNG, safe loading, the ring, the writer."""

from __future__ import annotations

import collections
import io
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from onthefly import checkpoints
from onthefly.checkpoints import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    CheckpointRing,
    CheckpointWriter,
    find_unloadable_value,
    load_checkpoint,
    read_meta,
    save_checkpoint,
    step_from_filename,
)
from onthefly.rng import capture_rng_state, restore_rng_state
from onthefly.snapshot import snapshot_to_host


class Opaque:
    """A class `weights_only` loading refuses."""


def make_training(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, object]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler


def train_steps(model: nn.Module, optimizer, scheduler, steps: int) -> None:
    model.train()
    for _ in range(steps):
        inputs = torch.randn(4, 6)
        loss = model(inputs).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def assert_same_state(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if ".tmp-" in p.name]


# ---------------------------------------------------------------- round trip and resume


def test_round_trip_resumes_bit_identically(tmp_path: Path) -> None:
    model, optimizer, scheduler = make_training()
    train_steps(model, optimizer, scheduler, 3)
    payload = snapshot_to_host(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": capture_rng_state(),
            "step": 3,
        }
    )
    path = save_checkpoint(tmp_path / "run" / "step-00000003.pt", payload, meta={"run": "a"})
    assert path == tmp_path / "run" / "step-00000003.pt"
    assert temp_files(path.parent) == []

    # Keep training the original: this is the uninterrupted run.
    train_steps(model, optimizer, scheduler, 4)

    loaded = load_checkpoint(path)
    assert loaded["format"] == FORMAT and loaded["version"] == FORMAT_VERSION
    assert loaded["meta"] == {"run": "a"} and loaded["step"] == 3
    assert_same_state(loaded["model"], payload["model"])

    resumed, resumed_opt, resumed_sched = make_training(seed=99)
    resumed.load_state_dict(loaded["model"])
    resumed_opt.load_state_dict(loaded["optimizer"])
    resumed_sched.load_state_dict(loaded["scheduler"])
    restore_rng_state(loaded["rng"])
    train_steps(resumed, resumed_opt, resumed_sched, 4)

    assert_same_state(resumed.state_dict(), model.state_dict())
    assert resumed_sched.get_last_lr() == scheduler.get_last_lr()


def test_checkpoint_loads_with_plain_weights_only_torch_load(tmp_path: Path) -> None:
    payload = {"model": {"w": torch.ones(3)}, "rng": capture_rng_state()}
    path = save_checkpoint(tmp_path / "a.pt", payload)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT
    assert torch.equal(raw["model"]["w"], torch.ones(3))
    assert len(raw["rng"]["python"]["state"]) == 625


def test_rng_restore_reproduces_python_numpy_torch(tmp_path: Path) -> None:
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's legacy state
    path = save_checkpoint(tmp_path / "rng.pt", {"rng": capture_rng_state()})
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    expected_gauss = np.random.standard_normal(2).tolist()

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    restore_rng_state(load_checkpoint(path)["rng"])
    got = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    assert got == expected
    assert np.random.standard_normal(2).tolist() == expected_gauss


def test_restore_rng_state_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="missing"):
        restore_rng_state({"python": {}})
    state = capture_rng_state()
    state["torch"] = torch.zeros(3)
    with pytest.raises(ValueError, match="'torch' must be a uint8 tensor"):
        restore_rng_state(state)
    state = capture_rng_state()
    state["extra"] = 1
    with pytest.raises(ValueError, match="unknown keys"):
        restore_rng_state(state)


def test_capture_rng_state_has_no_cuda_states_without_cuda() -> None:
    state = capture_rng_state()
    assert state["cuda"] == ([] if not torch.cuda.is_available() else state["cuda"])
    assert state["numpy"]["keys"].dtype == torch.int64
    assert state["numpy"]["keys"].shape == (624,)


# ---------------------------------------------------------------- snapshot_to_host


def test_snapshot_is_independent_and_keeps_structure() -> None:
    weight = nn.Parameter(torch.arange(4.0))
    tree = collections.OrderedDict(
        w=weight, nested={"list": [torch.zeros(2), 3, "x"], "tuple": (torch.ones(1), None)}
    )
    tree["again"] = weight
    copy = snapshot_to_host(tree)
    with torch.no_grad():
        weight.add_(100)
        tree["nested"]["list"][0].fill_(7)
    assert type(copy) is collections.OrderedDict
    assert torch.equal(copy["w"], torch.arange(4.0))
    assert not copy["w"].requires_grad and type(copy["w"]) is torch.Tensor
    assert torch.equal(copy["nested"]["list"][0], torch.zeros(2))
    assert copy["nested"]["list"][1:] == [3, "x"]
    assert isinstance(copy["nested"]["tuple"], tuple) and copy["nested"]["tuple"][1] is None
    assert copy["again"] is copy["w"]  # one tensor seen twice stays one tensor


def test_snapshot_keeps_defaultdict_and_namedtuple() -> None:
    Pair = collections.namedtuple("Pair", "a b")
    source = collections.defaultdict(list, {"k": Pair(torch.ones(1), 2)})
    copy = snapshot_to_host(source)
    assert isinstance(copy, collections.defaultdict) and copy.default_factory is list
    assert isinstance(copy["k"], Pair) and copy["k"].b == 2
    assert copy["k"].a is not source["k"].a


# ---------------------------------------------------------------- save validation and atomicity


def test_save_rejects_reserved_keys_and_unloadable_values(tmp_path: Path) -> None:
    target = tmp_path / "x.pt"
    with pytest.raises(CheckpointError, match="reserved key") as info:
        save_checkpoint(target, {"format": "mine"})
    assert str(target) in str(info.value)
    with pytest.raises(CheckpointError, match=r"\['extra'\]\['arr'\] is a numpy.ndarray") as info:
        save_checkpoint(target, {"extra": {"arr": np.zeros(2)}})
    assert str(target) in str(info.value)
    with pytest.raises(CheckpointError, match="payload must be a dict"):
        save_checkpoint(target, [1, 2])  # type: ignore[arg-type]
    assert not target.exists() and temp_files(tmp_path) == []


def test_find_unloadable_value_reports_the_key_path() -> None:
    assert find_unloadable_value({"a": [1, 2.0, "s", None, torch.ones(1), torch.Size([2])]}) is None
    assert find_unloadable_value({"a": [1, Opaque()]}) == (
        f"payload['a'][1] is a {__name__}.Opaque"
    )
    assert find_unloadable_value({Opaque(): 1}).startswith("a key of payload is a")


def test_failed_write_leaves_previous_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "step-00000001.pt"
    save_checkpoint(target, {"step": 1})

    def broken_write(handle) -> None:
        handle.write(b"partial bytes")
        raise OSError("disk full (simulated)")

    with pytest.raises(CheckpointError, match="disk full") as info:
        checkpoints.write_atomically(target, broken_write)
    assert str(target) in str(info.value)
    assert load_checkpoint(target)["step"] == 1
    assert temp_files(tmp_path) == []


def test_save_twice_same_path_replaces(tmp_path: Path) -> None:
    target = tmp_path / "a.pt"
    save_checkpoint(target, {"step": 1})
    save_checkpoint(target, {"step": 2})
    assert load_checkpoint(target)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]


def test_save_into_a_file_as_folder_fails_clearly(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(CheckpointError, match="cannot create its folder") as info:
        save_checkpoint(blocker / "x.pt", {"step": 1})
    assert str(blocker / "x.pt") in str(info.value)


# ---------------------------------------------------------------- safe loading


def write_raw(path: Path, obj: object) -> Path:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    path.write_bytes(buffer.getvalue())
    return path


@pytest.mark.parametrize(
    "kind, pattern",
    [
        ("missing", "no such file"),
        ("empty", "is empty"),
        ("truncated", "unreadable, truncated or corrupt"),
        ("random", "corrupt or not a torch checkpoint"),
        ("not_dict", "expected a dict at the top level, got list"),
        ("no_format", r"no 'format' key \(top-level keys: a, b\)"),
        ("foreign", "foreign format 'other.tool'"),
        ("newer", "format version 2, newer than"),
        ("bad_version", "invalid format version '1'"),
        ("unsafe", r"holds objects onthefly will not unpickle \(global [\w.]*Opaque\)"),
        ("folder", "is not a regular file"),
    ],
)
def test_bad_files_raise_checkpoint_error_naming_the_file(
    tmp_path: Path, kind: str, pattern: str
) -> None:
    path = tmp_path / f"{kind}.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        good = save_checkpoint(tmp_path / "good.pt", {"w": torch.randn(1000)})
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "not_dict":
        write_raw(path, [1, 2])
    elif kind == "no_format":
        write_raw(path, {"a": 1, "b": torch.ones(1)})
    elif kind == "foreign":
        write_raw(path, {"format": "other.tool", "version": 1, "meta": {}})
    elif kind == "newer":
        write_raw(path, {"format": FORMAT, "version": FORMAT_VERSION + 1, "meta": {}})
    elif kind == "bad_version":
        write_raw(path, {"format": FORMAT, "version": "1", "meta": {}})
    elif kind == "unsafe":
        write_raw(path, {"format": FORMAT, "version": 1, "meta": {}, "x": Opaque()})
    elif kind == "folder":
        path.mkdir()
    with pytest.raises(CheckpointError, match=pattern) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert info.value.path == path


def test_unsafe_file_is_never_unpickled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    path = write_raw(tmp_path / "u.pt", {"x": Opaque()})
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert calls == [True]


def test_lightning_checkpoint_is_returned_marked(tmp_path: Path) -> None:
    path = write_raw(
        tmp_path / "epoch=0.ckpt",
        {
            "state_dict": {"layer.weight": torch.ones(2)},
            "global_step": 7,
            "epoch": 1,
            "pytorch-lightning_version": "2.6.0",
        },
    )
    loaded = load_checkpoint(path)
    assert loaded["format"] == "lightning" and loaded["global_step"] == 7
    assert torch.equal(loaded["state_dict"]["layer.weight"], torch.ones(2))
    assert read_meta(path) == {"format": "lightning", "epoch": 1, "step": 7}


def test_lightning_checkpoint_with_objects_is_refused_with_advice(tmp_path: Path) -> None:
    path = write_raw(
        tmp_path / "hp.ckpt",
        {"state_dict": {}, "global_step": 1, "hyper_parameters": Opaque()},
    )
    with pytest.raises(CheckpointError, match="add_safe_globals") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert "weights_only=False" not in str(info.value) and "set to `False`" not in str(info.value)


class Payload:
    """Runs a shell command when unpickled: what a malicious checkpoint carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_naming_the_global_without_unsafe_advice(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = write_raw(tmp_path / "evil.pt", {"format": FORMAT, "version": 1, "meta": {}, "x": Payload(marker)})
    for load in (load_checkpoint, read_meta):
        with pytest.raises(CheckpointError) as info:
            load(path)
        message = str(info.value)
        assert message.startswith(f"checkpoint {path}: holds objects onthefly will not unpickle (global ")
        assert f"global {os.system.__module__}.system" in message  # posix.system (nt.system on Windows)
        assert "treat the file as malicious" in message
        assert "weights_only=True" in message
        assert "weights_only=False" not in message and "False" not in message
        assert "add_safe_globals" not in message  # never advise allowing os.system
    assert not marker.exists()


def test_rng_helpers_live_in_their_own_module_and_are_re_exported() -> None:
    from onthefly import rng

    assert checkpoints.capture_rng_state is rng.capture_rng_state
    assert checkpoints.restore_rng_state is rng.restore_rng_state
    state = rng.capture_rng_state()
    expected = [random.random(), float(np.random.rand()), float(torch.rand(1))]
    rng.restore_rng_state(state)
    assert [random.random(), float(np.random.rand()), float(torch.rand(1))] == expected


def test_read_meta_returns_meta_and_step(tmp_path: Path) -> None:
    path = save_checkpoint(
        tmp_path / "m.pt", {"step": 42, "model": {"w": torch.randn(64)}}, meta={"run": "r1"}
    )
    assert read_meta(path) == {"run": "r1", "step": 42}


# ---------------------------------------------------------------- the ring


def test_ring_names_and_lists_by_step(tmp_path: Path) -> None:
    ring = CheckpointRing(tmp_path / "ckpts", keep=3)
    assert ring.list() == [] and ring.latest() is None
    assert ring.path_for(120).name == "step-00000120.pt"
    assert step_from_filename("step-00000120.pt") == 120
    assert step_from_filename(".step-00000120.pt.tmp-1-ab") is None
    for step in (30, 10, 20):
        save_checkpoint(ring.path_for(step), {"step": step})
    (ring.directory / ".step-00000040.pt.tmp-123-abcd").write_bytes(b"half")
    (ring.directory / "notes.txt").write_text("x")
    infos = ring.list()
    assert [info.step for info in infos] == [10, 20, 30]
    assert all(info.size > 0 and info.created > 0 for info in infos)
    assert ring.latest().step == 30 and ring.latest().path == ring.path_for(30)


def test_ring_prunes_beyond_keep(tmp_path: Path) -> None:
    ring = CheckpointRing(tmp_path, keep=3)
    removed_all: list[Path] = []
    for step in range(0, 60, 10):
        removed_all += ring.register(save_checkpoint(ring.path_for(step), {"step": step}))
    assert [info.step for info in ring.list()] == [30, 40, 50]
    assert removed_all == [ring.path_for(0), ring.path_for(10), ring.path_for(20)]
    # Saving again at an existing step replaces it: no duplicate, nothing pruned.
    assert ring.register(save_checkpoint(ring.path_for(50), {"step": 50, "again": True})) == []
    assert [info.step for info in ring.list()] == [30, 40, 50]
    assert load_checkpoint(ring.path_for(50))["again"] is True


def test_ring_never_prunes_the_file_just_registered(tmp_path: Path) -> None:
    ring = CheckpointRing(tmp_path, keep=2)
    for step in (100, 200):
        ring.register(save_checkpoint(ring.path_for(step), {"step": step}))
    removed = ring.register(save_checkpoint(ring.path_for(50), {"step": 50}))
    assert removed == [ring.path_for(100)]
    assert [info.step for info in ring.list()] == [50, 200]


def test_ring_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep must be an int >= 1"):
        CheckpointRing(tmp_path, keep=0)
    ring = CheckpointRing(tmp_path / "r")
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        ring.path_for(-1)
    with pytest.raises(ValueError, match="not a ring checkpoint name"):
        ring.register(tmp_path / "r" / "model.pt")
    with pytest.raises(ValueError, match="not inside the ring folder"):
        ring.register(tmp_path / "step-00000001.pt")
    with pytest.raises(ValueError, match="does not exist"):
        ring.register(ring.path_for(1))


def test_clean_temp_files_removes_only_dead_writers(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=30)
    dead = tmp_path / f".step-00000010.pt.tmp-{child.pid}-0a1b2c3d"
    live = tmp_path / f".step-00000020.pt.tmp-{os.getpid()}-0a1b2c3d"
    dead.write_bytes(b"x")
    live.write_bytes(b"y")
    ring = CheckpointRing(tmp_path)
    assert ring.clean_temp_files() == 1
    assert not dead.exists() and live.exists()


# ---------------------------------------------------------------- the background writer


def test_writer_resolves_futures_and_registers(tmp_path: Path) -> None:
    ring = CheckpointRing(tmp_path, keep=2)
    with CheckpointWriter() as writer:
        futures = []
        for step in (1, 2, 3):
            future = writer.submit(ring.path_for(step), {"step": step}, meta={"s": step})
            future.add_done_callback(lambda done: ring.register(done.result()))
            futures.append(future)
        writer.flush(timeout=30)
        assert writer.pending == 0
        assert [f.result() for f in futures] == [ring.path_for(s) for s in (1, 2, 3)]
        assert writer._thread.name == "onthefly-ckpt-writer" and writer._thread.daemon
    assert [info.step for info in ring.list()] == [2, 3]
    assert read_meta(ring.path_for(3)) == {"s": 3, "step": 3}
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(ring.path_for(4), {"step": 4})


def test_writer_failure_sets_future_exception_and_thread_survives(tmp_path: Path) -> None:
    writer = CheckpointWriter()
    try:
        bad = writer.submit(tmp_path / "bad.pt", {"arr": np.zeros(3)})
        blocker = tmp_path / "blocker"
        blocker.write_text("x")
        unwritable = writer.submit(blocker / "x.pt", {"step": 1})
        good = writer.submit(tmp_path / "good.pt", {"step": 2})
        with pytest.raises(CheckpointError, match="numpy.ndarray") as info:
            bad.result(timeout=30)
        assert str(tmp_path / "bad.pt") in str(info.value)
        with pytest.raises(CheckpointError, match="cannot create its folder"):
            unwritable.result(timeout=30)
        assert good.result(timeout=30) == tmp_path / "good.pt"
        assert writer._thread.is_alive()
    finally:
        writer.close(timeout=30)
    assert not writer._thread.is_alive()


def test_submit_returns_before_the_write_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = threading.Event()
    release = threading.Event()
    real_save = checkpoints.save_checkpoint

    def slow_save(path, payload, *, meta=None):
        started.set()
        assert release.wait(timeout=30), "test never released the write"
        return real_save(path, payload, meta=meta)

    monkeypatch.setattr(checkpoints, "save_checkpoint", slow_save)
    target = tmp_path / "big.pt"
    writer = CheckpointWriter()
    try:
        future = writer.submit(target, {"w": torch.randn(256, 1024)})
        # submit came back while the writer is still inside the (held) write.
        assert started.wait(timeout=30)
        assert not future.done() and not target.exists() and writer.pending == 1
        with pytest.raises(TimeoutError, match="1 checkpoint write"):
            writer.flush(timeout=0.01)
        release.set()
        assert future.result(timeout=30) == target
    finally:
        release.set()
        writer.close(timeout=30)
    assert load_checkpoint(target)["w"].shape == (256, 1024)


def test_writer_refuses_flush_and_close_from_its_own_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hold the writer inside the write so the callback is attached before it completes and
    # therefore runs on the writer thread.
    release = threading.Event()
    real_save = checkpoints.save_checkpoint

    def held_save(path, payload, *, meta=None):
        assert release.wait(timeout=30)
        return real_save(path, payload, meta=meta)

    monkeypatch.setattr(checkpoints, "save_checkpoint", held_save)
    writer = CheckpointWriter()
    seen: list[str] = []

    def inside(done) -> None:
        for call in (writer.flush, writer.close):
            try:
                call(1)
            except RuntimeError as exc:
                seen.append(str(exc))

    future = writer.submit(tmp_path / "a.pt", {"step": 1})
    future.add_done_callback(inside)
    release.set()
    writer.close(timeout=30)
    assert future.result() == tmp_path / "a.pt"
    assert len(seen) == 2 and all("would deadlock" in text for text in seen)


def test_checkpoint_error_forms() -> None:
    error = CheckpointError(Path("/x/step-00000001.pt"), "is empty (0 bytes)")
    assert str(error) == "checkpoint /x/step-00000001.pt: is empty (0 bytes)"
    assert error.path == Path("/x/step-00000001.pt") and error.problem == "is empty (0 bytes)"
    whole = CheckpointError("/x/a.pt: no model is bound")
    assert str(whole) == "/x/a.pt: no model is bound" and whole.path is None
