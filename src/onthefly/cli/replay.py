"""`onthefly replay SESSION_OR_BUNDLE [--run R] [--edit FILE]`: run a recorded run again, edits and all.

A run's manifest (`runs/<run>/run.json`) records how its script was launched (`launch`: command
line, working folder, a few environment variables), its ledger (every mutating command, with the
position it ran at) and its final state (`final`: status, step, weights digest). `replay` reads
them from a session folder or a session bundle (a folder, or a `.tar`/`.tar.gz` archive, read
without unpacking, each file checked against the bundle's checksums), writes a plan with the
ledger's edits, and starts the same command line in the same folder with `ONTHEFLY_REPLAY`
naming the plan. The session the script creates reads it, names its run `<run>-replay` (a child
of the source run), applies every edit at the same batch boundary, stops where the source run
was stopped, and reports back. Without `--edit` the replay must end with bit-identical weights:
the exit status is 0 if the weights digests match, 1 if they differ.

`--edit FILE` replaces the recorded edits by FILE's (a JSON list of entries, or an object with
`ledger` or `entries`, as `ledger_entry` events and manifests write them; `cmd`, `payload` and
`step` are required, `epoch` and `batch_in_epoch` optional): "what if I had lowered the learning
rate at step 500?", run as `<run>-edit` in the same lineage.

This module knows only files and JSON: it imports neither torch nor the session.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

__all__ = ["ReplaySourceError", "add_replay_parser", "build_plan", "cmd_replay", "read_edits", "read_source"]

REPLAY_ENV = "ONTHEFLY_REPLAY"
PLAN_FORMAT = "onthefly.replay"
MARKER = "session.json"
BUNDLE_MANIFEST = "manifest.json"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


class ReplaySourceError(ValueError):
    """The session, bundle, run or edit file cannot be replayed; the message says why."""


@dataclass
class ReplaySource:
    """What a replay reads from a session folder or bundle: the marker and every run's manifest."""

    path: Path
    marker: dict[str, Any]
    manifests: dict[str, dict[str, Any]]
    is_bundle: bool


def read_source(path: str | os.PathLike[str]) -> ReplaySource:
    """The marker and run manifests of a session folder, a bundle folder or a bundle archive."""
    source = Path(path).expanduser()
    if not source.exists():
        raise ReplaySourceError(f"{source}: no such session folder or bundle")
    if source.is_file():
        if not source.name.endswith(ARCHIVE_SUFFIXES):
            raise ReplaySourceError(f"{source}: not a session folder or a bundle (.tar, .tar.gz, .tgz)")
        files = read_archive(source)
    else:
        files = read_folder(source)
    if MARKER not in files:
        raise ReplaySourceError(f"{source}: no {MARKER}; expected a session folder <root>/<project>/<session_id>/ "
                                "or a session bundle")
    bundle = files.get(BUNDLE_MANIFEST)
    if bundle is not None:
        check_digests(source, parse_json(source, BUNDLE_MANIFEST, bundle), files)
    manifests = {}
    for name, raw in files.items():
        parts = name.split("/")
        if len(parts) == 3 and parts[0] == "runs" and parts[2] == "run.json":
            manifest = parse_json(source, name, raw)
            manifests[str(manifest.get("run_id") or parts[1])] = manifest
    return ReplaySource(source, parse_json(source, MARKER, files[MARKER]), manifests, bundle is not None)


def read_folder(folder: Path) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for name in (MARKER, BUNDLE_MANIFEST):
        if (folder / name).is_file():
            files[name] = (folder / name).read_bytes()
    runs = folder / "runs"
    if runs.is_dir():
        for run in sorted(runs.iterdir()):
            manifest = run / "run.json"
            if run.is_dir() and not run.name.startswith(".") and manifest.is_file():
                files[f"runs/{run.name}/run.json"] = manifest.read_bytes()
    return files


def read_archive(archive: Path) -> dict[str, bytes]:
    """The marker, bundle manifest and run manifests of an archive, read in memory (nothing is unpacked)."""
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = member.name[2:] if member.name.startswith("./") else member.name
                parts = name.split("/")
                wanted = name in (MARKER, BUNDLE_MANIFEST) or (
                    len(parts) == 3 and parts[0] == "runs" and parts[2] == "run.json"
                    and parts[1] not in ("", ".", "..") and not parts[1].startswith("."))
                if not wanted or not member.isfile():
                    continue
                reader = tar.extractfile(member)
                if reader is not None:
                    with reader:
                        files[name] = reader.read(64 << 20)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ReplaySourceError(f"{archive}: cannot be read as a tar archive ({type(exc).__name__}: {exc})") from exc
    return files


