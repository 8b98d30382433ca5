"""write_atomic: the one way the agent writes a state file (issue #10, item 10)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent.adapters import atomic
from agent.adapters.atomic import write_atomic


def _fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return synced


def test_replaces_the_file_syncing_it_and_its_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "podnet.json"
    target.write_bytes(b"old")
    synced = _fsyncs(monkeypatch)
    write_atomic(target, b'{"new": 1}')
    assert target.read_bytes() == b'{"new": 1}'
    # The temporary file first (before the rename), then the directory (after it).
    assert len(synced) == 2 and synced[0].startswith(str(tmp_path / ".podnet.json.")) and synced[1] == str(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["podnet.json"]


def test_mode_is_private_by_default_and_settable(tmp_path: Path) -> None:
    write_atomic(tmp_path / "a", b"x")
    write_atomic(tmp_path / "b", b"x", mode=0o640)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "b").stat().st_mode) == 0o640


def test_a_failed_write_keeps_the_old_content_and_leaves_no_temporary(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "state"
    target.write_bytes(b"old")

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state"]


def test_a_symlink_at_the_target_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    target = tmp_path / "state"
    target.symlink_to(victim)
    write_atomic(target, b"new")
    assert victim.read_bytes() == b"keep"
    assert not target.is_symlink() and target.read_bytes() == b"new"


def test_fsync_dir_syncs_the_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced = _fsyncs(monkeypatch)
    atomic.fsync_dir(tmp_path)
    assert synced == [str(tmp_path)]
