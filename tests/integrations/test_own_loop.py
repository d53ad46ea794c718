"""onthefly.attach in a hand-written loop: pause/test/save/resume are bit-exact, commands run between steps."""

from __future__ import annotations

import multiprocessing
import threading

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import onthefly
from onthefly.checkpoints import load_checkpoint
from onthefly.session.external import LossFunctionModule

from .helpers import (
    Driver,
    assert_same_weights,
    dashboard,
    events,
    make_dataset,
    make_loaders,
    make_net,
    pause_script,
    seed_all,
    wait_until,
    weights,
)


def own_loop(tmp_path, server, *, workers=0, epochs=2, at_step=None, script=None, loss_fn=None,
             landed=lambda session: session.gate.pending, **settings):
    """Train with the two-line API; at `at_step`, start `script` on the dashboard and wait until it `landed`."""
    seed_all(7)
    model = make_net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train, test = make_loaders(workers)
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    session = onthefly.attach(model=model, optimizer=opt, loss_fn=loss_fn, train_loader=train, test_loader=test,
                              log_every_n_steps=1, project="own", transport="tcp", dashboard_port=server.port,
                              save_dir=str(tmp_path), **settings)
    server.wait_connected()
    driver = None
    with session:
        for _ in range(epochs):
            for x, y in train:
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                if at_step is not None and session.state.step == at_step - 1:
                    driver = Driver(server, script)
                    wait_until(lambda: landed(session), what="the command to reach the session")
                if not session.step(loss):
                    break
            else:
                continue
            break
    return model, session, driver


@pytest.mark.parametrize("workers", [0, 2])
def test_pause_mid_epoch_is_bit_exact(tmp_path, workers):
    with dashboard() as server:
        reference, _, _ = own_loop(tmp_path / "a", server, workers=workers)
        reference = weights(reference)
    with dashboard() as server:
        model, session, driver = own_loop(tmp_path / "b", server, workers=workers, at_step=11, script=pause_script)
        results = driver.join()
        server.wait_for_event("trainingFinished", timeout=30)  # the last events are in flight
        history = events(server)
    assert_same_weights(reference, weights(model))
    assert results["paused"]["status"] == "paused" and results["paused"]["step"] == 11
    assert results["status"]["paused"] is True and results["status"]["step"] == 11
    assert results["test"]["status"] == "ok" and results["test"]["avg_loss"] > 0
    assert results["save"]["step"] == 11
    saved = load_checkpoint(results["save"]["path"])
    assert saved["step"] == 11 and saved["batch_in_epoch"] == 11
    types = [e["type"] for e in history]
    assert types.count("paused") == 1 and types.count("resumed") == 1
    assert "testStep" in types and "test_complete" in types
    assert [e["step"] for e in history if e["type"] == "trainStep"] == list(range(1, 33))
    assert [e["epoch"] for e in history if e["type"] == "epoch_end"] == [0, 1]
    finished = [e for e in history if e["type"] == "trainingFinished"]
    assert len(finished) == 1 and finished[0]["status"] == "completed" and finished[0]["step"] == 32
    seqs = [e["event_seq"] for e in history]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def exit_quietly() -> None:
    """A forked child's whole life: start, and exit normally (running its interpreter's exit hooks)."""


def test_a_forked_child_such_as_a_loader_worker_exits_without_touching_the_session(tmp_path):
    """A DataLoader worker is a fork of the training process: it inherits the session's exit hook
    but none of its threads. Closing the session there hung the worker until the loader killed it
    (5 s per worker, at every epoch's end) and would have written into the parent's files."""
    model = make_net()
    session = onthefly.attach(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                              train_loader=make_loaders()[0], transport="off", save_dir=str(tmp_path))
    with session:
        child = multiprocessing.get_context("fork").Process(target=exit_quietly)
        child.start()
        child.join(30)
        assert child.exitcode == 0, "the forked child did not exit (hung in the session's exit hook)"
        assert session.state.running and session.state.status == "running"


def stop_script(server, results):
    results["stop"] = server.request("stop")


def test_stop_ends_the_users_loop(tmp_path):
    with dashboard() as server:
        _, session, driver = own_loop(tmp_path, server, at_step=5, script=stop_script,
                                      landed=lambda session: not session.state.running)
        assert driver.join()["stop"]["status"] == "stopping"
        finished = server.wait_for_event("trainingFinished")
    # stop is answered at once by the command thread; the loop sees it in step() 5 and breaks.
    assert session.state.step == 5 and finished["step"] == 5
    assert finished["status"] == "stopped"


