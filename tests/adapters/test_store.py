"""The SQLite store on a temporary file: round trips, constraints, schema."""

from __future__ import annotations

import dataclasses
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.adapters.store import MIGRATIONS, Store
from agent.domain.errors import AlreadyExists, Internal
from agent.domain.sandbox import (
    DNSConfig,
    Metadata,
    NetworkMode,
    PortMapping,
    Sandbox,
    SandboxSpec,
    SandboxState,
)


def full_sandbox(
    sandbox_id: str = "a" * 64,
    name: str = "vm-1",
    attempt: int = 2,
    created_at_ns: int = 1_700_000_000_123_456_789,
) -> Sandbox:
    """A sandbox with every field set to something other than its default."""
    spec = SandboxSpec(
        metadata=Metadata(name=name, namespace="tenant-a", uid="5f0c-uid", attempt=attempt),
        hostname="vm-1.tenant-a",
        log_directory="/var/log/pods/tenant-a_vm-1_5f0c-uid",
        dns=DNSConfig(servers=("10.96.0.10", "fd00::10"),
                      searches=("tenant-a.svc.cluster.local", "cluster.local"),
                      options=("ndots:5", "edns0")),
        port_mappings=(
            PortMapping("tcp", 80, 8080, "127.0.0.1"),
            PortMapping("udp", 53, 5353),
            PortMapping("sctp", 9, 0, "::1"),
        ),
        labels={"app": "web", "io.kubernetes.pod.name": "vm-1", "ünicode": "välue"},
        annotations={"podvisor.io/vcpus": "2", "podvisor.io/user-data": "#cloud-config\n"},
        runtime_handler="podvisor",
        network_mode=NetworkMode.NODE,
        cgroup_parent="/kubepods/burstable/pod5f0c",
        sysctls={"net.ipv4.ip_local_port_range": "1024 65535", "kernel.shm_rmid_forced": "1"},
    )
    return Sandbox(
        id=sandbox_id,
        spec=spec,
        state=SandboxState.NOTREADY,
        created_at_ns=created_at_ns,
        stopped_at_ns=1_700_000_100_000_000_000,
        ip="10.88.0.7",
        additional_ips=("fd00:88::7", "10.89.0.7"),
    )


def minimal_sandbox(sandbox_id: str, name: str, created_at_ns: int,
                    state: SandboxState = SandboxState.READY) -> Sandbox:
    return Sandbox(id=sandbox_id, spec=SandboxSpec(metadata=Metadata(name, "default", "uid")),
                   state=state, created_at_ns=created_at_ns)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "podvisor.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    s = Store(db_path)
    yield s
    s.close()


def test_round_trip_of_every_field(store: Store) -> None:
    sb = full_sandbox()
    store.insert_sandbox(sb)
    loaded = store.load_sandboxes()
    assert loaded == [sb]
    got = loaded[0]
    # Spot-check types that equality alone would not catch.
    assert isinstance(got.spec.dns.servers, tuple)
    assert isinstance(got.spec.port_mappings, tuple)
    assert isinstance(got.additional_ips, tuple)
    assert got.spec.network_mode is NetworkMode.NODE
    assert got.state is SandboxState.NOTREADY


def test_round_trip_of_defaults(store: Store) -> None:
    sb = minimal_sandbox("b" * 64, "plain", 5)
    store.insert_sandbox(sb)
    assert store.load_sandboxes() == [sb]
    assert store.load_sandboxes()[0].spec.network_mode is NetworkMode.POD


def test_update_changes_state_and_document(store: Store) -> None:
    sb = full_sandbox()
    store.insert_sandbox(dataclasses.replace(sb, state=SandboxState.CREATING, ip=""))
    updated = dataclasses.replace(sb, state=SandboxState.READY, ip="10.88.0.9",
                                  stopped_at_ns=0)
    store.update_sandbox(updated)
    assert store.load_sandboxes() == [updated]


def test_update_of_a_missing_row_changes_nothing(store: Store) -> None:
    store.update_sandbox(full_sandbox())
    assert store.load_sandboxes() == []


def test_delete(store: Store) -> None:
    a = minimal_sandbox("a" * 64, "a", 1)
    b = minimal_sandbox("b" * 64, "b", 2)
    store.insert_sandbox(a)
    store.insert_sandbox(b)
    store.delete_sandbox(a.id)
    assert store.load_sandboxes() == [b]
    store.delete_sandbox(a.id)  # deleting again is harmless
    assert store.load_sandboxes() == [b]


def test_load_orders_by_creation_time(store: Store) -> None:
    later = minimal_sandbox("1" * 64, "later", 300)
    first = minimal_sandbox("2" * 64, "first", 100)
    middle = minimal_sandbox("3" * 64, "middle", 200)
    for sb in (later, first, middle):
        store.insert_sandbox(sb)
    assert [s.spec.metadata.name for s in store.load_sandboxes()] == ["first", "middle", "later"]


