"""Property-based fuzzing of the wire against a live native `Trainer` session (issue 17).

A tiny MLP trains in a background thread behind a `MemoryChannel`; hypothesis generates
batches of requests from every command's payload JSON Schema (`CommandRouter.describe()`):
schema-valid payloads, payloads with one field of the wrong type ("junk"), payloads whose
path or name fields are hostile ('/tmp/...', '../../x', '~/.bashrc', a symlink leading out,
NUL, ...), extreme numbers, and raw lines that are not requests at all. HOME, the working
folder and the temp folder are sandbox folders; nothing outside the allowed ones may change.

Checked for every request: exactly one reply, with a code from the protocol's vocabulary;
never `failed` (nothing in this sandbox can genuinely fail: the disk has room, the model is
tiny); junk is `bad_payload`; hostile write paths and names are refused (`bad_payload` or
`not_found`); a hostile read path (an existing file that is no checkpoint, a device, a link
out) may be read, but a file that is no checkpoint is `bad_payload`, not `failed`. An empty
string is not hostile: optional path and name fields treat it as "not given".
Checked at the end: training still advances, `stop` ends it cleanly, and no file outside the
allowed folders was created or changed. Every violation is collected (command, payload,
reply) and reported together, so one run lists all of them. Deterministic: derandomized,
a fixed number of examples, no shrinking, no example database.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is in the dev extra")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from onthefly import Trainer  # noqa: E402
from onthefly.control import ErrorCode  # noqa: E402
from onthefly import storage  # noqa: E402

EXAMPLES_PER_COMMAND = 8  # batches of 1-3 requests of one command (plus junk lines)
REPLY_TIMEOUT = 20.0
#: Commands that end the run by design; `stop` is sent once, at the end.
EXCLUDED = {"stop", "enforce_version"}
PATH_FIELDS = {"out_path", "dir", "path", "ckpt", "ckpt_path", "init_ckpt", "parent_ckpt_path", "paths"}
READ_FIELDS = {"path", "ckpt", "ckpt_path", "init_ckpt", "parent_ckpt_path", "paths"}
NAME_FIELDS = {"run_id", "runId", "parent_run_id", "owner_run_id", "run_name", "new_name", "parents"}
REFUSED = {ErrorCode.BAD_PAYLOAD, ErrorCode.NOT_FOUND}
TOKEN = uuid.uuid4().hex[:10]
REAL_TMP_PROBE = f"/tmp/otf-fuzz-{TOKEN}"  # the real /tmp: not a temp root in this test


# ---- the sandbox ---------------------------------------------------------------------------------


class Sandbox:
    """HOME, a working folder two levels down (so '../../x' stays inside), temp and an outside area."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "home"
        self.cwd = root / "a" / "b" / "work"
        self.temp = root / "temp"
        self.outside = root / "outside"
        for folder in (self.home / "Downloads", self.home / ".ssh", self.cwd, self.temp, self.outside):
            folder.mkdir(parents=True, exist_ok=True)
        (self.home / ".bashrc").write_text("# the user's shell start-up\n")
        (self.home / ".ssh" / "authorized_keys").write_text("ssh-ed25519 AAAA user\n")
        (self.home / "Downloads" / "thesis.csv").write_text("precious,data\n")
        (self.outside / "secret.txt").write_text("do not touch\n")
        (self.cwd / "escape").symlink_to(self.outside)  # a link leading out of the working folder
        (self.cwd / "notes.csv").write_text("the user's own file\n")

    def allowed(self, path: Path) -> bool:
        """Where new files may appear: the working folder, the temp folder, non-hidden home folders."""
        if path.is_relative_to(self.cwd) or path.is_relative_to(self.temp):
            return True
        if path.is_relative_to(self.home):
            return not any(part.startswith(".") for part in path.relative_to(self.home).parts)
        return False

    def snapshot(self) -> dict[Path, str]:
        """Every file and link under the sandbox (not following links), with a content digest."""
        seen: dict[Path, str] = {}
        for folder, dirs, files in os.walk(self.root, followlinks=False):
            for name in dirs + files:
                path = Path(folder) / name
                if path.is_symlink():
                    seen[path] = "link:" + os.readlink(path)
                elif path.is_file():
                    seen[path] = hashlib.sha256(path.read_bytes()).hexdigest()
                else:
                    seen[path] = "dir"
        return seen