def test_load_ckpt_runs_on_the_training_thread_between_steps(tmp_path):
    """A load sent while the loop trains is applied inside step(), on the loop's own thread."""
    seed_all(3)
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train, _ = make_loaders()
    trace: list[tuple[str, int, str]] = []
    with dashboard() as server:
        session = onthefly.attach(model=model, optimizer=opt, train_loader=train, project="own",
                                  transport="tcp", dashboard_port=server.port, save_dir=str(tmp_path))
        server.wait_connected()
        original_load = session.load_checkpoint_into_state

        def traced_load(path, **kw):
            trace.append(("load", session.state.step, threading.current_thread().name))
            return original_load(path, **kw)

        session.load_checkpoint_into_state = traced_load
        saved: dict = {}
        with session:
            for i, (x, y) in enumerate(train, start=1):  # i: the batch number (session steps rewind at the load)
                trace.append(("opt.step", session.state.step, threading.current_thread().name))
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
                if i == 4:
                    driver = Driver(server, lambda s, r: r.update(save=s.request("save_ckpt")))
                    wait_until(lambda: session.gate.pending, what="save_ckpt queued")
                if i == 9:
                    saved = driver.join()["save"]
                    snapshot = weights(model)
                    driver = Driver(server, lambda s, r: r.update(load=s.request("load_ckpt", {"path": saved["path"]})))
                    wait_until(lambda: session.gate.pending, what="load_ckpt queued")
                session.step()
                if i == 9:
                    loaded = driver.join()["load"]
                    after_load = weights(model)
                    step_after_load = session.state.step
                    position_after_load = session.state.batch_in_epoch
        server.wait_for_event("trainingFinished")
        history = events(server)
    main = threading.current_thread().name
    loads = [i for i, t in enumerate(trace) if t[0] == "load"]
    assert len(loads) == 1
    i = loads[0]
    assert trace[i][2] == main and trace[i - 1] == ("opt.step", 8, main)
    assert trace[i + 1][0] == "opt.step"  # the next optimizer step starts only after the load
    expected = load_checkpoint(saved["path"])["model"]
    assert_same_weights(expected, after_load)
    assert any(not torch.equal(expected[k], snapshot[k]) for k in expected)  # the load really changed weights
    assert loaded["step"] == 4 and step_after_load == 4
    assert session.state.step == 4 + (len(train) - 9)  # counting resumed from the checkpoint's step
    # The loop's loader was not moved: the position in the epoch stays, and the epoch ends once, on time.
    assert position_after_load == 9
    ends = [e for e in history if e["type"] == "epoch_end"]
    assert len(ends) == 1 and ends[0]["epoch"] == 0


def test_uncaught_error_reports_failed(tmp_path):
    with dashboard() as server:
        model = make_net()
        train, _ = make_loaders()
        with pytest.raises(ValueError, match="bad batch"):
            with onthefly.attach(model=model, train_loader=train, transport="tcp", dashboard_port=server.port,
                                 save_dir=str(tmp_path)) as session:
                session.step(torch.tensor(1.0))
                raise ValueError("bad batch")
        finished = server.wait_for_event("trainingFinished")
    assert finished["status"] == "failed" and "ValueError: bad batch" in finished["error"]
    assert finished["step"] == 1


def test_epochs_end_once_with_the_validation_loss(tmp_path):
    model = make_net()
    train, _ = make_loaders(n=64)
    with dashboard() as server:
        with onthefly.attach(model=model, train_loader=train, transport="tcp", dashboard_port=server.port,
                             save_dir=str(tmp_path), log_every_n_steps=2) as session:
            server.wait_connected()
            for epoch in range(2):
                for _ in train:
                    session.step(torch.tensor(0.5), accuracy=torch.tensor(0.25))
                session.end_epoch(val_loss=0.75 - epoch / 10)
        server.wait_for_event("trainingFinished")
        history = events(server)
    ends = [(e["epoch"], e["val_loss"]) for e in history if e["type"] == "epoch_end"]
    assert ends == [(0, 0.75), (1, pytest.approx(0.65))]
    steps = [e for e in history if e["type"] == "trainStep"]
    assert [s["step"] for s in steps] == [2, 4, 6, 8]
    assert steps[0]["loss"] == 0.5 and steps[0]["accuracy"] == 0.25 and steps[0]["epoch"] == 0
    assert steps[2]["epoch"] == 1 and steps[2]["val_loss"] == 0.75
    assert steps[0]["throughput"] > 0


