"""A full disk: every write says "no space left on device", where, and how much is free.

Two ways to fill a disk: a real 1 MiB tmpfs (needs permission to mount, e.g. root on Linux),
and — always available on Linux — redirecting the temp file of an atomic write to /dev/full,
whose every write fails with the kernel's own ENOSPC deep inside torch.save's zip writer.
"""

from __future__ import annotations

import builtins
import errno
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import torch

from onthefly import fileio
from onthefly.checkpoints import CheckpointError, CheckpointWriter, save_checkpoint
from onthefly.fileio import DiskFullError, atomic_write, disk_full_error, written_by_this_process

needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")


@pytest.fixture
def temp_writes_hit_dev_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every temp file `atomic_write` creates is /dev/full instead."""
    real_open = builtins.open

    def open_full(path, mode="r", *args, **kwargs):
        if "x" in mode:
            return real_open("/dev/full", "wb")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(fileio, "open", open_full, raising=False)


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    if sys.platform != "linux" or shutil.which("mount") is None:
        pytest.skip("needs Linux mount to create a tiny tmpfs")
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"no permission to mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def big_payload() -> dict:
    return {"w": torch.randn(1_000_000)}  # 4 MB


@needs_dev_full
def test_enospc_inside_torch_save_becomes_one_clear_checkpoint_error(tmp_path, temp_writes_hit_dev_full):
    target = tmp_path / "ckpt" / "step-1.pt"
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(target, big_payload())
    message = str(info.value)
    assert message.startswith(f"no space left on device while writing {target} (")
    assert message.endswith(f" free on {fileio.mount_point(tmp_path)})")
    assert "unexpected pos" not in message and "RuntimeError" not in message
    assert info.value.path == target
    cause = info.value.__cause__
    assert isinstance(cause, DiskFullError) and cause.errno == errno.ENOSPC
    assert not target.exists() and list(target.parent.iterdir()) == []


@needs_dev_full
def test_the_background_writer_reports_the_same_message(tmp_path, temp_writes_hit_dev_full):
    target = tmp_path / "step-2.pt"
    with CheckpointWriter() as writer:
        future = writer.submit(target, big_payload())
        with pytest.raises(CheckpointError, match=r"^no space left on device while writing "):
            future.result(timeout=60)


def test_a_real_full_file_system(tiny_tmpfs: Path):
    target = tiny_tmpfs / "runs" / "step-3.pt"
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(target, big_payload())
    assert str(info.value).startswith(f"no space left on device while writing {target} (")
    assert str(info.value).endswith(f"free on {tiny_tmpfs})")
    assert not target.exists() and list(target.parent.iterdir()) == []  # no temp file left behind
    # Plain atomic writes (exports, manifests) say the same, as an OSError with errno ENOSPC.
    with pytest.raises(DiskFullError) as raw:
        atomic_write(tiny_tmpfs / "table.csv", lambda handle: handle.write(b"x" * (2 << 20)))
    assert raw.value.errno == errno.ENOSPC and isinstance(raw.value, OSError)
    assert str(raw.value).startswith(f"no space left on device while writing {tiny_tmpfs / 'table.csv'}")


def test_free_space_decides_when_torch_hides_the_errno(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    hidden = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda path: usage._replace(free=4096))
    error = disk_full_error(tmp_path / "x.pt", hidden)
    assert isinstance(error, DiskFullError) and "(4.0 KiB free on " in str(error)
    assert disk_full_error(tmp_path / "x.pt", TypeError("cannot pickle")) is None  # not a write error
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda path: usage._replace(free=10 << 30))
    assert disk_full_error(tmp_path / "x.pt", hidden) is None  # plenty of space: some other failure
    chained = RuntimeError("write failed")
    chained.__context__ = OSError(errno.ENOSPC, "No space left on device")
    assert isinstance(disk_full_error(tmp_path / "x.pt", chained), DiskFullError)  # errno wins


def test_other_write_errors_propagate_unchanged(tmp_path: Path):
    def explode(handle):
        raise ValueError("bad table")

    with pytest.raises(ValueError, match="bad table"):
        atomic_write(tmp_path / "t.csv", explode)
    assert list(tmp_path.iterdir()) == []


def test_the_registry_records_what_this_process_wrote(tmp_path: Path):
    fresh = tmp_path / uuid.uuid4().hex / "deep" / "t.csv"
    assert not written_by_this_process(fresh)
    atomic_write(fresh, lambda handle: handle.write(b"a,b\n"))
    assert written_by_this_process(fresh) and written_by_this_process(fresh.parent)
    assert written_by_this_process(fresh.parent.parent)  # folders make_dirs created count too
    assert not written_by_this_process(tmp_path)  # ... but not the ones that already existed
    copy = fileio.atomic_copy(fresh, tmp_path / "copy.csv")
    assert copy.read_bytes() == b"a,b\n" and written_by_this_process(copy)
