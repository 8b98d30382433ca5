"""A full filesystem in the writing adapters is ResourceExhausted (the
integration side, a real full tmpfs, is tests/integration/test_full_filesystem.py)."""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

import pytest

from agent.adapters.nospace import is_no_space, no_space_is_exhausted
from agent.adapters.store import Store
from agent.adapters.vm_files import VMFiles
from agent.domain.errors import ResourceExhausted
from tests.adapters.test_store import minimal_sandbox


@pytest.mark.parametrize("exc, full", [
    (OSError(errno.ENOSPC, "No space left on device"), True),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
    (OSError(errno.EACCES, "Permission denied"), False),
    (sqlite3.OperationalError("database is locked"), False),
    (ValueError("no space"), False),
])
def test_is_no_space(exc: BaseException, full: bool) -> None:
    assert is_no_space(exc) is full


def test_other_errors_pass_through() -> None:
    with pytest.raises(PermissionError), no_space_is_exhausted("writing", "/x"):
        raise PermissionError(errno.EACCES, "Permission denied")


def test_a_full_database_is_resource_exhausted_and_the_store_stays_usable(tmp_path: Path) -> None:
    store = Store(tmp_path / "podvisor.db")
    try:
        pages = int(store._db.execute("PRAGMA page_count").fetchone()[0])
        store._db.execute(f"PRAGMA max_page_count = {pages + 2}")
        with pytest.raises(ResourceExhausted, match="no space left on the filesystem of .*podvisor.db"):
            for i in range(200):
                store.insert_sandbox(minimal_sandbox(f"{i:064x}", f"pod{i}", i))
        stored = store.load_sandboxes()
        assert stored and not store._db.in_transaction
        store._db.execute("PRAGMA max_page_count = 1000000")
        store.insert_sandbox(minimal_sandbox("f" * 64, "after", 10_000))
        assert len(store.load_sandboxes()) == len(stored) + 1
        assert store._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        store.close()


def test_a_seed_that_cannot_be_written_is_resource_exhausted(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    files = VMFiles(tmp_path / "sandboxes", tmp_path / "run")

    def full(fd: int) -> None:
        # Where a full filesystem shows with delayed allocation: at the sync.
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(ResourceExhausted, match="cloud-init seed"):
        files.write_seed(str(tmp_path / "cloudinit.iso"), b"x" * 4096)
    # Written atomically: no seed and no temporary file are left.
    assert list(tmp_path.iterdir()) == []
