"""The edit ledger: every mutating command lands in its run's manifest and the event log, with who sent it,
where the run was, and what came of it; read-only commands do not."""

from __future__ import annotations

import json
import sys
import threading
from concurrent.futures import Future

import torch
from torch.utils.data import DataLoader

import onthefly
from onthefly import Trainer
from onthefly.control.errors import ProtocolError
from onthefly.mixins.ledger import launch_record, summarize, weights_digest

from session.helpers import MemoryDashboard, make_dataset, make_model, wait_until


def test_wire_and_python_commands_are_recorded_with_their_origin_and_position(tmp_path):
    trainer = Trainer(project="ledger", max_epochs=None, transport="memory", save_dir=str(tmp_path))
    session = trainer.session
    session.channel.connect()
    dash = MemoryDashboard(session.channel)
    model = make_model()
    dash.send("pause")
    thread = threading.Thread(target=trainer.fit, daemon=True, kwargs=dict(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=torch.nn.CrossEntropyLoss(),
        train_loader=DataLoader(make_dataset(64), batch_size=16), progress=False))
    thread.start()
    wait_until(lambda: session.gate.paused, 20, "the pause")
    dash.request("set_hparams", {"lr": 0.05})
    bad = dash.reply(dash.send("layer_op", {"path": "9", "op": "freeze"}))
    assert bad["code"] == "not_found"
    dash.request("status")  # read-only: not in the ledger
    dash.request("resume")
    wait_until(lambda: session.state.step >= 6, 20, "step 6")
    from_python = session.call("set_hparams", {"weight_decay": 0.001})  # another thread: through the gate
    assert from_python["param_groups"][0]["weight_decay"] == 0.001
    dash.request("stop")
    thread.join(30)

    entries = json.loads((session.storage.run_dir("baseline") / "run.json").read_text())["ledger"]
    assert [(e["cmd"], e["origin"], e["ok"]) for e in entries] == [
        ("pause", "wire", True), ("set_hparams", "wire", True), ("layer_op", "wire", False),
        ("resume", "wire", True), ("set_hparams", "python", True)]
    first = entries[1]
    assert (first["step"], first["epoch"], first["batch_in_epoch"], first["at"]) == (0, 0, 0, "boundary")
    assert first["payload"]["lr"] == 0.05 and first["replay"] == "edit" and first["result"]["param_groups"]
    assert entries[2]["code"] == "not_found" and "no module '9'" in entries[2]["error"]
    assert entries[4]["step"] >= 6 and entries[4]["at"] == "boundary" and entries[0]["replay"] == "neutral"
    events = [m for m in dash.messages() if m.get("type") == "ledger_entry"]
    assert [e["seq"] for e in events] == [e["seq"] for e in entries] and events[1]["ledger_run"] == "baseline"
    manifest = session.read_manifest("baseline")
    assert manifest["final"]["weights_sha256"] == weights_digest(model) and manifest["final"]["status"] == "stopped"
    assert manifest["launch"]["argv"][0] == sys.executable and manifest["launch"]["cwd"]


def test_an_inline_call_before_the_first_batch_and_a_fork_start_new_ledgers(tmp_path):
    model = make_model()
    loader = DataLoader(make_dataset(64), batch_size=16, shuffle=True)
    session = onthefly.attach(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                              loss_fn=torch.nn.CrossEntropyLoss(), train_loader=loader, transport="off",
                              save_dir=str(tmp_path))
    with session:
        session.call("set_hparams", {"lr": 0.2})  # on the loop's thread, before any batch: inline
        for x, y in session.batches():
            torch.nn.functional.cross_entropy(model(x), y).backward()
            session.step()
            if session.state.step == 2:
                fork = session.call("fork", {"selection": {"kind": "indices", "ids": list(range(40))}})
                session.call("set_hparams", {"lr": 0.3})
                break
    parent, child = session.ledger_of("baseline"), session.ledger_of(fork["new_run"])
    assert [(e["cmd"], e["at"], e["step"]) for e in parent] == [("set_hparams", "inline", 0), ("fork", "inline", 2)]
    assert parent[1]["replay"] == "moves" and parent[1]["result"]["subset_indices"] == {"items": 40}
    assert [e["cmd"] for e in child] == ["set_hparams"] and child[0]["run_id"] == fork["new_run"]
    assert json.loads((session.storage.run_dir(fork["new_run"]) / "run.json").read_text())["ledger"][0]["payload"][
        "lr"] == 0.3


def test_summaries_launch_records_and_digests():
    assert summarize({"a": list(range(100)), "b": [1, 2], "c": float("nan")}) == {"a": {"items": 100}, "b": [1, 2],
                                                                                 "c": None}
    assert summarize(Future()) == {"deferred": True}
    record = launch_record()
    assert record["argv"][0] == sys.executable and record["torch"] == torch.__version__
    model = torch.nn.Linear(3, 2)
    digest = weights_digest(model)
    assert digest == weights_digest(model) and len(digest) == 64
    with torch.no_grad():
        model.weight.view(-1)[0] = torch.nextafter(model.weight.view(-1)[0], torch.tensor(10.0))  # one ulp
    assert weights_digest(model) != digest


def test_a_failing_python_call_raises_and_is_still_recorded(tmp_path):
    trainer = Trainer(project="ledger", transport="off", save_dir=str(tmp_path))
    session = trainer.session
    model = make_model()
    session.bind(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                 loss_fn=torch.nn.CrossEntropyLoss(), train_loader=DataLoader(make_dataset(32), batch_size=8))
    try:
        try:
            session.call("layer_op", {"path": "3", "op": "set_dropout", "p": 0.5})
        except ProtocolError as exc:
            assert exc.code == "bad_payload" and "no dropout layer" in exc.message
        else:
            raise AssertionError("set_dropout on a Linear must be refused")
        entry = session.ledger_of()[-1]
        assert entry["cmd"] == "layer_op" and entry["ok"] is False and entry["origin"] == "python"
    finally:
        session.close()