def test_callable_loss_is_wrapped_and_batch_aware_losses_work(tmp_path):
    def batch_loss(model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y)

    model = make_net()
    train, test = make_loaders()
    with dashboard() as server:
        with onthefly.attach(model=model, loss_fn=batch_loss, train_loader=train, test_loader=test,
                             transport="tcp", dashboard_port=server.port, save_dir=str(tmp_path)) as session:
            assert isinstance(session.loss_fn, LossFunctionModule) and session.loss_fn._otf_uses_batch
            server.wait_connected()
            driver = Driver(server, lambda s, r: r.update(test=s.request("test_now")))
            wait_until(lambda: session.gate.pending, what="test_now queued")
            session.step(torch.tensor(1.0))
            result = driver.join()["test"]
    with torch.no_grad():
        model.eval()
        expected = sum(F.cross_entropy(model(x), y) for x, y in test) / len(test)
    assert result["avg_loss"] == pytest.approx(float(expected), rel=1e-6)
    assert result["env_test_label"] == "test_1"


def test_rebind_to_subset_keeps_the_loader_knobs(tmp_path):
    def collate(items):
        xs, ys = zip(*items)
        return torch.stack(xs), torch.stack(ys)

    ds = make_dataset(50)
    train = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, drop_last=True, collate_fn=collate)
    with onthefly.attach(model=make_net(), train_loader=train, transport="off", save_dir=str(tmp_path)) as session:
        loader = session.rebind_train_loader(list(range(10, 30)))
        assert loader is session.train_loader and session.active_subset == list(range(10, 30))
        assert loader.batch_size == 8 and loader.drop_last and loader.collate_fn is collate
        assert isinstance(loader.sampler, torch.utils.data.RandomSampler)
        rows = torch.cat([x for x, _ in loader])
        assert len(rows) == 16  # 20 samples in batches of 8, the last partial batch dropped
        subset = ds.tensors[0][10:30]
        assert all(any(torch.equal(r, s) for s in subset) for r in rows)
        with pytest.raises(onthefly.ProtocolError, match=r"\[50\] are not in the training set"):
            session.rebind_train_loader([0, 50])
        assert session.rebind_train_loader(None) is train and session.active_subset is None


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        onthefly.attach(model="net", transport="off", save_dir=str(tmp_path))
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        onthefly.attach(model=make_net(), optimizer=object(), transport="off", save_dir=str(tmp_path))
    with pytest.raises(onthefly.ConfigError, match="unknown session setting|log_every_n_steps"):
        onthefly.attach(model=make_net(), transport="off", save_dir=str(tmp_path), log_every_n_steps=0)


EXIT_SCRIPT = """
import sys, torch, onthefly
from torch import nn
session = onthefly.attach(model=nn.Linear(2, 2), transport="off", save_dir=sys.argv[1], project="exit")
print(session.storage.events_db, flush=True)
session.step(torch.tensor(0.5))
session.step(torch.tensor(0.25))
if sys.argv[2] == "crash":
    raise ValueError("boom at top level")
"""


@pytest.mark.parametrize("how,status", [("crash", "failed"), ("normal", "completed")])
def test_the_end_is_reported_without_finish(tmp_path, how, status):
    """No `with`, no finish(): the exit handler still reports the run's end, and an uncaught error as failed."""
    import json
    import subprocess
    import sys

    from onthefly.control.eventlog import EventLog

    proc = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(tmp_path), how], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == (1 if how == "crash" else 0), proc.stderr
    if how == "crash":
        assert "ValueError: boom at top level" in proc.stderr  # the user's traceback is still printed
    log = EventLog(proc.stdout.strip().splitlines()[0])
    try:
        stored = [json.loads(body) for _, body in log.read_after(0, 1000)]
    finally:
        log.close()
    finished = [e for e in stored if e["type"] == "trainingFinished"]
    assert len(finished) == 1 and finished[0]["status"] == status and finished[0]["step"] == 2
    if how == "crash":
        assert "boom at top level" in finished[0]["error"]
