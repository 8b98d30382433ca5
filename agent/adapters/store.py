"""SQLite state store (WAL), with a versioned schema and migrations.

One connection, serialised by a lock: the agent's write rate is tiny (a few
rows per VM lifecycle) and reads are served from the services' in-memory
views, so a pool would buy nothing. ``synchronous=FULL`` makes every commit
durable before the RPC that caused it answers, so `kill -9` (or a power cut)
right after a reply never loses what the reply promised.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agent.adapters.nospace import exhausted, is_no_space
from agent.domain.errors import AlreadyExists, Internal
from agent.domain.image import BaseDisk, Image
from agent.domain.sandbox import (
    DNSConfig,
    Metadata,
    NetworkMode,
    PortMapping,
    Sandbox,
    SandboxSpec,
    SandboxState,
)
from agent.domain.vm import Container, ContainerState
from agent.domain.volumes import Mount, Propagation, Share

# Each entry moves the schema from version i to i+1. Append only.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE sandboxes (
        id            TEXT PRIMARY KEY,
        name          TEXT NOT NULL,
        namespace     TEXT NOT NULL,
        uid           TEXT NOT NULL,
        attempt       INTEGER NOT NULL,
        state         TEXT NOT NULL,
        created_at_ns INTEGER NOT NULL,
        doc           TEXT NOT NULL,
        UNIQUE (name, namespace, uid, attempt)
    );
    """,
    """
    CREATE TABLE images (
        id            TEXT PRIMARY KEY,
        created_at_ns INTEGER NOT NULL,
        doc           TEXT NOT NULL
    );
    """,
    """
    CREATE TABLE containers (
        id            TEXT PRIMARY KEY,
        sandbox_id    TEXT NOT NULL,
        state         TEXT NOT NULL,
        created_at_ns INTEGER NOT NULL,
        doc           TEXT NOT NULL
    );
    CREATE INDEX containers_by_sandbox ON containers (sandbox_id);
    """,
]


