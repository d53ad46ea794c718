"""A plain Accelerate loop under `onthefly.attach(..., accelerator=...)`: steps are optimizer steps,
pauses land only between accumulations and are bit-exact, and a checkpoint resumes bit-exactly."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

accelerate = pytest.importorskip("accelerate", reason="Accelerate loops need accelerate (dev extra)")

import onthefly  # noqa: E402
from onthefly.checkpoints import load_checkpoint  # noqa: E402

from ..helpers import (  # noqa: E402
    Driver,
    assert_same_weights,
    dashboard,
    make_dataset,
    make_net,
    pause_script,
    seed_all,
    wait_until,
    weights,
)

WAIT = 30.0
ACCUMULATION = 2


def accelerate_loop(tmp_path, *, server=None, at_step=None, script=None, detect=False, epochs=2,
                    own_batches=False, **settings):
    """64 samples in batches of 8, two micro-batches per optimizer step: 4 steps per epoch."""
    seed_all(7)
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATION)
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = torch.utils.data.DataLoader(make_dataset(64), batch_size=8, shuffle=True)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    options = dict(project="acc", save_dir=str(tmp_path), log_every_n_steps=1, allowed_paths=(str(tmp_path),))
    options.update(transport="off" if server is None else "tcp", **settings)
    if server is not None:
        options["dashboard_port"] = server.port
    session = onthefly.attach(model=model, optimizer=opt, train_loader=loader, loss_fn=torch.nn.CrossEntropyLoss(),
                              test_loader=loader, accelerator=None if detect else accelerator, **options)
    if server is not None:
        server.wait_connected(WAIT)
    driver = None
    with session:
        for _ in session.epochs(epochs):
            for x, y in (session.batches() if own_batches else loader):
                with accelerator.accumulate(model):
                    loss = F.cross_entropy(model(x), y)
                    accelerator.backward(loss)
                    opt.step()
                    opt.zero_grad()
                if at_step is not None and driver is None and session.state.step == at_step - 1 \
                        and not accelerator.sync_gradients:
                    # The command lands in the middle of an accumulation: it must wait for its optimizer step.
                    driver = Driver(server, script)
                    wait_until(lambda: session.gate.pending, what="the command to reach the session")
                if not session.step(loss):
                    break
    return accelerator.unwrap_model(model), session, driver


def test_steps_are_optimizer_steps_and_the_loop_is_detected(tmp_path):
    model, session, _ = accelerate_loop(tmp_path / "given")
    assert session.framework.runtime == "accelerate"
    assert session.state.step == 8 and session.state.epoch == 2  # 2 epochs x 8 batches / 2
    assert type(session.optimizer) is torch.optim.SGD  # the torch optimizer inside Accelerate's
    detected, other, _ = accelerate_loop(tmp_path / "detected", detect=True)
    assert other.framework.runtime == "accelerate" and other.state.step == 8
    assert_same_weights(weights(model), weights(detected))


def test_pause_between_accumulations_is_bit_exact(tmp_path):
    reference, _, _ = accelerate_loop(tmp_path / "a")
    with dashboard() as server:
        model, session, driver = accelerate_loop(tmp_path / "b", server=server, at_step=3, script=pause_script)
        results = driver.join()
    assert_same_weights(weights(reference), weights(model))
    assert results["paused"]["step"] == 3 and results["status"]["runtime"] == "accelerate"
    assert results["status"]["batch_in_epoch"] == 6  # 3 optimizer steps of 2 micro-batches
    assert results["test"]["status"] == "ok" and results["test"]["avg_loss"] > 0
    saved = load_checkpoint(results["save"]["path"])
    assert saved["step"] == 3 and saved["batch_in_epoch"] == 6


def test_set_hparams_edits_the_optimizer_inside_accelerates(tmp_path):
    def script(server, results):
        server.request("pause", timeout=WAIT)
        results["hp"] = server.request("set_hparams", {"lr": 0.01, "momentum": 0.5}, timeout=WAIT)
        server.request("resume", timeout=WAIT)

    with dashboard() as server:
        _, session, driver = accelerate_loop(tmp_path, server=server, at_step=2, script=script)
        results = driver.join()
    assert results["hp"]["param_groups"][0]["lr"] == 0.01 and results["hp"]["param_groups"][0]["momentum"] == 0.5
    assert session.optimizer.param_groups[0]["momentum"] == 0.5


def test_a_checkpoint_resumes_bit_exactly_with_the_sessions_batches(tmp_path):
    reference, session, _ = accelerate_loop(tmp_path / "ref", own_batches=True, ckpt_every_steps=5)
    ckpt = session.storage.folder / "runs" / "baseline" / "checkpoints" / "step-00000005.pt"
    assert load_checkpoint(ckpt)["batch_in_epoch"] == 2  # step 5: one step into the second epoch
    resumed, other, _ = accelerate_loop(tmp_path / "resumed", own_batches=True, resume_from=str(ckpt))
    assert_same_weights(weights(reference), weights(resumed))
    assert other.state.step == 8 and other.state.epoch == 2