# ---- values --------------------------------------------------------------------------------------

HOSTILE_NAMES = [
    REAL_TMP_PROBE + "/x", "../../x", "..", ".", ".hidden", "a/b", "a\\b", "x\x00y", "x" * 200, "NUL",
    "escape/../../x", "-rf", "~/.bashrc",
]


def hostile_write_paths(box: Sandbox) -> list[str]:
    return [
        REAL_TMP_PROBE, REAL_TMP_PROBE + "/x.csv", "../../../x.csv", "~/.bashrc", "~/.ssh/authorized_keys",
        "~/.config/autostart/x.csv", str(box.outside / "x.csv"), "escape/x.csv", "/etc/x.csv", "a\x00b.csv",
        str(box.home / "Downloads" / "thesis.csv"), "notes.csv", ".git/hooks/pre-commit",
    ]


def hostile_read_paths(box: Sandbox) -> list[str]:
    return ["~/.bashrc", "/etc/passwd", "/dev/zero", "missing.pt", "a\x00b.pt", str(box.outside / "secret.txt"),
            "escape/secret.txt", "/proc/self/environ"]


INTS = st.one_of(st.integers(0, 8), st.integers(0, 8), st.integers(0, 8),
                 st.sampled_from([-1, 2**31, 2**63 - 1, -(2**63)]))
FLOATS = st.one_of(st.floats(-2, 2, allow_nan=False, allow_infinity=False),
                   st.sampled_from([0.0, -1.0, 1e308, -1e308, 5e-324, 1e-300, 1.0]))
TEXT = st.one_of(st.sampled_from(["manual", "train", "val", "x", "all", "swa", "indices"]), st.text(max_size=6))


class Ref:
    """A value chosen at send time from the session's current state (runs, checkpoints, fresh names).

    Strategies must not depend on state that changes between examples; they draw a Ref, and the
    barrage turns it into a value just before sending.
    """

    def __init__(self, kind: str, index: int = 0, suffix: str = "") -> None:
        self.kind, self.index, self.suffix = kind, index, suffix

    def resolve(self, gen: "Generator") -> str:
        box = gen.box
        if self.kind == "run":
            return gen.runs[self.index % len(gen.runs)]
        if self.kind == "fresh-run":
            return gen.fresh("fz-run-")
        if self.kind == "ckpt":
            ckpts = sorted(str(p) for p in box.cwd.glob(".onthefly/*/*/runs/*/checkpoints/*.pt"))
            return ckpts[self.index % len(ckpts)] if ckpts else "missing.pt"
        if self.kind == "temp-dir":
            return str(box.temp / gen.fresh("fz-dir-"))
        if self.kind == "exports-dir":
            return "exports/" + gen.fresh("d")
        if self.kind == "downloads-dir":
            return "~/Downloads/" + gen.fresh("bundle-")
        folder = {"exports-file": "exports/", "downloads-file": "~/Downloads/", "temp-file": str(box.temp) + "/"}
        return folder[self.kind] + gen.fresh("fz") + self.suffix


