"""The path policy: reads from anywhere readable; writes only where the rules allow (docs/security.md).

Every test runs in a sandbox: HOME, the working directory and the temp folder are folders under
pytest's tmp_path, and the real /tmp is not a temp root here, so "outside" really is outside.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from onthefly.control import ErrorCode, ProtocolError, UnsafeName, check_safe_name
from onthefly.fileio import atomic_write
from onthefly import storage
from onthefly.storage import MARKER, SessionStorage, resolve_read_path, safe_component


class Sandbox:
    def __init__(self, root: Path) -> None:
        self.home = root / "home"
        self.cwd = root / "work"
        self.temp = root / "temp"
        self.outside = root / "outside"
        self.allowed = root / "allowed"
        for folder in (self.home / "Downloads", self.cwd, self.temp, self.outside, self.allowed):
            folder.mkdir(parents=True)
        self.storage = SessionStorage(self.cwd / ".onthefly", "proj", "sess-mine", (str(self.allowed),))
        self.storage.create({"project": "proj"})
        self.sibling = self.storage.project_dir / "sess-other"
        self.sibling.mkdir()
        (self.sibling / MARKER).write_text("{}")


@pytest.fixture
def box(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    sandbox = Sandbox(tmp_path)
    monkeypatch.setenv("HOME", str(sandbox.home))
    monkeypatch.chdir(sandbox.cwd)
    monkeypatch.setattr(storage, "temp_roots", lambda: (sandbox.temp.resolve(),))
    return sandbox


def refused(call, *args, code: str = ErrorCode.BAD_PAYLOAD, **kwargs) -> str:
    with pytest.raises(ProtocolError) as info:
        call(*args, **kwargs)
    assert info.value.code == code
    return info.value.message


# ---- reads ---------------------------------------------------------------------------------------


def test_reads_are_allowed_from_anywhere_readable(box: Sandbox):
    ckpt = box.outside / "model.pt"
    ckpt.write_bytes(b"x")
    assert resolve_read_path(str(ckpt), "payload.init_ckpt") == ckpt.resolve()
    downloaded = box.home / "Downloads" / "bundle" / "step-1.pt"
    downloaded.parent.mkdir()
    downloaded.write_bytes(b"x")
    assert box.storage.resolve_read_path("~/Downloads/bundle/step-1.pt", "payload.init_ckpt") == downloaded.resolve()
    other = box.sibling / "runs" / "a" / "step-1.pt"  # other sessions may be read
    other.parent.mkdir(parents=True)
    other.write_bytes(b"x")
    assert resolve_read_path(str(other), "payload.paths[0]") == other.resolve()


def test_reads_refuse_what_is_not_a_readable_file(box: Sandbox):
    assert refused(resolve_read_path, str(box.outside / "nope.pt"), "payload.path", code=ErrorCode.NOT_FOUND) == (
        f"payload.path: no such file {str(box.outside / 'nope.pt')!r}"
    )
    assert refused(resolve_read_path, str(box.outside), "payload.path").endswith("is a folder; expected a file")
    assert refused(resolve_read_path, "a\x00b", "payload.path") == "payload.path: the path contains a NUL byte"
    assert refused(resolve_read_path, "", "payload.path") == "payload.path: expected a non-empty path"
    assert refused(resolve_read_path, 5, "payload.path") == "payload.path: expected a path string, got int"
    assert "which holds devices and kernel state" in refused(resolve_read_path, "/proc/self/environ", "payload.path")
    assert "which holds devices" in refused(resolve_read_path, "/dev/zero", "payload.path")


# ---- writes that the extension's dialogs make, and ours ------------------------------------------


def test_writes_allowed_by_default(box: Sandbox):
    write = box.storage.resolve_write_path
    assert write("exports/a.csv", "payload.out_path") == (box.cwd / "exports" / "a.csv").resolve()
    own = box.storage.exports / "b.parquet"
    assert write(str(own), "payload.out_path", suffixes=(".parquet",)) == own.resolve()
    assert write("~/Downloads/region.csv", "payload.out_path", suffixes=(".csv",)) == (
        box.home / "Downloads" / "region.csv"
    ).resolve()
    assert write("~/projects/last-used/region.CSV", "payload.out_path", suffixes=(".csv",)).name == "region.CSV"
    assert write(str(box.allowed / "x.json"), "payload.out_path").parent == box.allowed.resolve()
    fresh = box.temp / "onthefly-export-1"
    assert write(str(fresh), "payload.dir", kind="dir") == fresh.resolve()
    empty = box.temp / "chosen"
    empty.mkdir()
    assert write(str(empty), "payload.dir", kind="dir") == empty.resolve()
    (empty / "bundle-1").mkdir()  # the export wrote into it: this process may use it again
    assert write(str(empty), "payload.dir", kind="dir") == empty.resolve()
    assert write(".", "payload.dir", kind="dir") == box.cwd.resolve()  # the working folder itself


def test_re_exporting_over_our_own_file_is_fine_over_anyone_elses_is_not(box: Sandbox):
    target = box.home / "Downloads" / "subset.csv"
    write = box.storage.resolve_write_path
    atomic_write(write(str(target), "payload.out_path"), lambda handle: handle.write(b"a\n"))
    assert write(str(target), "payload.out_path") == target.resolve()
    theirs = box.home / "Downloads" / "thesis.csv"
    theirs.write_text("precious")
    assert refused(write, str(theirs), "payload.out_path") == (
        f"payload.out_path: {str(theirs)!r} exists and was not written by onthefly in this process; "
        "refusing to overwrite it (choose a new name)"
    )
    (box.cwd / "data.csv").write_text("precious")
    assert "refusing to overwrite it" in refused(write, "data.csv", "payload.out_path")
    full = box.temp / "full"
    full.mkdir()
    (full / "notes.txt").write_text("x")
    assert "is a folder that is not empty and was not created by onthefly" in refused(
        write, str(full), "payload.dir", kind="dir"
    )


@pytest.mark.parametrize(
    "value, expected",
    [
        ("~/.bashrc", "is inside the hidden file or folder '.bashrc'"),
        ("~/.ssh/authorized_keys", "is inside the hidden file or folder '.ssh'"),
        ("~/.config/autostart/x.csv", "is inside the hidden file or folder '.config'"),
        ("~/Downloads/.hidden.csv", "is inside the hidden file or folder '.hidden.csv'"),
        (".git/hooks/pre-commit", "is inside the hidden file or folder '.git'"),
        ("/etc/cron.d/x.csv", "is inside the system folder /etc"),
        ("/usr/local/bin/x", "is inside the system folder /usr"),
        ("/proc/self/mem", "is inside the system folder /proc"),
        ("/dev/sda", "is inside the system folder /dev"),
        ("/var/spool/x.csv", "is inside the system folder /var"),
        ("/srv/x.csv", "is outside the folders onthefly writes to"),
        ("../outside/x.csv", "is outside the folders onthefly writes to"),
        ("../../../../../../../../../../tmp/x-subset.csv", "is outside the folders onthefly writes to"),
    ],
)
def test_writes_an_attacker_wants_are_refused(box: Sandbox, value: str, expected: str):
    message = refused(box.storage.resolve_write_path, value, "payload.out_path")
    assert message.startswith(f"payload.out_path: {value!r}") and expected in message
    assert not Path(os.path.expanduser(value)).exists() or value.startswith(("/proc", "/dev"))


def test_python_and_package_folders_are_refused(box: Sandbox):
    import onthefly

    write = box.storage.resolve_write_path
    package = Path(onthefly.__file__).parent / "evil.py"
    assert "is inside the onthefly package" in refused(write, str(package), "payload.out_path")
    for prefix in {sys.prefix, sys.base_prefix}:
        message = refused(write, os.path.join(prefix, "lib", "x.csv"), "payload.out_path")
        assert "the Python installation" in message or "site-packages" in message or "system folder" in message


def test_symbolic_links_do_not_lead_out(box: Sandbox):
    write = box.storage.resolve_write_path
    (box.cwd / "exports").mkdir()
    link = box.cwd / "exports" / "out.csv"
    link.symlink_to(box.home / "Downloads" / "x.csv")
    assert refused(write, str(link), "payload.out_path").endswith(
        "is a symbolic link; onthefly does not write through links"
    )
    escape = box.cwd / "escape"
    escape.symlink_to(box.outside)
    message = refused(write, "escape/x.csv", "payload.out_path")
    assert f"(it resolves to {str((box.outside / 'x.csv').resolve())!r})" in message
    assert "is outside the folders onthefly writes to" in message
    to_etc = box.cwd / "etc"
    to_etc.symlink_to("/etc")
    assert "is inside the system folder /etc" in refused(write, "etc/passwd", "payload.out_path")
    inside = box.cwd / "inside"
    inside.symlink_to(box.home / "Downloads")  # a link that stays within the allowed folders is fine
    assert write("inside/y.csv", "payload.out_path") == (box.home / "Downloads" / "y.csv").resolve()


def test_sessions_write_only_their_own_folder(box: Sandbox):
    write = box.storage.resolve_write_path
    message = refused(write, str(box.sibling / "exports" / "x.csv"), "payload.out_path")
    assert "is inside another onthefly session's folder" in message and str(box.sibling) in message
    assert "another onthefly session's folder" in refused(write, str(box.sibling), "payload.dir", kind="dir")
    for own in (MARKER, "events.db", "runs/baseline/run.json"):
        assert "is this session's own" in refused(write, str(box.storage.folder / own), "payload.out_path")


def test_suffix_and_kind_must_match_what_the_command_writes(box: Sandbox):
    write = box.storage.resolve_write_path
    assert refused(write, "subset.py", "payload.out_path", suffixes=(".csv", ".parquet")) == (
        "payload.out_path: 'subset.py' must end with .csv or .parquet (the kind of file this command writes)"
    )
    (box.cwd / "folder").mkdir()
    assert refused(write, "folder", "payload.out_path").endswith("exists and is not a file")
    (box.cwd / "file.txt").write_text("x")
    assert refused(write, "file.txt", "payload.dir", kind="dir").endswith("exists and is not a folder")
    assert "control character '\\n'" in refused(write, "a\nb.csv", "payload.out_path")
    with pytest.raises(ValueError, match="kind must be 'file' or 'dir'"):
        write("x.csv", "payload.out_path", kind="link")


# ---- names ---------------------------------------------------------------------------------------


def test_run_folders_use_the_one_name_rule(box: Sandbox):
    assert box.storage.run_dir("fork1") == box.storage.folder / "runs" / "fork1"
    for bad in ("/tmp/x", "../../x", "..", "a\\b", ".hidden"):
        with pytest.raises(UnsafeName) as info:
            box.storage.run_dir(bad)
        assert info.value.code == ErrorCode.BAD_PAYLOAD and info.value.message.startswith("run_id: ")


def test_safe_component_always_yields_a_safe_name():
    hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is in the dev extra")
    from hypothesis import strategies as st

    @hypothesis.settings(max_examples=400, derandomize=True, deadline=None, database=None)
    @hypothesis.given(st.text(max_size=300))
    def check(name: str) -> None:
        derived = safe_component(name)
        assert check_safe_name(derived, "name") == derived

    check()
    assert safe_component("My Project!") == "My-Project"
    assert safe_component("../../etc") == "etc" and safe_component("...") == "run"