class Store:
    """Transactions over the agent database."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # SQLite gives the -wal and -shm files the database's mode: create it
        # private first (it holds user-data and keys).
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        # Refuse a newer schema before changing anything about the file.
        current = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if current > len(MIGRATIONS):
            self._db.close()
            raise Internal(
                f"state database schema version {current} is newer than this agent "
                f"understands ({len(MIGRATIONS)}); refusing to touch it"
            )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._migrate()
        path.chmod(0o600)

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        with self._lock:
            current = int(self._db.execute("PRAGMA user_version").fetchone()[0])
            for version in range(current, len(MIGRATIONS)):
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for statement in MIGRATIONS[version].split(";"):
                        if statement.strip():
                            self._db.execute(statement)
                    self._db.execute(f"PRAGMA user_version = {version + 1}")
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT, rolled back on any exception."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException as exc:
                # SQLite may have rolled back already (a full disk does that).
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if is_no_space(exc):
                    raise exhausted("writing the state database", self.path) from None
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # Sandboxes -----------------------------------------------------------

    def insert_sandbox(self, sandbox: Sandbox) -> None:
        md = sandbox.spec.metadata
        try:
            with self.transaction() as db:
                db.execute(
                    "INSERT INTO sandboxes (id, name, namespace, uid, attempt, state,"
                    " created_at_ns, doc) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (sandbox.id, md.name, md.namespace, md.uid, md.attempt,
                     sandbox.state.value, sandbox.created_at_ns, _sandbox_doc(sandbox)),
                )
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists(f"sandbox {md.reservation_key} is already stored: {exc}") from None

    def update_sandbox(self, sandbox: Sandbox) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE sandboxes SET state = ?, doc = ? WHERE id = ?",
                (sandbox.state.value, _sandbox_doc(sandbox), sandbox.id),
            )

    def delete_sandbox(self, sandbox_id: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM sandboxes WHERE id = ?", (sandbox_id,))

    def load_sandboxes(self) -> list[Sandbox]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, name, namespace, uid, attempt, state, created_at_ns, doc"
                " FROM sandboxes ORDER BY created_at_ns"
            ).fetchall()
        return [_sandbox_from_row(row) for row in rows]


    # Images --------------------------------------------------------------

    def save_images(self, images: list[Image], delete: tuple[str, ...] = ()) -> None:
        """Insert or replace image records (and delete some) in one transaction."""
        with self.transaction() as db:
            for image_id in delete:
                db.execute("DELETE FROM images WHERE id = ?", (image_id,))
            for img in images:
                db.execute(
                    "INSERT OR REPLACE INTO images (id, created_at_ns, doc) VALUES (?, ?, ?)",
                    (img.id, img.created_at_ns, _image_doc(img)),
                )

    def delete_image(self, image_id: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM images WHERE id = ?", (image_id,))

    def load_images(self) -> list[Image]:
        with self._lock:
            rows = self._db.execute("SELECT id, created_at_ns, doc FROM images ORDER BY created_at_ns").fetchall()
        return [_image_from_row(row) for row in rows]


    # Containers ----------------------------------------------------------

    def save_container(self, container: Container) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO containers (id, sandbox_id, state, created_at_ns, doc)"
                " VALUES (?, ?, ?, ?, ?)",
                (container.id, container.sandbox_id, container.state.value, container.created_at_ns,
                 _container_doc(container)),
            )

    def delete_container(self, container_id: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM containers WHERE id = ?", (container_id,))

    def load_containers(self) -> list[Container]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, sandbox_id, state, created_at_ns, doc FROM containers ORDER BY created_at_ns"
            ).fetchall()
        return [_container_from_row(row) for row in rows]


def _container_doc(c: Container) -> str:
    doc = dataclasses.asdict(c)
    for key in ("id", "sandbox_id", "state", "created_at_ns"):
        del doc[key]
    # The mounts (a record from before them has none: the key is optional).
    doc["shares"] = [{"name": s.name, "is_dir": s.is_dir, "container_path": s.mount.container_path,
                      "host_path": s.mount.host_path, "readonly": s.mount.readonly,
                      "propagation": s.mount.propagation.value} for s in c.shares]
    return json.dumps(doc, sort_keys=True)


def _share_from_doc(d: dict[str, Any]) -> Share:
    return Share(mount=Mount(container_path=d["container_path"], host_path=d["host_path"],
                             readonly=bool(d["readonly"]), propagation=Propagation(d["propagation"])),
                 name=d["name"], is_dir=bool(d["is_dir"]))


def _container_from_row(row: tuple[Any, ...]) -> Container:
    cid, sandbox_id, state, created_at_ns, raw = row
    doc = json.loads(raw)
    known = {f.name for f in dataclasses.fields(Container)}
    doc["shares"] = tuple(_share_from_doc(d) for d in doc.get("shares") or ())
    return Container(id=cid, sandbox_id=sandbox_id, state=ContainerState(state), created_at_ns=created_at_ns,
                     **{k: v for k, v in doc.items() if k in known})


def _image_doc(img: Image) -> str:
    doc = dataclasses.asdict(img)
    del doc["id"], doc["created_at_ns"]
    return json.dumps(doc, sort_keys=True)


def _image_from_row(row: tuple[Any, ...]) -> Image:
    image_id, created_at_ns, raw = row
    doc = json.loads(raw)
    return Image(
        id=image_id,
        created_at_ns=created_at_ns,
        manifest_digest=doc["manifest_digest"],
        repo_tags=tuple(doc["repo_tags"]),
        repo_digests=tuple(doc["repo_digests"]),
        size=doc["size"],
        layers=tuple(doc["layers"]),
        config_media_type=doc["config_media_type"],
        user=doc["user"],
        disks=tuple(BaseDisk(**d) for d in doc["disks"]),
        disk_problem=doc.get("disk_problem", ""),
    )


def _sandbox_doc(sb: Sandbox) -> str:
    spec = sb.spec
    doc: dict[str, Any] = {
        "hostname": spec.hostname,
        "log_directory": spec.log_directory,
        "dns": {"servers": list(spec.dns.servers), "searches": list(spec.dns.searches),
                "options": list(spec.dns.options)},
        "port_mappings": [
            {"protocol": p.protocol, "container_port": p.container_port,
             "host_port": p.host_port, "host_ip": p.host_ip}
            for p in spec.port_mappings
        ],
        "labels": dict(spec.labels),
        "annotations": dict(spec.annotations),
        "runtime_handler": spec.runtime_handler,
        "network_mode": spec.network_mode.value,
        "cgroup_parent": spec.cgroup_parent,
        "sysctls": dict(spec.sysctls),
        "stopped_at_ns": sb.stopped_at_ns,
        "ip": sb.ip,
        "additional_ips": list(sb.additional_ips),
    }
    return json.dumps(doc, sort_keys=True)


def _sandbox_from_row(row: tuple[Any, ...]) -> Sandbox:
    sid, name, namespace, uid, attempt, state, created_at_ns, raw = row
    doc = json.loads(raw)
    get: Callable[[str, Any], Any] = doc.get
    spec = SandboxSpec(
        metadata=Metadata(name=name, namespace=namespace, uid=uid, attempt=attempt),
        hostname=get("hostname", ""),
        log_directory=get("log_directory", ""),
        dns=DNSConfig(**{k: tuple(v) for k, v in get("dns", {}).items()}),
        port_mappings=tuple(PortMapping(**p) for p in get("port_mappings", [])),
        labels=get("labels", {}),
        annotations=get("annotations", {}),
        runtime_handler=get("runtime_handler", ""),
        network_mode=NetworkMode(get("network_mode", "pod")),
        cgroup_parent=get("cgroup_parent", ""),
        sysctls=get("sysctls", {}),
    )
    return Sandbox(
        id=sid,
        spec=spec,
        state=SandboxState(state),
        created_at_ns=created_at_ns,
        stopped_at_ns=get("stopped_at_ns", 0),
        ip=get("ip", ""),
        additional_ips=tuple(get("additional_ips", [])),
    )
