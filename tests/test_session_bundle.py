"""Session bundles: export, verify and import round trips, and every way a bundle is refused."""

from __future__ import annotations

import gc
import io
import json
import sqlite3
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

from onthefly.checkpoints import load_checkpoint, save_checkpoint
from onthefly.control.eventlog import EventLog
from onthefly.storage import SessionStorage
from onthefly.session_bundle import (
    BUNDLE_SCHEMA,
    BUNDLE_VERSION,
    BundleError,
    BundleInfo,
    encode_manifest,
    export_session,
    import_session,
    latest_checkpoint,
    verify_bundle,
)

SAFE_NAME = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")

# run -> (parents, kind, checkpoint steps)
RUNS: dict[str, tuple[list[str], str, list[int]]] = {
    "base": ([], "root", [10, 20]),
    "fork1": (["base"], "fork", [30, 40, 50]),
    "fork2": (["base"], "fork", [35]),
    "merge1": (["fork1", "fork2"], "merge", [60, 70]),
}
EVENT_COUNT = 25


def model_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"fc.weight": torch.randn(4, 3, generator=g), "fc.bias": torch.randn(4, generator=g)}


class FakeSession:
    """A session folder as SessionStorage lays it out, with an event log kept open (WAL unmerged)."""

    def __init__(self, root: Path) -> None:
        self.storage = SessionStorage(root, "proj", "sess-20240101-abc")
        self.storage.create({"project": "proj", "run_name": "base"})
        self.folder = self.storage.folder
        for run_id, (parents, kind, steps) in RUNS.items():
            manifest = {"run_id": run_id, "parents": parents, "kind": kind, "meta": {"kind": kind},
                        "hparams": {"lr": 0.1}, "status": "finished"}
            run_dir = self.storage.run_dir(run_id)
            run_dir.mkdir(parents=True)
            (run_dir / "run.json").write_text(json.dumps(manifest, indent=2))
            for step in steps:
                save_checkpoint(self.storage.checkpoint_dir(run_id) / f"step-{step:08d}.pt",
                                {"model": model_state(step), "step": step}, meta={"run_id": run_id})
        self.log = EventLog(self.storage.events_db)
        self.log.append_many([(seq, "trainStep", json.dumps({"type": "trainStep", "step": seq}))
                              for seq in range(1, EVENT_COUNT + 1)])

    def files(self) -> dict[str, bytes]:
        """Every file but the live event log (whose state sits partly in its -wal file)."""
        return {p.relative_to(self.folder).as_posix(): p.read_bytes()
                for p in sorted(self.folder.rglob("*")) if p.is_file() and not p.name.startswith("events.db")}


@pytest.fixture
def session(tmp_path: Path) -> Iterator[FakeSession]:
    fake = FakeSession(tmp_path / "home")
    yield fake
    fake.log.close()


def event_rows(db: Path) -> list[tuple[int, str]]:
    conn = sqlite3.connect(str(db))
    try:
        return conn.execute("SELECT seq, body FROM events ORDER BY seq").fetchall()
    finally:
        conn.close()