def test_duplicate_reservation_key_is_already_exists(store: Store) -> None:
    first = full_sandbox("a" * 64)
    store.insert_sandbox(first)
    clash = full_sandbox("b" * 64)  # same name, namespace, uid, attempt
    with pytest.raises(AlreadyExists) as exc_info:
        store.insert_sandbox(clash)
    assert first.spec.metadata.reservation_key in exc_info.value.message
    assert store.load_sandboxes() == [first]


def test_another_attempt_is_not_a_duplicate(store: Store) -> None:
    store.insert_sandbox(full_sandbox("a" * 64, attempt=0))
    store.insert_sandbox(full_sandbox("b" * 64, attempt=1))
    assert len(store.load_sandboxes()) == 2


def test_duplicate_id_is_already_exists(store: Store) -> None:
    store.insert_sandbox(full_sandbox("a" * 64, name="one"))
    with pytest.raises(AlreadyExists):
        store.insert_sandbox(full_sandbox("a" * 64, name="two"))
    assert [s.spec.metadata.name for s in store.load_sandboxes()] == ["one"]


def test_name_can_be_reused_after_delete(store: Store) -> None:
    store.insert_sandbox(full_sandbox("a" * 64))
    store.delete_sandbox("a" * 64)
    store.insert_sandbox(full_sandbox("b" * 64))
    assert [s.id for s in store.load_sandboxes()] == ["b" * 64]


def test_reopening_gives_the_same_data(db_path: Path) -> None:
    sandboxes = [full_sandbox("a" * 64, created_at_ns=1),
                 full_sandbox("b" * 64, name="vm-2", created_at_ns=2)]
    s = Store(db_path)
    for sb in sandboxes:
        s.insert_sandbox(sb)
    s.update_sandbox(dataclasses.replace(sandboxes[1], state=SandboxState.REMOVING))
    s.close()

    reopened = Store(db_path)
    try:
        assert reopened.load_sandboxes() == [
            sandboxes[0], dataclasses.replace(sandboxes[1], state=SandboxState.REMOVING)]
        assert reopened.schema_version == len(MIGRATIONS)
    finally:
        reopened.close()


def test_commits_are_visible_to_another_connection(store: Store, db_path: Path) -> None:
    store.insert_sandbox(full_sandbox())
    other = sqlite3.connect(db_path)
    try:
        rows = other.execute("SELECT id, name, state FROM sandboxes").fetchall()
    finally:
        other.close()
    assert rows == [("a" * 64, "vm-1", "notready")]


def test_wal_mode_is_on(store: Store, db_path: Path) -> None:
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_schema_version_is_the_number_of_migrations(store: Store, db_path: Path) -> None:
    assert store.schema_version == len(MIGRATIONS)
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    finally:
        conn.close()


def test_db_file_is_private(store: Store, db_path: Path) -> None:
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600


def test_failed_transaction_is_rolled_back(store: Store) -> None:
    with pytest.raises(RuntimeError), store.transaction() as db:
        db.execute("INSERT INTO sandboxes (id, name, namespace, uid, attempt, state,"
                   " created_at_ns, doc) VALUES ('x', 'n', 'ns', 'u', 0, 'ready', 1, '{}')")
        raise RuntimeError("boom")
    assert store.load_sandboxes() == []
    # The store is usable afterwards (no transaction left open).
    store.insert_sandbox(full_sandbox())
    assert len(store.load_sandboxes()) == 1


def _bump_user_version(path: Path, version: int) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.execute(f"PRAGMA user_version = {version}")
        conn.commit()
    finally:
        conn.close()


def test_newer_schema_is_refused_and_left_alone(db_path: Path) -> None:
    s = Store(db_path)
    s.insert_sandbox(full_sandbox())
    s.close()
    newer = len(MIGRATIONS) + 1
    _bump_user_version(db_path, newer)
    before = db_path.read_bytes()

    with pytest.raises(Internal) as exc_info:
        Store(db_path)
    assert f"schema version {newer}" in exc_info.value.message
    assert db_path.read_bytes() == before


def test_newer_schema_in_rollback_journal_mode_is_left_alone(tmp_path: Path) -> None:
    """A database from elsewhere (not yet WAL) with a newer schema: not one byte changes.

    The refusal promises not to touch the file, so the check must come before
    the store switches the journal mode to WAL (which rewrites the header).
    """
    path = tmp_path / "podvisor.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE future (x)")
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    before = path.read_bytes()

    with pytest.raises(Internal, match="schema version 99"):
        Store(path)
    assert path.read_bytes() == before


def test_upgrade_from_an_empty_file_runs_every_migration(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    sqlite3.connect(db_path).close()  # an empty database at version 0
    s = Store(db_path)
    try:
        assert s.schema_version == len(MIGRATIONS)
        s.insert_sandbox(full_sandbox())
        assert len(s.load_sandboxes()) == 1
    finally:
        s.close()
