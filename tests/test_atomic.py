"""memory.atomic: a whole-file write leaves the old file or the new one, and no temp file behind."""
from __future__ import annotations

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
