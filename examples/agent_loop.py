"""A rule-based agent that steers a live training run through the wire, knowing only the command schemas.

No network and no language model: the "agent" is a few plain rules, but it works the way an LLM
agent would — it asks the trainer for its tools (`describe_commands`, as tool specs with JSON
Schemas), checks every call against them, and acts on what the run reports:

1. after the second epoch it scores every training sample (`generate_report`) and drops the
   highest-loss 8% (`drop_samples`) — with 10% of the labels flipped, most of those are the
   flipped ones;
2. whenever the validation loss stops improving it halves the learning rate (`set_hparams`
   with `lr_scale`), at most twice;
3. at the end it reads back what it did from the run's edit ledger (`ledger_entry` events).

    python examples/agent_loop.py            # prints the agent's actions and how precise the drop was

Then `onthefly replay <session folder>` reproduces the run, the agent's edits included, bit-exactly:
it runs this script again with `ONTHEFLY_REPLAY` set, and the agent then only watches (the run
takes its edits from the replay plan, and would refuse the agent's).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import onthefly
from onthefly.client import DashboardServer

EPOCHS = 8
DROP_FRACTION = 0.08
WAIT = 120.0


def make_data(seed: int) -> tuple[TensorDataset, TensorDataset, set[int]]:
    """A 3-class problem with 10% of the training labels flipped; returns (train, val, flipped indices)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(10, 3, generator=g)
    x = torch.randn(800, 10, generator=g)
    y = (x @ w).argmax(1)
    flipped = torch.randperm(600, generator=g)[:60]
    noisy = y[:600].clone()
    noisy[flipped] = (noisy[flipped] + 1 + torch.randint(0, 2, (60,), generator=g)) % 3
    return TensorDataset(x[:600], noisy), TensorDataset(x[600:], y[600:]), {int(i) for i in flipped}


def train_in_background(port: int, save_dir: str, seed: int) -> tuple[threading.Thread, dict[str, Any]]:
    """The training script, as a user would write it (on a thread here, so one file shows both sides)."""
    result: dict[str, Any] = {}
    train, val, _ = make_data(seed)

    def main() -> None:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 3))
        trainer = onthefly.Trainer(project="agent", run_name="baseline", max_epochs=EPOCHS, dashboard_port=port,
                                   transport="tcp", save_dir=save_dir, log_every_n_steps=1,
                                   start_paused=True)
        result["session"] = trainer.fit(
            model, torch.optim.Adam(model.parameters(), lr=0.01), nn.CrossEntropyLoss(),
            DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed)),
            DataLoader(val, batch_size=100), seed=seed, progress=False)

    thread = threading.Thread(target=main, name="training", daemon=True)
    thread.start()
    return thread, result


class Agent:
    """Plain rules over the trainer's tools; every call is checked against the tool's JSON Schema."""

    def __init__(self, dash: DashboardServer, verbose: bool) -> None:
        self.dash = dash
        self.verbose = verbose
        self.tools = {tool["name"]: tool for tool in dash.tools()}
        self.actions: list[str] = []

    def call(self, name: str, **arguments: Any) -> Any:
        reply = self.dash.call_tool(self.tools[name], arguments)
        if self.tools[name]["mutating"]:
            self.actions.append(name)
            if self.verbose:
                print(f"agent: {name} {arguments if len(str(arguments)) < 80 else '{...}'}")
        return reply

    def run(self) -> dict[str, Any]:
        # The run starts paused (`start_paused`): the agent schedules a pause at the start of every
        # epoch and decides while the run waits, so a fast run cannot outpace it.
        self.dash.wait_for_event(lambda e: e.get("type") == "paused", WAIT)
        if os.environ.get("ONTHEFLY_REPLAY"):  # a replay applies the recorded edits itself
            self.dash.request("resume")
            finished = self.dash.wait_for_event(lambda e: e.get("type") == "trainingFinished", WAIT)
            return {"dropped": [], "final_val_loss": None, "status": finished["status"], "ledger": [],
                    "replay": True}
        best_val, lr_cuts, dropped = None, 0, []
        for epoch in range(EPOCHS):
            if epoch + 1 < EPOCHS:
                self.dash.request("pause", {"at_epoch": epoch + 1, "reason": "agent decides"})
            self.dash.request("resume")
            event = self.dash.wait_for_event(lambda e, n=epoch: e.get("type") == "epoch_end" and e.get("epoch") == n,
                                             WAIT)
            if epoch + 1 < EPOCHS:
                self.dash.wait_for_event(lambda e, n=epoch + 1: e.get("type") == "paused"
                                         and (e.get("request") or {}).get("at_epoch") == n, WAIT)
            val = event.get("val_loss")
            if epoch == 1:
                report = self.call("generate_report", subset_on="train")
                ranked = sorted(zip(report["losses"], report["sample_indices"]), reverse=True)
                dropped = [int(i) for _, i in ranked[:int(len(ranked) * DROP_FRACTION)]]
                self.call("drop_samples", indices=dropped, reason="highest loss after two epochs")
            if val is not None and best_val is not None and val >= best_val and lr_cuts < 2:
                self.call("set_hparams", lr_scale=0.5)
                lr_cuts += 1
            best_val = val if best_val is None or (val is not None and val < best_val) else best_val
        finished = self.dash.wait_for_event(lambda e: e.get("type") == "trainingFinished", WAIT)
        ledger = [e for e in self.dash.history() if e.get("type") == "ledger_entry" and e.get("origin") == "wire"]
        return {"dropped": dropped, "final_val_loss": best_val, "status": finished["status"],
                "ledger": [(e["cmd"], e["step"], e["ok"]) for e in ledger]}


def run(seed: int = 0, save_dir: str | None = None, verbose: bool = True) -> dict[str, Any]:
    save_dir = save_dir or tempfile.mkdtemp(prefix="onthefly-agent-")
    _, _, flipped = make_data(seed)
    with DashboardServer(port=0) as dash:
        thread, result = train_in_background(dash.port, save_dir, seed)
        dash.wait_connected(WAIT)
        agent = Agent(dash, verbose)
        outcome = agent.run()
        thread.join(WAIT)
    hits = len(set(outcome["dropped"]) & flipped)
    outcome.update(actions=agent.actions, flipped_among_dropped=hits,
                   precision=hits / max(len(outcome["dropped"]), 1),
                   session_folder=str(result["session"].storage.folder), tools=len(agent.tools))
    if verbose and not outcome.get("replay"):
        print(f"agent: {len(agent.tools)} tools; dropped {len(outcome['dropped'])} samples, {hits} of them "
              f"mislabelled ({outcome['precision']:.0%}); best val_loss {outcome['final_val_loss']:.4f}")
        print(f"ledger (origin wire): {outcome['ledger']}")
        print(f"replay it: onthefly replay {outcome['session_folder']}")
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-dir", default=None)
    args = parser.parse_args(argv)
    outcome = run(args.seed, args.save_dir)
    return 0 if outcome["status"] == "completed" else 1


if __name__ == "__main__":
    raise SystemExit(main())