def resign(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Edit a bundle's manifest and give it a valid checksum again, so only the edit is under test."""
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    manifest.pop("manifest_sha256")
    (folder / "manifest.json").write_bytes(encode_manifest(manifest))


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    index = len(data) // 2 if offset is None else offset
    data[index] ^= 0x01
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def test_export_folder_writes_manifest_lineage_and_consistent_event_log(session: FakeSession, tmp_path: Path) -> None:
    assert (session.folder / "events.db-wal").exists()  # rows still live in the WAL
    out = export_session(session.folder, tmp_path / "bundle")
    assert out == tmp_path / "bundle" and out.is_dir()
    manifest = json.loads((out / "manifest.json").read_text())

    assert manifest["schema"] == BUNDLE_SCHEMA and manifest["version"] == BUNDLE_VERSION
    assert manifest["session_id"] == "sess-20240101-abc" and manifest["project"] == "proj"
    assert manifest["onthefly_version"] == "0.2.0"
    assert manifest["event_log"] == "events.db"
    assert sorted(manifest["lineage"]) == [["base", "fork1"], ["base", "fork2"], ["fork1", "merge1"],
                                           ["fork2", "merge1"]]
    for run_id, (parents, kind, steps) in RUNS.items():
        run = manifest["runs"][run_id]
        assert (run["parents"], run["kind"], run["status"]) == (parents, kind, "finished")
        assert [c["step"] for c in run["checkpoints"]] == steps
        assert run["latest"] == f"runs/{run_id}/checkpoints/step-{steps[-1]:08d}.pt"
        for entry in run["checkpoints"]:
            source = session.folder / entry["file"]
            assert entry["size"] == source.stat().st_size
            assert manifest["files"][entry["file"]] == entry["sha256"]

    # Every file is listed, byte-identical to the session's, with safe names only.
    listed = set(manifest["files"])
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert on_disk == listed | {"manifest.json"}
    assert all(set(part) <= SAFE_NAME for rel in on_disk for part in rel.split("/"))
    for rel, data in session.files().items():
        assert (out / rel).read_bytes() == data

    # The event log copy holds every row although they were not checkpointed out of the WAL,
    # and it is a single-file database (rollback journal, no -wal beside it).
    assert event_rows(out / "events.db") == session.log.read_after(0, limit=100)
    assert len(event_rows(out / "events.db")) == EVENT_COUNT
    assert (out / "events.db").read_bytes()[18:20] == b"\x01\x01"
    assert not list(tmp_path.glob(".bundle*"))


def test_export_latest_only_keeps_the_newest_checkpoint_of_each_run(session: FakeSession, tmp_path: Path) -> None:
    out = export_session(session.folder, tmp_path / "latest", latest_only=True)
    info = verify_bundle(out)
    for run_id, (_parents, _kind, steps) in RUNS.items():
        ckpts = sorted((out / "runs" / run_id / "checkpoints").iterdir())
        assert [p.name for p in ckpts] == [f"step-{steps[-1]:08d}.pt"]
        assert [c["step"] for c in info.manifest["runs"][run_id]["checkpoints"]] == [steps[-1]]


def test_export_refuses_an_existing_out_path_unless_overwrite(session: FakeSession, tmp_path: Path) -> None:
    out = tmp_path / "bundle.tgz"
    out.write_bytes(b"precious")
    with pytest.raises(BundleError, match="already exists"):
        export_session(session.folder, out)
    assert out.read_bytes() == b"precious"
    export_session(session.folder, out, overwrite=True)
    assert verify_bundle(out).manifest["session_id"] == "sess-20240101-abc"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.tgz", "home"]


def test_export_never_overwrites_the_session_itself(session: FakeSession, tmp_path: Path) -> None:
    before = session.files()
    with pytest.raises(BundleError, match="session folder"):
        export_session(session.folder, session.folder, overwrite=True)
    with pytest.raises(BundleError, match="session folder"):
        export_session(session.folder, session.folder.parent, overwrite=True)
    with pytest.raises(BundleError, match="runs folder"):
        export_session(session.folder, session.folder / "runs" / "b.tgz")
    assert session.files() == before


def test_export_into_the_sessions_exports_folder(session: FakeSession) -> None:
    out = export_session(session.folder, session.storage.exports / "snap.tar")
    assert sorted(verify_bundle(out).runs) == sorted(RUNS)


def test_export_failure_leaves_no_partial_bundle(session: FakeSession, tmp_path: Path) -> None:
    session.log.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{session.storage.events_db}{suffix}").unlink(missing_ok=True)
    session.storage.events_db.write_bytes(b"this is not an sqlite database" * 10)
    for name in ("bundle", "bundle.tar.gz"):
        with pytest.raises(BundleError, match=r"events\.db.*SQLite"):
            export_session(session.folder, tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


def test_export_of_a_folder_that_is_not_a_session_is_refused(tmp_path: Path) -> None:
    (tmp_path / "not-a-session").mkdir()
    with pytest.raises(BundleError, match=r"session\.json.*missing"):
        export_session(tmp_path / "not-a-session", tmp_path / "out")
    with pytest.raises(BundleError, match="is not a folder"):
        export_session(tmp_path / "nowhere", tmp_path / "out")


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bundle", "bundle.tar.gz", "bundle.tgz", "bundle.tar"])
def test_round_trip_imports_byte_identical_loadable_session(session: FakeSession, tmp_path: Path, name: str) -> None:
    out = export_session(session.folder, tmp_path / name)
    assert out.is_dir() == (name == "bundle")
    if name.endswith(("gz", "tgz")):
        assert out.read_bytes()[:2] == b"\x1f\x8b"
    if name.endswith(".tar"):
        assert tarfile.is_tarfile(out) and out.read_bytes()[:2] != b"\x1f\x8b"

    info = verify_bundle(out)
    assert isinstance(info, BundleInfo) and info.path == out
    assert info.runs == sorted(RUNS)

    imported = import_session(out, tmp_path / "elsewhere")
    target = tmp_path / "elsewhere" / "proj" / "sess-20240101-abc"
    assert imported.folder == target and imported.session_id == "sess-20240101-abc"
    for rel, data in session.files().items():
        assert (target / rel).read_bytes() == data, rel
    assert event_rows(target / "events.db") == session.log.read_after(0, limit=100)
    assert not (target / "manifest.json").exists()

    for run_id, (_parents, _kind, steps) in RUNS.items():
        path = latest_checkpoint(imported, run_id)
        assert path == target / "runs" / run_id / "checkpoints" / f"step-{steps[-1]:08d}.pt"
        document = load_checkpoint(path)
        assert document["step"] == steps[-1] and document["meta"] == {"run_id": run_id}
        for key, tensor in model_state(steps[-1]).items():
            assert torch.equal(document["model"][key], tensor)

    # The imported folder is a session SessionStorage and EventLog can use again.
    storage = SessionStorage(tmp_path / "elsewhere", "proj", "sess-20240101-abc")
    assert storage.run_ids() == sorted(RUNS)
    log = EventLog(storage.events_db)
    try:
        assert log.last_seq() == EVENT_COUNT
    finally:
        log.close()


def test_import_defaults_to_onthefly_home(session: FakeSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = export_session(session.folder, tmp_path / "b.tgz")
    monkeypatch.setenv("ONTHEFLY_HOME", str(tmp_path / "otherhome"))
    info = import_session(out)
    assert info.folder == tmp_path / "otherhome" / "proj" / "sess-20240101-abc"
    assert (info.folder / "session.json").read_bytes() == (session.folder / "session.json").read_bytes()


def test_verify_accepts_the_manifest_path_and_cleans_unpacked_archives(session: FakeSession, tmp_path: Path) -> None:
    folder = export_session(session.folder, tmp_path / "b")
    assert verify_bundle(folder / "manifest.json").folder == folder

    info = verify_bundle(export_session(session.folder, tmp_path / "b.tgz"))
    unpacked = info.folder
    assert (unpacked / "manifest.json").is_file()
    assert latest_checkpoint(info, "merge1").name == "step-00000070.pt"
    del info
    gc.collect()
    assert not unpacked.exists()


# --------------------------------------------------------------------------------------------
# Import never overwrites
# --------------------------------------------------------------------------------------------


def test_importing_twice_never_overwrites(session: FakeSession, tmp_path: Path) -> None:
    out = export_session(session.folder, tmp_path / "b.tgz")
    dest = tmp_path / "dest"
    first = import_session(out, dest)
    ckpt = first.folder / "runs" / "fork1" / "checkpoints" / "step-00000050.pt"
    inode = ckpt.stat().st_ino

    # The same bundle again: the folder is byte-identical, so it is accepted and left alone.
    again = import_session(out, dest)
    assert again.folder == first.folder and ckpt.stat().st_ino == inode

    # Once the imported session has moved on, a re-import is refused and the new data survives.
    run_json = first.folder / "runs" / "merge1" / "run.json"
    run_json.write_text(run_json.read_text().replace("finished", "running"))
    with pytest.raises(BundleError, match=r"already exists and differs.*runs/merge1/run\.json"):
        import_session(out, dest)
    assert "running" in run_json.read_text()

    # A newer bundle of the same session (one more checkpoint) is refused too.
    save_checkpoint(session.storage.checkpoint_dir("fork2") / "step-00000099.pt", {"model": model_state(99)})
    newer = export_session(session.folder, tmp_path / "newer")
    with pytest.raises(BundleError, match="already exists and differs"):
        import_session(newer, dest)
    assert not (first.folder / "runs" / "fork2" / "checkpoints" / "step-00000099.pt").exists()
    assert sorted(p.name for p in (dest / "proj").iterdir()) == ["sess-20240101-abc"]


# --------------------------------------------------------------------------------------------
# Tampering
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rel", [
    "runs/fork1/checkpoints/step-00000040.pt",
    "runs/merge1/checkpoints/step-00000070.pt",
    "runs/fork2/run.json",
    "events.db",
    "session.json",
    "manifest.json",
])
def test_a_flipped_byte_is_refused_naming_the_file(session: FakeSession, tmp_path: Path, rel: str) -> None:
    out = export_session(session.folder, tmp_path / "bundle")
    flip_byte(out / rel)
    with pytest.raises(BundleError) as caught:
        verify_bundle(out)
    assert rel in str(caught.value)
    with pytest.raises(BundleError) as caught:
        import_session(out, tmp_path / "dest")
    assert rel in str(caught.value)
    assert not (tmp_path / "dest" / "proj" / "sess-20240101-abc").exists()


@pytest.mark.parametrize("offset", [0, 40, -3])
def test_any_changed_manifest_byte_is_detected(session: FakeSession, tmp_path: Path, offset: int) -> None:
    out = export_session(session.folder, tmp_path / "bundle")
    size = (out / "manifest.json").stat().st_size
    flip_byte(out / "manifest.json", offset % size)
    with pytest.raises(BundleError, match=r"manifest\.json"):
        verify_bundle(out)


def test_the_manifest_digest_itself_is_checked(session: FakeSession, tmp_path: Path) -> None:
    out = export_session(session.folder, tmp_path / "bundle")
    raw = (out / "manifest.json").read_bytes()
    digest = json.loads(raw)["manifest_sha256"]
    other = ("1" if digest[0] != "1" else "2") + digest[1:]
    (out / "manifest.json").write_bytes(raw.replace(digest.encode(), other.encode()))
    with pytest.raises(BundleError, match=r"manifest\.json: checksum mismatch"):
        verify_bundle(out)


def test_a_damaged_archive_is_refused(session: FakeSession, tmp_path: Path) -> None:
    out = export_session(session.folder, tmp_path / "b.tar.gz")
    flip_byte(out)
    with pytest.raises(BundleError, match=r"b\.tar\.gz"):
        verify_bundle(out)
    (tmp_path / "junk.tgz").write_bytes(b"not an archive at all")
    with pytest.raises(BundleError, match=r"junk\.tgz: could not be unpacked"):
        verify_bundle(tmp_path / "junk.tgz")
    with pytest.raises(BundleError, match="does not exist"):
        verify_bundle(tmp_path / "missing.tgz")


@pytest.mark.parametrize("evil, problem", [
    ("../evil", "contains '..'"),
    ("runs/../../evil", "contains '..'"),
    ("/etc/passwd", "absolute"),
    ("C:/evil", "absolute"),
    ("\\\\server\\share\\evil", "absolute"),
    ("runs/a:b.pt", "characters outside [A-Za-z0-9._-]"),
])
def test_unsafe_manifest_paths_are_refused(session: FakeSession, tmp_path: Path, evil: str, problem: str) -> None:
    out = export_session(session.folder, tmp_path / "bundle")
    resign(out, lambda m: m["files"].__setitem__(evil, "0" * 64))
    with pytest.raises(BundleError, match=r"manifest\.json: unsafe path") as caught:
        verify_bundle(out)
    assert problem in str(caught.value)
    with pytest.raises(BundleError, match="unsafe path"):
        import_session(out, tmp_path / "dest")
    assert not (tmp_path / "dest").exists() and not (tmp_path / "evil").exists()


def test_unsafe_checkpoint_and_run_entries_are_refused(session: FakeSession, tmp_path: Path) -> None:
    out = export_session(session.folder, tmp_path / "bundle")

    def point_outside(m: dict[str, Any]) -> None:
        m["runs"]["fork1"]["checkpoints"][0]["file"] = "../outside.pt"

    resign(out, point_outside)
    with pytest.raises(BundleError, match=r"unsafe path '\.\./outside\.pt' in runs\['fork1'\]"):
        verify_bundle(out)

    out = export_session(session.folder, tmp_path / "bundle2")
    resign(out, lambda m: m["runs"].__setitem__("..", {"parents": [], "checkpoints": [], "latest": None}))
    with pytest.raises(BundleError, match="unsafe run name '..'"):
        verify_bundle(out)

    out = export_session(session.folder, tmp_path / "bundle3")
    resign(out, lambda m: m.__setitem__("session_id", "../../escape"))
    with pytest.raises(BundleError, match="bad manifest: session_id"):
        import_session(out, tmp_path / "dest")
    assert not (tmp_path / "escape").exists()


def test_a_symlink_escaping_the_bundle_is_refused(session: FakeSession, tmp_path: Path) -> None:
    out = export_session(session.folder, tmp_path / "bundle")
    outside = tmp_path / "outside.db"
    outside.write_bytes((out / "events.db").read_bytes())  # same bytes, same checksum
    (out / "events.db").unlink()
    (out / "events.db").symlink_to(outside)
    with pytest.raises(BundleError, match=r"events\.db: is a symbolic link"):
        verify_bundle(out)

    runs_outside = tmp_path / "runs-outside"
    (out / "runs").rename(runs_outside)
    (out / "events.db").unlink()
    outside.rename(out / "events.db")
    (out / "runs").symlink_to(runs_outside, target_is_directory=True)
    with pytest.raises(BundleError, match="resolves outside the bundle"):
        verify_bundle(out)


def test_wrong_schema_or_version_is_refused(session: FakeSession, tmp_path: Path) -> None:
    out = export_session(session.folder, tmp_path / "bundle")
    resign(out, lambda m: m.__setitem__("version", BUNDLE_VERSION + 1))
    with pytest.raises(BundleError, match="newer onthefly"):
        verify_bundle(out)
    resign(out, lambda m: m.__setitem__("schema", "something.else"))
    with pytest.raises(BundleError, match="schema is 'something.else'"):
        verify_bundle(out)
    (out / "manifest.json").unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        verify_bundle(out)


def test_missing_listed_file_is_refused(session: FakeSession, tmp_path: Path) -> None:
    out = export_session(session.folder, tmp_path / "bundle")
    (out / "runs" / "fork2" / "checkpoints" / "step-00000035.pt").unlink()
    with pytest.raises(BundleError, match=r"runs/fork2/checkpoints/step-00000035\.pt: missing"):
        verify_bundle(out)


# --------------------------------------------------------------------------------------------
# Hostile archives
# --------------------------------------------------------------------------------------------


def rebuild_archive(bundle: Path, dest: Path, extra: Callable[[tarfile.TarFile], None]) -> Path:
    """A .tar.gz of a real bundle folder plus hostile members added by `extra`."""
    with tarfile.open(dest, "w:gz") as tar:
        for path in sorted(bundle.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=path.relative_to(bundle).as_posix())
        extra(tar)
    return dest


def add_file(tar: tarfile.TarFile, name: str, data: bytes = b"evil") -> None:
    member = tarfile.TarInfo(name)
    member.size = len(data)
    tar.addfile(member, io.BytesIO(data))


def add_link(tar: tarfile.TarFile, name: str, target: str, kind: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.type = kind
    member.linkname = target
    tar.addfile(member)


@pytest.mark.parametrize("extra, problem", [
    (lambda tar: add_file(tar, "../evil"), "unsafe member path '../evil': contains '..'"),
    (lambda tar: add_file(tar, "runs/../../evil"), "contains '..'"),
    (lambda tar: add_file(tar, "/tmp/onthefly-evil"), "absolute"),
    (lambda tar: add_link(tar, "runs/link.pt", "/etc/passwd", tarfile.SYMTYPE), "is a link"),
    (lambda tar: add_link(tar, "hard.pt", "session.json", tarfile.LNKTYPE), "is a link"),
    (lambda tar: add_link(tar, "fifo", "", tarfile.FIFOTYPE), "not a regular file or folder"),
    (lambda tar: add_file(tar, "session.json", b"{}"), "appears more than once"),
])
def test_hostile_tar_members_are_refused_before_extraction(
    session: FakeSession, tmp_path: Path, extra: Callable[[tarfile.TarFile], None], problem: str
) -> None:
    folder = export_session(session.folder, tmp_path / "bundle")
    archive = rebuild_archive(folder, tmp_path / "hostile.tar.gz", extra)
    with pytest.raises(BundleError, match=r"hostile\.tar\.gz") as caught:
        verify_bundle(archive)
    assert problem in str(caught.value)
    with pytest.raises(BundleError):
        import_session(archive, tmp_path / "dest")
    assert not (tmp_path / "evil").exists() and not Path("/tmp/onthefly-evil").exists()
    assert not (tmp_path / "dest").exists()


def test_a_plain_rebuilt_archive_is_accepted(session: FakeSession, tmp_path: Path) -> None:
    folder = export_session(session.folder, tmp_path / "bundle")
    archive = rebuild_archive(folder, tmp_path / "plain.tar.gz", lambda tar: None)
    assert verify_bundle(archive).runs == sorted(RUNS)


# --------------------------------------------------------------------------------------------
# latest_checkpoint
# --------------------------------------------------------------------------------------------


def test_latest_checkpoint_errors_name_the_run(session: FakeSession, tmp_path: Path) -> None:
    info = import_session(export_session(session.folder, tmp_path / "b"), tmp_path / "dest")
    with pytest.raises(BundleError, match="run 'nope' is not in the bundle"):
        latest_checkpoint(info, "nope")
    latest_checkpoint(info, "fork2").unlink()
    with pytest.raises(BundleError, match=r"step-00000035\.pt: missing"):
        latest_checkpoint(info, "fork2")


def test_runs_without_checkpoints_or_with_unsafe_ids_are_recorded(tmp_path: Path) -> None:
    storage = SessionStorage(tmp_path / "home", "proj", "s1")
    storage.create({"project": "proj"})
    # The root run id has a space; its folder is the sanitised name (as older sessions wrote it).
    (storage.folder / "runs" / "my-run").mkdir(parents=True)
    (storage.folder / "runs" / "my-run" / "run.json").write_text(json.dumps({"run_id": "my run", "parents": []}))
    storage.run_dir("fork1").mkdir(parents=True)
    (storage.run_dir("fork1") / "run.json").write_text(json.dumps({"run_id": "fork1", "parents": ["my run"]}))
    save_checkpoint(storage.checkpoint_dir("fork1") / "step-00000001.pt", {"step": 1})
    out = export_session(storage.folder, tmp_path / "b")
    info = verify_bundle(out)
    assert info.manifest["lineage"] == [["my-run", "fork1"]]
    assert info.manifest["event_log"] is None
    with pytest.raises(BundleError, match="run 'my run' has no checkpoint"):
        latest_checkpoint(info, "my run")
    assert latest_checkpoint(info, "fork1").name == "step-00000001.pt"
