"""Recording fakes of the service ports (agent/services/ports.py).

Both fakes append to one shared journal so tests can assert the order of
calls across ports, not only within one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

from agent.domain.errors import AlreadyExists, Unavailable
from agent.domain.network.choice import NetworkChoice
from agent.domain.network.wiring import PodNetworkStatus
from agent.domain.sandbox import DNSConfig, Metadata, PortMapping, Sandbox, SandboxSpec, SandboxState
from agent.services.ports import Ports

Event = tuple[object, ...]


class Journal:
    """Thread-safe, ordered list of every port call."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events: list[Event] = []

    def record(self, *event: object) -> None:
        with self._lock:
            self.events.append(event)

    def of(self, prefix: str) -> list[Event]:
        with self._lock:
            return [e for e in self.events if str(e[0]).startswith(prefix)]

    def clear(self) -> None:
        with self._lock:
            self.events.clear()


class FakeClock:
    """Strictly increasing nanoseconds, 1000 apart."""

    def __init__(self, start: int = 1_000_000) -> None:
        self._lock = threading.Lock()
        self._now = start

    def now_ns(self) -> int:
        with self._lock:
            self._now += 1000
            return self._now


class RecordingStore:
    """In-memory SandboxStore with the real store's uniqueness rules."""

    def __init__(self, journal: Journal, delay: float = 0.0) -> None:
        self.journal = journal
        self.rows: dict[str, Sandbox] = {}
        self.fail_update: BaseException | None = None
        self._delay = delay  # widens race windows in concurrency tests
        self._lock = threading.Lock()

    def insert_sandbox(self, sandbox: Sandbox) -> None:
        self.journal.record("store.insert", sandbox.id, sandbox.state)
        if self._delay:
            time.sleep(self._delay)
        key = sandbox.spec.metadata.reservation_key
        with self._lock:
            if sandbox.id in self.rows or any(
                r.spec.metadata.reservation_key == key for r in self.rows.values()
            ):
                raise AlreadyExists(f"sandbox {key} is already stored")
            self.rows[sandbox.id] = sandbox

    def update_sandbox(self, sandbox: Sandbox) -> None:
        self.journal.record("store.update", sandbox.id, sandbox.state)
        if self.fail_update is not None:
            raise self.fail_update
        with self._lock:
            if sandbox.id in self.rows:
                self.rows[sandbox.id] = sandbox

    def delete_sandbox(self, sandbox_id: str) -> None:
        self.journal.record("store.delete", sandbox_id)
        with self._lock:
            self.rows.pop(sandbox_id, None)

    def load_sandboxes(self) -> list[Sandbox]:
        self.journal.record("store.load")
        with self._lock:
            return sorted(self.rows.values(), key=lambda s: s.created_at_ns)


class RecordingFiles:
    """SandboxFiles that only remembers which directories exist."""

    def __init__(self, journal: Journal, root: Path = Path("/state/sandboxes")) -> None:
        self.journal = journal
        self.root = root
        self.dirs: set[str] = set()
        self.log_dirs: set[str] = set()
        self.fail_create: BaseException | None = None
        self.fail_log_directory: BaseException | None = None
        self._lock = threading.Lock()

    def sandbox_dir(self, sandbox_id: str) -> Path:
        return self.root / sandbox_id

    def create_sandbox_dir(self, sandbox_id: str) -> Path:
        self.journal.record("files.create_sandbox_dir", sandbox_id)
        if self.fail_create is not None:
            raise self.fail_create
        with self._lock:
            self.dirs.add(sandbox_id)
        return self.root / sandbox_id

    def remove_sandbox_dir(self, sandbox_id: str) -> None:
        self.journal.record("files.remove_sandbox_dir", sandbox_id)
        with self._lock:
            self.dirs.discard(sandbox_id)

    def list_sandbox_dirs(self) -> list[str]:
        self.journal.record("files.list_sandbox_dirs")
        with self._lock:
            return sorted(self.dirs)

    def ensure_log_directory(self, path: str) -> None:
        self.journal.record("files.ensure_log_directory", path)
        if self.fail_log_directory is not None:
            raise self.fail_log_directory
        if path:
            with self._lock:
                self.log_dirs.add(path)


class RecordingNetwork:
    """SandboxNetwork: records calls; ``lost`` sandboxes fail recover() as
    after a host reboot; ``cached`` are the ids with a CNI cache entry."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.lost: set[str] = set()
        self.cached: list[str] = []

    def add(self, sandbox_id: str, name: str, namespace: str, uid: str, port_mappings: Sequence[PortMapping],
            dns: DNSConfig, hostname: str, workdir: Path) -> PodNetworkStatus:
        raise AssertionError("not used by recovery")

    def status(self, sandbox_id: str, workdir: Path) -> PodNetworkStatus | None:
        self.journal.record("network.status", sandbox_id)
        return None

    def readiness(self) -> NetworkChoice:
        raise AssertionError("not used by the sandbox service")

    def remove(self, sandbox_id: str, workdir: Path) -> None:
        self.journal.record("network.remove", sandbox_id)

    def ensure_dhcp(self, sandbox_id: str, workdir: Path) -> bool:
        self.journal.record("network.ensure_dhcp", sandbox_id)
        return True

    def recover(self, sandbox_id: str, workdir: Path) -> None:
        self.journal.record("network.recover", sandbox_id)
        if sandbox_id in self.lost:
            raise Unavailable(f"the pod network namespace podvisor-{sandbox_id} is gone (host rebooted?)")

    def cached_sandbox_ids(self) -> list[str]:
        self.journal.record("network.cached_sandbox_ids")
        return list(self.cached)


class RecordingMembers:
    """SandboxMembers: records which sandbox's VM was stopped or removed."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def stop_in_sandbox(self, sandbox_id: str) -> None:
        self.journal.record("members.stop", sandbox_id)

    def remove_in_sandbox(self, sandbox_id: str) -> None:
        self.journal.record("members.remove", sandbox_id)


class FakePorts:
    """The bundle a service receives, plus handles on each fake (and the
    sandbox service's members)."""

    def __init__(self, store_delay: float = 0.0, *, network: bool = False) -> None:
        self.journal = Journal()
        self.store = RecordingStore(self.journal, delay=store_delay)
        self.files = RecordingFiles(self.journal)
        self.clock = FakeClock()
        self.network = RecordingNetwork(self.journal) if network else None
        self.ports = Ports(store=self.store, files=self.files, clock=self.clock, network=self.network)
        self.members = RecordingMembers(self.journal)


def spec(
    name: str = "vm-1",
    namespace: str = "default",
    uid: str = "uid-1",
    attempt: int = 0,
    labels: dict[str, str] | None = None,
    log_directory: str = "/var/log/pods/default_vm-1_uid-1",
) -> SandboxSpec:
    return SandboxSpec(
        metadata=Metadata(name, namespace, uid, attempt),
        hostname=name,
        log_directory=log_directory,
        labels=labels or {},
    )


def sandbox(sandbox_id: str, state: SandboxState, name: str, created_at_ns: int) -> Sandbox:
    return Sandbox(id=sandbox_id, spec=spec(name=name, uid=f"uid-{name}"), state=state,
                   created_at_ns=created_at_ns)
