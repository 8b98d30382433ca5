"""Container records keep their pod volumes (the share entries) across a restart;
a record written before mounts existed reads back with none."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path

from agent.adapters.store import Store
from agent.domain.vm import ContainerState
from agent.domain.volumes import Mount, Propagation, Share
from tests.services.container_fakes import record

SHARES = (Share(Mount("/etc/config", "/h/cfg", readonly=True, propagation=Propagation.HOST_TO_CONTAINER), "0", True),
          Share(Mount("/dev/termination-log", "/h/t"), "1", False))


def test_shares_round_trip(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    c = dataclasses.replace(record("1" * 64, ContainerState.CREATED), shares=SHARES)
    store.save_container(c)
    store.close()
    again = Store(tmp_path / "db.sqlite")
    [loaded] = again.load_containers()
    assert loaded == c
    assert loaded.mounts == tuple(s.mount for s in SHARES)
    again.close()


def test_a_record_from_before_mounts_reads_back_without_any(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    c = record("2" * 64, ContainerState.RUNNING)
    store.save_container(c)
    store.close()
    db = sqlite3.connect(tmp_path / "db.sqlite")
    doc = json.loads(db.execute("SELECT doc FROM containers").fetchone()[0])
    del doc["shares"]
    db.execute("UPDATE containers SET doc = ?", (json.dumps(doc),))
    db.commit()
    db.close()
    again = Store(tmp_path / "db.sqlite")
    [loaded] = again.load_containers()
    assert loaded.shares == () and loaded == c
    again.close()