def check_digests(source: Path, manifest: dict[str, Any], files: dict[str, bytes]) -> None:
    """Each file read from a bundle must have the SHA-256 its manifest lists."""
    listed = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    for name, raw in files.items():
        if name == BUNDLE_MANIFEST:
            continue
        expected = listed.get(name)
        if expected is None:
            raise ReplaySourceError(f"{source}: {name} is not listed in the bundle's manifest")
        if hashlib.sha256(raw).hexdigest() != expected:
            raise ReplaySourceError(f"{source}: {name} does not match its checksum in the bundle's manifest")


def parse_json(source: Path, name: str, raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ReplaySourceError(f"{source}: {name} is not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise ReplaySourceError(f"{source}: {name} is not a JSON object")
    return value


def choose_run(source: ReplaySource, requested: str | None) -> str:
    """The run to replay: `requested`, else the session's first run (its root)."""
    manifests = source.manifests
    if requested is not None:
        if requested not in manifests:
            raise ReplaySourceError(f"{source.path}: no run {requested!r} (runs: {sorted(manifests) or 'none'})")
        return requested
    replayable = [r for r, m in manifests.items() if isinstance(m.get("launch"), dict)]
    if not replayable:
        raise ReplaySourceError(f"{source.path}: no run records how it was launched; runs: {sorted(manifests)}")
    return min(replayable, key=lambda r: manifests[r].get("created", 0.0))


def read_edits(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The entries of an edited ledger file (a list, or an object with `ledger` or `entries`)."""
    file = Path(path).expanduser()
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReplaySourceError(f"--edit {file}: cannot read a JSON ledger ({exc})") from exc
    if isinstance(value, dict):
        value = value.get("ledger", value.get("entries"))
    if not isinstance(value, list):
        raise ReplaySourceError(f"--edit {file}: expected a list of entries (or an object with `ledger`)")
    for number, entry in enumerate(value, 1):
        if not isinstance(entry, dict) or not isinstance(entry.get("cmd"), str):
            raise ReplaySourceError(f"--edit {file}: entry {number} needs `cmd` (a string)")
        step = entry.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ReplaySourceError(f"--edit {file}: entry {number} ({entry['cmd']}) needs `step` (an integer >= 0)")
        if not isinstance(entry.get("payload", {}), dict):
            raise ReplaySourceError(f"--edit {file}: entry {number} ({entry['cmd']}): `payload` must be an object")
    return value


def edits_of(entries: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """The entries a replay applies: successful edits; refused if the run was switched or rewound."""
    blocking = [e for e in entries if e.get("ok", True) and e.get("replay") in ("moves", "unknown")]
    if blocking:
        shown = ", ".join(f"{e['cmd']} (entry {e.get('seq')}, step {e.get('step')})" for e in blocking[:5])
        raise ReplaySourceError(f"{where}: the run was switched or rewound by {shown}; only runs whose ledger "
                                "holds edits, pauses, checkpoints, tests and reports can be replayed")
    keep = ("seq", "cmd", "payload", "step", "epoch", "batch_in_epoch", "at")
    return [{k: e[k] for k in keep if k in e} for e in entries
            if e.get("ok", True) and e.get("replay", "edit") == "edit"]


def build_plan(source: ReplaySource, run_id: str, edits: list[dict[str, Any]] | None = None,
               run_name: str | None = None, report: str | None = None) -> dict[str, Any]:
    """The plan file's content: the edits to apply, where to stop, what to expect."""
    manifest = source.manifests[run_id]
    if manifest.get("kind") not in ("root", "replay"):
        raise ReplaySourceError(f"{source.path}: run {run_id!r} is a {manifest.get('kind')} run; only a session's "
                                "first run (or a replay) can be replayed from its script")
    if not isinstance(manifest.get("launch"), dict):
        raise ReplaySourceError(f"{source.path}: run {run_id!r} does not record how it was launched")
    edited = edits is not None
    entries = edits_of(edits if edited else list(manifest.get("ledger") or []),
                       "--edit" if edited else f"{source.path}: run {run_id!r}")
    final = manifest.get("final") if isinstance(manifest.get("final"), dict) else {}
    checkpoint_steps = sorted({int(e["payload"]["step"]) for e in entries if e["cmd"] == "rollback"
                               and isinstance((e.get("payload") or {}).get("step"), int)})
    return {
        "format": PLAN_FORMAT, "version": 1,
        "source": {"session_id": source.marker.get("session_id"), "project": source.marker.get("project"),
                   "run_id": run_id, "folder": str(source.path.resolve())},
        "source_manifest": manifest,
        "run_name": run_name or f"{run_id}-{'edit' if edited else 'replay'}",
        "edited": edited,
        "entries": entries,
        "stop_at": final.get("step") if final.get("status") == "stopped" else None,
        "checkpoint_steps": checkpoint_steps,
        "expected": None if edited or "weights_sha256" not in final else
        {"step": final.get("step"), "weights_sha256": final["weights_sha256"]},
        "report": report,
    }


# ---- the subcommand -----------------------------------------------------------------------------


def add_replay_parser(sub: Any) -> None:
    replay = sub.add_parser("replay", help="run a recorded run's script again, applying its ledger (bit-exact)")
    replay.add_argument("source", metavar="SESSION_OR_BUNDLE", help="a session folder or a session bundle")
    replay.add_argument("--run", default=None, help="the run to replay (default: the session's first run)")
    replay.add_argument("--edit", metavar="FILE", default=None,
                        help="apply this edited ledger (JSON) instead of the recorded one, as a new run")
    replay.add_argument("--run-name", default=None, help="name of the replayed run (default RUN-replay / RUN-edit)")
    replay.add_argument("--cwd", default=None, help="working folder for the script (default: the recorded one)")
    replay.add_argument("--dry-run", action="store_true", help="print the plan and the command; run nothing")
    replay.set_defaults(handler=cmd_replay)


def cmd_replay(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    try:
        source = read_source(args.source)
        run_id = choose_run(source, args.run)
        edits = read_edits(args.edit) if args.edit else None
        with tempfile.TemporaryDirectory(prefix="onthefly-replay-") as folder:
            report = Path(folder) / "report.json"
            plan = build_plan(source, run_id, edits, args.run_name, str(report))
            launch = source.manifests[run_id]["launch"]
            argv = [str(a) for a in launch.get("argv") or []]
            cwd = Path(args.cwd or launch.get("cwd") or ".").expanduser()
            if not argv:
                raise ReplaySourceError(f"run {run_id!r}: the launch record has no command line")
            if not cwd.is_dir():
                raise ReplaySourceError(f"the recorded working folder {cwd} does not exist; pass --cwd")
            print(f"replaying run {run_id!r} of {source.path} ({len(plan['entries'])} edit(s)"
                  f"{', edited' if plan['edited'] else ''}) as {plan['run_name']!r}", file=stdout)
            print(f"  in {cwd}: {' '.join(argv)}", file=stdout)
            if args.dry_run:
                print(json.dumps({k: v for k, v in plan.items() if k != "source_manifest"}, indent=2), file=stdout)
                return 0
            plan_path = Path(folder) / "plan.json"
            plan_path.write_text(json.dumps(plan, indent=2), encoding="utf-8")
            env = {k: v for k, v in os.environ.items() if k != REPLAY_ENV}
            env.update({str(k): str(v) for k, v in (launch.get("env") or {}).items()})
            env[REPLAY_ENV] = str(plan_path)
            stdout.flush()
            try:
                code = subprocess.run(argv, cwd=cwd, env=env).returncode
            except OSError as exc:
                print(f"onthefly replay: cannot start {argv[0]}: {exc}", file=sys.stderr)
                return 1
            return summarize(report, code, plan, stdout)
    except ReplaySourceError as exc:
        print(f"onthefly replay: {exc}", file=sys.stderr)
        return 2


def summarize(report_path: Path, code: int, plan: dict[str, Any], stdout: TextIO) -> int:
    """Print what the replay did; the exit status: the script's, else 1 when the weights differ."""
    if not report_path.is_file():
        print(f"the script exited with code {code} without a replay report (did it create an onthefly session "
              "and finish training?)", file=stdout)
        return code or 1
    report = json.loads(report_path.read_text(encoding="utf-8"))
    final = report.get("final") or {}
    print(f"replay {report.get('run_id')!r} in {report.get('folder')}: applied {len(report.get('applied') or [])}, "
          f"failed {len(report.get('failed') or [])}, missed {len(report.get('missed') or [])}; "
          f"final step {final.get('step')}, weights sha256 {final.get('weights_sha256')}", file=stdout)
    for problem in (report.get("failed") or []) + (report.get("missed") or []):
        print(f"  entry {problem.get('seq')} ({problem.get('cmd')} at step {problem.get('step')}): "
              f"{problem.get('error') or 'never reached'}", file=stdout)
    if code:
        return code
    if report.get("match") is True:
        print("bit-exact: the final weights are identical to the source run's", file=stdout)
        return 0
    if report.get("match") is False:
        print(f"NOT bit-exact: the source run ended with weights sha256 {report.get('expected_sha256')}", file=stdout)
        return 1
    return 0 if not (report.get("failed") or report.get("missed")) else 1