class Generator:
    """Hypothesis strategies built from the commands' JSON Schemas, with field-aware values."""

    def __init__(self, described: dict[str, dict], box: Sandbox, runs: list[str]) -> None:
        self.described = described
        self.box = box
        self.runs = runs  # updated as forks and merges create runs
        self.counter = 0

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def materialize(self, value: Any) -> Any:
        """Replace the `Ref` placeholders a strategy drew by values from the live session."""
        if isinstance(value, Ref):
            return value.resolve(self)
        if isinstance(value, dict):
            return {key: self.materialize(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.materialize(item) for item in value]
        return value

    def value(self, draw: Any, schema: dict, defs: dict, key: str | None, depth: int = 0) -> Any:
        if "$ref" in schema:
            return self.value(draw, defs[schema["$ref"].rsplit("/", 1)[1]], defs, key, depth + 1)
        if key in PATH_FIELDS and depth < 4:
            return self.path_value(draw, key, schema)
        if key in NAME_FIELDS and depth < 4:
            return self.name_value(draw, key, schema)
        if "anyOf" in schema:
            arm = draw(st.sampled_from(schema["anyOf"]))
            return self.value(draw, arm, defs, key, depth + 1)
        if "enum" in schema:
            return draw(st.sampled_from(schema["enum"]))
        kind = schema.get("type")
        if kind == "object":
            props = schema.get("properties", {})
            required = set(schema.get("required", ()))
            out: dict[str, Any] = {}
            for name, prop in props.items():
                if name in required or draw(st.booleans()):
                    wire = name
                    aliases = prop.get("x-aliases", ())
                    if aliases and draw(st.booleans()):
                        wire = draw(st.sampled_from(aliases))
                    out[wire] = self.value(draw, prop, defs, name, depth + 1)
            return out
        if kind == "integer":
            return draw(INTS)
        if kind == "number":
            return draw(FLOATS)
        if kind == "string":
            return draw(TEXT)
        if kind == "boolean":
            return draw(st.booleans())
        if kind == "null":
            return None
        if kind == "array":
            items = schema.get("items", {})
            return [self.value(draw, items, defs, None, depth + 1) for _ in range(draw(st.integers(0, 4)))]
        return draw(st.one_of(st.none(), st.integers(0, 3), st.text(max_size=3)))

    def path_value(self, draw: Any, key: str, schema: dict) -> Any:
        many = key == "paths"
        if key in READ_FIELDS:
            pick = Ref("ckpt", draw(st.integers(0, 50)))
        elif key == "dir":
            pick = Ref(draw(st.sampled_from(["temp-dir", "exports-dir", "downloads-dir"])))
        else:
            suffix = draw(st.sampled_from([".csv", ".parquet", ".json", ".feather"]))
            pick = Ref(draw(st.sampled_from(["exports-file", "downloads-file", "temp-file"])), suffix=suffix)
        return [pick] if many else pick

    def name_value(self, draw: Any, key: str, schema: dict) -> Any:
        if key == "parents":
            return [Ref("run", i) for i in draw(st.lists(st.integers(0, 50), min_size=1, max_size=3))]
        return Ref("run", draw(st.integers(0, 50))) if draw(st.booleans()) else Ref("fresh-run")

    def request(self, cmd: str) -> st.SearchStrategy:
        @st.composite
        def build(draw: Any) -> dict:
            schema = self.described[cmd]["payload"]
            defs = schema.get("$defs", {})
            payload = self.value(draw, schema, defs, None)
            mode = draw(st.sampled_from(["valid"] * 6 + ["junk"] * 2 + ["hostile"] * 3))
            note = ""
            props = schema.get("properties", {})
            if mode == "junk":
                typed = [name for name, prop in props.items() if _json_types(prop, defs)]
                if typed:
                    name = draw(st.sampled_from(typed))
                    wrong = _wrong_type(draw, _json_types(props[name], defs))
                    payload[name] = wrong
                    note = f"{name} of the wrong type"
                else:
                    mode = "valid"
            elif mode == "hostile":
                fields = [name for name in props if name in PATH_FIELDS or name in NAME_FIELDS]
                if fields:
                    name = draw(st.sampled_from(fields))
                    if name in READ_FIELDS:
                        value: Any = draw(st.sampled_from(hostile_read_paths(self.box)))
                        mode = "hostile-read"
                    elif name in PATH_FIELDS:
                        value = draw(st.sampled_from(hostile_write_paths(self.box)))
                    else:
                        value = draw(st.sampled_from(HOSTILE_NAMES))
                    payload[name] = [value] if name in ("paths", "parents") else value
                    note = f"{name} = {value!r}"
                else:
                    mode = "valid"
            return {"cmd": cmd, "payload": payload, "mode": mode, "note": note}

        return build()


def _json_types(prop: dict, defs: dict) -> set[str]:
    """The JSON types a property accepts (empty when it accepts anything)."""
    if "$ref" in prop:
        return {"object"}
    if "anyOf" in prop:
        found: set[str] = set()
        for arm in prop["anyOf"]:
            arm_types = _json_types(arm, defs)
            if not arm_types:
                return set()
            found |= arm_types
        return found
    if "enum" in prop:
        return {prop.get("type", "string")}
    kind = prop.get("type")
    if kind == "number":
        return {"number", "integer"}
    return {kind} if kind else set()


def _wrong_type(draw: Any, accepted: set[str]) -> Any:
    candidates = {"string": "not-a-number", "integer": 7, "number": 0.5, "boolean": True, "array": [1, "x"],
                  "object": {"x": 1}, "null": None}
    wrong = [value for kind, value in candidates.items() if kind not in accepted
             and not (kind == "integer" and "number" in accepted)]
    return draw(st.sampled_from(wrong))


JUNK_LINES = [
    ("not json at all", None),
    ('{"cmd": "pause", "payload": {"reason": NaN}}', None),
    ("[1, 2, 3]", None),
    ('{"id": "%s", "cmd": 5}', ErrorCode.BAD_ENVELOPE),
    ('{"id": "%s", "payload": {}}', ErrorCode.BAD_ENVELOPE),
    ('{"id": "%s", "cmd": "pause", "payload": [1]}', ErrorCode.BAD_ENVELOPE),
    ('{"id": "%s", "cmd": "no_such_command"}', ErrorCode.UNKNOWN_COMMAND),
    ('{"id": "%s", "cmd": "set_hparams", "payload": {"lr": 1e999}}', ErrorCode.BAD_PAYLOAD),
    ('{"id": "%s", "cmd": "events_since", "payload": {"event_seq": 1' + "0" * 30 + "}}", ErrorCode.BAD_PAYLOAD),
]


def known_attacks(box: Sandbox) -> tuple[list[dict], list[dict]]:
    """The inputs issue 17 found by hand: (path and name attacks, optimizer-value attacks).

    Each must be refused (`bad_payload`/`not_found`); the `save_ckpt`s and `spill_all`s in
    between are ordinary requests that must succeed (a refused request must not have changed
    the session) without writing outside the allowed folders.
    """
    probe = REAL_TMP_PROBE + "/x"
    ckpt = Ref("ckpt", 0)
    paths = [
        ("export_subset", {"run_id": probe, "format": "csv"}, "known", "run_id = " + probe),
        ("export_subset", {"run_id": "../" * 12 + "x", "format": "csv"}, "known", "run_id climbs out"),
        ("switch_run", {"run_id": probe, "init_ckpt": ckpt}, "known", "run_id = " + probe),
        ("save_ckpt", {}, "ok", "after a refused switch_run to a hostile run id"),
        ("spill_all", {}, "ok", "after a refused switch_run to a hostile run id"),
        ("attach_context", {"run_id": "../../x", "init_ckpt": ckpt}, "known", "run_id = '../../x'"),
        ("save_ckpt", {}, "ok", "after a refused attach_context to a hostile run id"),
        ("spill_all", {"dir": str(box.temp / "spill")}, "ok", "after a refused attach_context to a hostile run id"),
        ("export_subset", {"out_path": "~/.bashrc", "format": "csv"}, "known", "out_path = ~/.bashrc"),
        ("load_ckpt", {"path": "~/.bashrc"}, "known", "not a checkpoint"),
    ]
    values = [
        ("set_hparams", {"weight_decay": 1e308}, "known", "weight_decay overflows"),
        ("set_hparams", {"betas": [1.0, 0.999]}, "known", "beta1 = 1 divides by zero"),
        ("set_hparams", {"lr": -1.0}, "known", "negative lr"),
        ("set_hparams", {"momentum": 1e308, "lr": 1e-3}, "known", "momentum out of range"),
    ]

    def requests(rows: list[tuple]) -> list[dict]:
        return [{"cmd": cmd, "payload": payload, "mode": mode, "note": why} for cmd, payload, mode, why in rows]

    return requests(paths), requests(values)


# ---- the dashboard side --------------------------------------------------------------------------


class Wire:
    """Sends requests over the session's MemoryChannel and indexes what comes back, incrementally."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.replies: dict[str, list[dict]] = {}
        self.finished: list[dict] = []
        self._pos = 0
        self._n = 0

    def send(self, cmd: str, payload: Any) -> str:
        self._n += 1
        rid = f"fz{self._n}"
        self.channel.inject(json.dumps({"id": rid, "cmd": cmd, "payload": payload}))
        return rid

    def send_raw(self, template: str) -> str | None:
        self._n += 1
        rid = f"raw{self._n}"
        self.channel.inject(template % rid if "%s" in template else template)
        return rid if "%s" in template else None

    def poll(self) -> None:
        sent = self.channel.sent
        while self._pos < len(sent):
            message = json.loads(sent[self._pos])
            self._pos += 1
            if "ok" in message and "id" in message:
                self.replies.setdefault(message["id"], []).append(message)
            elif message.get("type") == "trainingFinished":
                self.finished.append(message)

    def wait(self, ids: list[str], timeout: float) -> list[str]:
        """Wait for a reply to every id; return the ids still unanswered."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            missing = [rid for rid in ids if rid not in self.replies]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.005)

    def request(self, cmd: str, payload: Any = None, timeout: float = REPLY_TIMEOUT) -> dict | None:
        rid = self.send(cmd, payload or {})
        if self.wait([rid], timeout):
            return None
        return self.replies[rid][0]


# ---- the test ------------------------------------------------------------------------------------


class SlowLoss(nn.Module):
    """Cross-entropy plus a little sleep: a few hundred steps a second, so the run outlives the fuzz."""

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        time.sleep(0.002)
        return nn.functional.cross_entropy(outputs, targets)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def short(value: Any, limit: int = 300) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[:limit] + "..."


@pytest.mark.slow
def test_fuzzing_every_command_keeps_the_session_alive_and_the_disk_clean(tmp_path, monkeypatch):
    box = Sandbox(tmp_path)
    monkeypatch.setenv("HOME", str(box.home))
    monkeypatch.setenv("TMPDIR", str(box.temp))
    monkeypatch.delenv("ONTHEFLY_HOME", raising=False)
    monkeypatch.chdir(box.cwd)
    monkeypatch.setattr(storage, "temp_roots", lambda: (box.temp.resolve(),))
    assert not os.path.exists(REAL_TMP_PROBE)
    before = box.snapshot()

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(96, 8, generator=g), torch.randint(0, 3, (96,), generator=g))
    trainer = Trainer(project="fuzz", max_epochs=None, transport="memory")
    session = trainer.session
    session.channel.connect()
    wire = Wire(session.channel)
    model = make_model()
    thread = threading.Thread(
        target=trainer.fit, name="fuzz-training", daemon=True,
        kwargs=dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                    loss_fn=SlowLoss(), train_loader=DataLoader(data, batch_size=16, shuffle=True),
                    val_loader=DataLoader(data, batch_size=48), test_loader=DataLoader(data, batch_size=48),
                    seed=0, model_factory=make_model),
    )
    thread.start()
    deadline = time.monotonic() + 30
    while session.state.step < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert session.state.step >= 20, "training never started"

    described = session.router.describe()
    generator = Generator(described, box, ["baseline"])
    findings: list[str] = []
    stuck: list[str] = []
    tried: dict[str, int] = {}

    def note(kind: str, request: dict, reply: Any) -> None:
        findings.append(f"[{kind}] {request['cmd']} {short(request['payload'])}"
                        f"{' (' + request['note'] + ')' if request['note'] else ''} -> {short(reply)}")

    def barrage(batch: list[dict], junk: list[tuple[str, str | None]]) -> None:
        if stuck:
            return  # a handler hangs: the rest would only time out behind it
        sent: list[tuple[str, dict]] = []
        for drawn in batch:
            request = {**drawn, "payload": generator.materialize(drawn["payload"])}
            tried[request["cmd"]] = tried.get(request["cmd"], 0) + 1
            sent.append((wire.send(request["cmd"], request["payload"]), request))
        raw: list[tuple[str, str, str]] = []
        for template, code in junk:
            rid = wire.send_raw(template)
            if rid is not None:
                raw.append((rid, template, code))
        missing = wire.wait([rid for rid, _ in sent] + [rid for rid, _, _ in raw], REPLY_TIMEOUT)
        for rid, request in sent:
            if rid in missing:
                note("no reply", request, f"nothing within {REPLY_TIMEOUT:.0f} s")
                stuck.append(rid)
                continue
            replies = wire.replies[rid]
            reply = replies[0]
            if len(replies) != 1:
                note("replies", request, f"{len(replies)} replies: {replies}")
            if request["mode"] == "known" and (reply["ok"] or reply.get("code") not in REFUSED):
                note("known attack not refused", request, reply)
                continue
            if request["mode"] == "ok" and not reply["ok"]:
                note("ordinary request refused", request, reply)
                continue
            if reply["ok"]:
                # A hostile *read* path may be accepted (reads are allowed anywhere); what it must
                # never do is fail with `failed` when the file turns out not to be a checkpoint.
                if request["mode"] == "junk":
                    note("junk accepted", request, reply)
                elif request["mode"] == "hostile":
                    note("hostile accepted", request, reply)
                data = reply.get("data")
                if isinstance(data, dict) and isinstance(data.get("new_run"), str):
                    generator.runs.append(data["new_run"])
                continue
            code = reply.get("code")
            if code not in ErrorCode.ALL:
                note("unknown code", request, reply)
            elif code == ErrorCode.FAILED:
                note("failed", request, reply)
            elif request["mode"] == "junk" and code != ErrorCode.BAD_PAYLOAD:
                note("junk not bad_payload", request, reply)
            elif request["mode"] in ("hostile", "hostile-read") and code not in REFUSED | {ErrorCode.NOT_PAUSED}:
                note("hostile not refused", request, reply)
        for rid, template, code in raw:
            if rid in missing:
                findings.append(f"[no reply] raw line {template!r}")
            elif wire.replies[rid][0].get("code") != code:
                findings.append(f"[raw line] {template!r} -> {short(wire.replies[rid][0])}, expected {code}")
        wire.poll()
        if wire.finished or not thread.is_alive():
            # Training died (or ended) during this batch: say after what, and stop here.
            ended = wire.finished[-1] if wire.finished else "the training thread is gone"
            findings.append(f"[crash] training ended during the batch {[(r['cmd'], r['payload']) for _, r in sent]}"
                            f": {short(ended)}")
            stuck.append("training ended")

    started = time.monotonic()
    path_attacks, value_attacks = known_attacks(box)
    barrage(path_attacks, [])
    # Every command gets its share of examples; set_hparams last, its known attacks after it,
    # because a value that kills training would leave nothing alive to fuzz.
    order = sorted(set(described) - EXCLUDED - {"set_hparams"}) + ["set_hparams"]
    for cmd in order:
        fuzz = settings(max_examples=EXAMPLES_PER_COMMAND, derandomize=True, database=None, deadline=None,
                        phases=[Phase.generate], suppress_health_check=list(HealthCheck))(
            given(batch=st.lists(generator.request(cmd), min_size=1, max_size=3),
                  junk=st.lists(st.sampled_from(JUNK_LINES), max_size=1))(barrage)
        )
        fuzz()
    for request in value_attacks:
        barrage([request], [])
    fuzz_seconds = time.monotonic() - started

    # Training goes on after the barrage: resume, and watch the step advance.
    resumed = wire.request("resume", {}, timeout=30)
    if resumed is None or not resumed["ok"]:
        findings.append(f"[end] resume after the barrage -> {short(resumed)}")
    first = session.state.step
    deadline = time.monotonic() + 15
    while session.state.step <= first + 5 and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.01)
    if session.state.step <= first + 5:
        findings.append(f"[end] training does not advance after the barrage (step {first} -> "
                        f"{session.state.step}, thread alive: {thread.is_alive()})")
    stopped = wire.request("stop", {}, timeout=30)
    if stopped is None or not stopped["ok"]:
        findings.append(f"[end] stop -> {short(stopped)}")
    thread.join(60)
    if thread.is_alive():
        findings.append("[end] the training thread did not end after stop")
        session.close()
    wire.poll()
    for finished in wire.finished:
        if finished.get("status") == "failed":
            findings.append(f"[end] trainingFinished failed: {short(finished)}")

    # Nothing outside the allowed folders was created; nothing that existed was changed.
    after = box.snapshot()
    for path, digest in sorted(after.items()):
        if path not in before and not box.allowed(path):
            findings.append(f"[disk] created outside the allowed folders: {path}")
    for path, digest in sorted(before.items()):
        if after.get(path) != digest:
            findings.append(f"[disk] pre-existing {path} was {'removed' if path not in after else 'changed'}")
    if os.path.exists(REAL_TMP_PROBE) or any(p.startswith(f"otf-fuzz-{TOKEN}") for p in os.listdir("/tmp")):
        findings.append(f"[disk] wrote into the real /tmp: {REAL_TMP_PROBE}")

    if os.path.exists(REAL_TMP_PROBE):
        shutil.rmtree(REAL_TMP_PROBE, ignore_errors=True)  # after recording it: leave /tmp as it was
    coverage = ", ".join(f"{cmd} {n}" for cmd, n in sorted(tried.items()))
    untried = sorted(set(described) - EXCLUDED - set(tried))
    summary = (f"{len(findings)} finding(s) from {sum(tried.values())} requests in {fuzz_seconds:.0f} s "
               f"(commands: {coverage}; never drawn: {untried or 'none'})")
    assert not findings, summary + "\n" + "\n".join(findings)
