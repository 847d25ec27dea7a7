"""memory.atomic: a whole-file write leaves the old file or the new one, and no temp file behind."""
from __future__ import annotations

import os
import stat

import pytest

from memory.atomic import atomic_write


def test_atomic_write_replaces_the_file_whole(tmp_path):
    target = tmp_path / "sub" / "pool.bin"
    atomic_write(target, lambda tmp: tmp.write_bytes(b"first"))
    atomic_write(target, lambda tmp: tmp.write_bytes(b"second"))
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["pool.bin"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "index.json"
    target.write_text("old")

    def half_written(tmp):
        tmp.write_text("new but incomplete")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_written)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json"]


def test_the_new_file_keeps_the_mode_of_the_one_it_replaces(tmp_path):
    target = tmp_path / "pool.bin"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    atomic_write(target, lambda tmp: tmp.write_bytes(b"new"))
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640
    os.chmod(target, 0o444)  # read-only: the fsync of the temp file must not need write access
    atomic_write(target, lambda tmp: tmp.write_bytes(b"newer"))
    assert target.read_bytes() == b"newer" and stat.S_IMODE(os.stat(target).st_mode) == 0o444


def test_a_new_file_gets_the_umask_default_mode_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "fresh.json", lambda tmp: tmp.write_text("{}"))
        os.umask(0o027)
        atomic_write(tmp_path / "other.json", lambda tmp: tmp.write_text("{}"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "fresh.json").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "other.json").st_mode) == 0o640


def test_the_file_is_fsynced_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    steps = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        steps.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        steps.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write(tmp_path / "delta.safetensors", lambda tmp: tmp.write_bytes(b"x"))
    assert steps == ["fsync file", "rename", "fsync dir"]


def test_stale_temp_files_of_killed_writes_are_removed_young_ones_kept(tmp_path):
    import os

    from memory.atomic import remove_stale_temps

    target = tmp_path / "pool.safetensors"
    old, young = tmp_path / ".pool.safetensors.dead.tmp", tmp_path / ".pool.safetensors.live.tmp"
    other = tmp_path / ".other.safetensors.dead.tmp"
    for f in (old, young, other):
        f.write_bytes(b"half a file")
    os.utime(old, (0, 0))
    os.utime(other, (0, 0))
    assert remove_stale_temps(target) == 1
    assert not old.exists() and young.exists() and other.exists()  # only this file's temps, only old ones
    assert remove_stale_temps(tmp_path / "missing-dir" / "pool.safetensors") == 0
