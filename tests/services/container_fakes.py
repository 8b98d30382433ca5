"""Recording fakes of every ContainerService port (ContainerPorts in agent/services/ports.py).

All fakes append to one shared Journal (tests/services/service_fakes.py) so a
test can assert the order of calls across ports. No libvirt, no root, no disk.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from agent.concurrency import KeyedLock
from agent.domain.errors import NotFound
from agent.domain.hypervisor import DomainState, DomainStats
from agent.domain.image import BaseDisk, Image
from agent.domain.sandbox import Metadata, Sandbox, SandboxSpec, SandboxState
from agent.domain.vm import Container, ContainerPaths, ContainerSpec, ContainerState, VMRequest, WorkloadExit
from agent.domain.volumes import Mount, Share, shares
from agent.services.ports import ContainerPorts
from tests.services.service_fakes import FakeClock, Journal

STATE_ROOT = Path("/state/sandboxes")
SANDBOX_ID = "a" * 64
OTHER_SANDBOX_ID = "b" * 64
IMAGE_ID = "sha256:" + "c" * 64
IMAGE_REF = "quay.io/example/cirros:1"
LOG_DIR = "/var/log/pods/default_vm-1_uid-1"
MiB = 1 << 20

REQUEST = VMRequest(vcpus=1, max_vcpus=4, memory_bytes=256 * MiB, max_memory_bytes=1024 * MiB,
                    cpu_shares=512)
SEED = b"#cloud-config\n"
BASE_DISK = BaseDisk(path_in_image="/disk/cirros.qcow2", file="cirros.qcow2", format="qcow2",
                     virtual_size=112 * MiB, size=20 * MiB)
IMAGE = Image(id=IMAGE_ID, manifest_digest="sha256:" + "d" * 64, repo_tags=(IMAGE_REF,), repo_digests=(),
              size=21 * MiB, layers=("sha256:" + "e" * 64,), config_media_type="application/json", user="",
              disks=(BASE_DISK,), created_at_ns=1)
BASE_PATH = Path("/state/images/disks") / IMAGE_ID / "cirros.qcow2"

_NAME = re.compile(r"<name>([^<]+)</name>")


def sandbox(sandbox_id: str = SANDBOX_ID, state: SandboxState = SandboxState.READY,
            log_directory: str = LOG_DIR, cgroup_parent: str = "") -> Sandbox:
    return Sandbox(id=sandbox_id,
                   spec=SandboxSpec(metadata=Metadata("vm-1", "default", "uid-1"), hostname="vm-1",
                                    log_directory=log_directory, cgroup_parent=cgroup_parent),
                   state=state, created_at_ns=10)


def cspec(**overrides: Any) -> ContainerSpec:
    values: dict[str, Any] = dict(sandbox_id=SANDBOX_ID, name="vm", attempt=0, image=IMAGE_REF,
                                  log_path="vm/0.log", labels={"app": "web"})
    values.update(overrides)
    return ContainerSpec(**values)


class FakeStore:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.rows: dict[str, Container] = {}

    def save_container(self, c: Container) -> None:
        self.journal.record("store.save", c.id, c.state)
        self.rows[c.id] = c

    def delete_container(self, container_id: str) -> None:
        self.journal.record("store.delete", container_id)
        self.rows.pop(container_id, None)

    def load_containers(self) -> list[Container]:
        self.journal.record("store.load")
        return sorted(self.rows.values(), key=lambda c: c.created_at_ns)


class FakeLibvirt:
    """Domains by name: their XML and a DomainState a test can flip."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.xml: dict[str, str] = {}
        self.states: dict[str, DomainState] = {}
        self.acpi_powers_off = True  # shutdown_domain turns the domain off (guest obeys ACPI)
        self.agent_powers_off = False  # guest_shutdown turns it off (a guest agent answers)
        self.fail: dict[str, BaseException] = {}  # method name → exception to raise
        self.hooks: dict[str, Callable[[str], None]] = {}  # method name → called with the domain name
        self._lock = threading.Lock()

    def _enter(self, method: str, name: str, *extra: object) -> None:
        self.journal.record(f"libvirt.{method}", name, *extra)
        if method in self.fail:
            raise self.fail[method]
        hook = self.hooks.get(method)
        if hook is not None:
            hook(name)

    def set_state(self, name: str, state: str, reason: str = "") -> None:
        with self._lock:
            self.states[name] = DomainState(state, reason)

    def define_domain(self, xml: str) -> None:
        m = _NAME.search(xml)
        name = m.group(1) if m else "?"
        self._enter("define_domain", name)
        with self._lock:
            self.xml[name] = xml
            self.states[name] = DomainState("shutoff", "unknown")

    def start_domain(self, name: str) -> None:
        self._enter("start_domain", name)
        self.set_state(name, "running")

    def shutdown_domain(self, name: str) -> None:
        self._enter("shutdown_domain", name)
        if self.acpi_powers_off:
            self.set_state(name, "shutoff", "shutdown")

    def destroy_domain(self, name: str) -> bool:
        self._enter("destroy_domain", name)
        with self._lock:
            st = self.states.get(name)
            if st is None or st.state not in ("running", "paused"):
                return False
            self.states[name] = DomainState("shutoff", "destroyed")
            return True

    def undefine_domain(self, name: str) -> bool:
        self._enter("undefine_domain", name)
        with self._lock:
            self.states.pop(name, None)
            return self.xml.pop(name, None) is not None

    def domain_state(self, name: str) -> DomainState:
        self._enter("domain_state", name)
        with self._lock:
            return self.states.get(name, DomainState("missing"))

    def domain_xml(self, name: str) -> str:
        self._enter("domain_xml", name)
        return self.xml[name]

    def domain_stats(self, name: str) -> DomainStats:
        self._enter("domain_stats", name)
        return DomainStats(cpu_time_ns=5, rss_bytes=6, balloon_bytes=7, guest_available_bytes=8,
                           guest_unused_bytes=9)

    def set_domain_memory(self, name: str, size_bytes: int, *, live: bool) -> None:
        self._enter("set_domain_memory", name, size_bytes, live)

    def set_domain_vcpus(self, name: str, count: int, *, live: bool) -> None:
        self._enter("set_domain_vcpus", name, count, live)

    def domain_pid(self, name: str) -> int:
        self._enter("domain_pid", name)
        return 4242

    def guest_shutdown(self, name: str) -> None:
        self._enter("guest_shutdown", name)
        if self.agent_powers_off:
            self.set_state(name, "shutoff", "shutdown")

    def list_domains(self) -> dict[str, str]:
        self.journal.record("libvirt.list_domains")
        with self._lock:
            return dict(self.xml)


class FakeFiles:
    """VMFiles that only remembers which container directories exist."""

    def __init__(self, journal: Journal, root: Path = STATE_ROOT) -> None:
        self.journal = journal
        self.sandboxes = root
        self.dirs: set[str] = set()
        self.seeds: dict[str, bytes] = {}
        self.overlays: dict[str, tuple[Path, str]] = {}
        # directory → what the VM's command reported (absent: the VM has no command)
        self.workload_exits: dict[str, WorkloadExit] = {}
        # directory → what the guest's volume mount script reported
        self.volume_reports: dict[str, bytes] = {}

    def container_paths(self, sandbox_id: str, container_id: str) -> ContainerPaths:
        d = self.sandboxes / sandbox_id / "containers" / container_id
        return ContainerPaths(directory=str(d), overlay=str(d / "disk.qcow2"), seed=str(d / "cloudinit.iso"),
                              console_log=str(d / "console.raw"),
                              serial_socket=f"/run/podvisor/vm/{container_id[:32]}.serial",
                              guest_agent_socket=f"/run/podvisor/vm/{container_id[:32]}.qga",
                              workload_exit=str(d / "workload.exit"),
                              virtiofs_socket=f"/run/podvisor/vm/{container_id[:32]}.fs",
                              volumes_status=str(d / "volumes.status"))

    def create_container_dir(self, paths: ContainerPaths) -> None:
        self.journal.record("files.create_container_dir", paths.directory)
        self.dirs.add(paths.directory)

    def create_overlay(self, base: Path, base_format: str, overlay: str) -> None:
        self.journal.record("files.create_overlay", str(base), base_format, overlay)
        self.overlays[overlay] = (base, base_format)

    def write_seed(self, path: str, data: bytes) -> None:
        self.journal.record("files.write_seed", path, data)
        self.seeds[path] = data

    def remove_container_dir(self, directory: str) -> None:
        self.journal.record("files.remove_container_dir", directory)
        self.dirs.discard(directory)

    def console_state(self, directory: str) -> str:
        return f"{directory}/console.state"

    def workload_exit(self, directory: str) -> WorkloadExit | None:
        self.journal.record("files.workload_exit", directory)
        return self.workload_exits.get(directory)

    def volumes_report(self, directory: str) -> bytes:
        return self.volume_reports.get(directory, b"")

    def firmware(self, kind: str, paths: ContainerPaths) -> dict[str, str]:
        return {}

    def owns(self, domain_xml: str) -> bool:
        return f"{self.sandboxes}/" in domain_xml

    @staticmethod
    def allocated_bytes(path: str) -> int:
        return 4096


class FakeVolumes:
    """VolumeHost: host paths from a dict (path → is a directory), virtiofsd runs as a set of sockets."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.paths: dict[str, bool] = {}
        self.files: dict[str, bytes] = {}  # what read_head / read_tail find
        self.running: set[str] = set()
        self.start_error: Exception | None = None

    def inspect(self, mounts: tuple[Mount, ...]) -> tuple[Share, ...]:
        self.journal.record("volumes.inspect", len(mounts))
        for i, m in enumerate(mounts):
            if m.host_path not in self.paths:
                raise NotFound(f"config.mounts[{i}].host_path: {m.host_path!r} does not exist on this host")
        return shares(mounts, tuple(self.paths[m.host_path] for m in mounts))

    def start(self, directory: str, socket: str, entries: tuple[Share, ...]) -> int:
        self.journal.record("volumes.start", socket, len(entries))
        if self.start_error is not None:
            raise self.start_error
        self.running.add(socket)
        return 4242

    def stop(self, directory: str, socket: str) -> None:
        self.journal.record("volumes.stop", socket)
        self.running.discard(socket)

    def read_head(self, path: str, limit: int) -> bytes:
        return self.files.get(path, b"")[:limit]

    def read_tail(self, path: str, limit: int) -> bytes:
        return self.files.get(path, b"")[-limit:]


class FakeTimer:
    """Monotonic seconds that move only when someone sleeps (or a test calls ``advance``)."""

    def __init__(self, start: float = 1000.0) -> None:
        self._lock = threading.Lock()
        self.now = start
        self.slept = 0.0

    def monotonic(self) -> float:
        with self._lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0, f"asked to sleep {seconds}s"
        self.advance(seconds)
        with self._lock:
            self.slept += seconds

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


class FakeCgroups:
    """PodCgroups: which pod cgroups exist, and what was placed where."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.existing: set[str] = set()
        self.placed: dict[str, int] = {}  # "<path>/<name>" → pid
        self.fail_place: BaseException | None = None

    def exists(self, path: str) -> bool:
        self.journal.record("cgroups.exists", path)
        return path in self.existing

    def place(self, path: str, name: str, pid: int) -> None:
        self.journal.record("cgroups.place", path, name, pid)
        if self.fail_place is not None:
            raise self.fail_place
        self.placed[f"{path}/{name}"] = pid

    def remove(self, path: str, name: str) -> None:
        self.journal.record("cgroups.remove", path, name)
        self.placed.pop(f"{path}/{name}", None)


class FakeConsole:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.following: set[str] = set()

    def follow(self, container_id: str, raw: str, cri: str, state_file: str) -> None:
        self.journal.record("console.follow", container_id, raw, cri, state_file)
        self.following.add(container_id)

    def unfollow(self, container_id: str) -> None:
        self.journal.record("console.unfollow", container_id)
        self.following.discard(container_id)

    def reopen(self, container_id: str, cri: str) -> None:
        self.journal.record("console.reopen", container_id, cri)


class FakeSandboxes:
    def __init__(self, *sandboxes: Sandbox) -> None:
        self.by_id = {s.id: s for s in sandboxes}
        self.locks = KeyedLock()

    def hold(self, sandbox_id: str) -> AbstractContextManager[None]:
        return self.locks.hold(sandbox_id)

    def get(self, sandbox_id: str) -> Sandbox:
        try:
            return self.by_id[sandbox_id]
        except KeyError:
            raise NotFound(f"pod sandbox {sandbox_id!r} not found") from None


class FakeImages:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def get(self, text: str) -> Image:
        self.journal.record("images.get", text)
        return IMAGE

    def base_disk_path(self, img: Image, disk: BaseDisk) -> Path:
        self.journal.record("images.base_disk_path", img.id, disk.file)
        return BASE_PATH


class FakeVM:
    """VMBuild: REQUEST and SEED for every VM, XML with the name and the disks'
    paths; remembers what it was asked for."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.request_value = REQUEST
        self.seed_error: BaseException | None = None
        self.requests: list[tuple[ContainerSpec, Sandbox]] = []
        self.seed_calls: list[tuple[VMRequest, Container, Sandbox]] = []
        # Not in the journal: it runs beside the disk preparation, in another thread.
        self.dhcp_started: list[str] = []
        self.dhcp_error: Exception | None = None

    def request(self, spec: ContainerSpec, sb: Sandbox) -> VMRequest:
        self.requests.append((spec, sb))
        return self.request_value

    def prepare_network(self, sb: Sandbox) -> None:
        self.dhcp_started.append(sb.id)
        if self.dhcp_error is not None:
            raise self.dhcp_error

    def seed(self, request: VMRequest, c: Container, sb: Sandbox) -> bytes:
        self.seed_calls.append((request, c, sb))
        if self.seed_error is not None:
            raise self.seed_error
        return SEED

    def domain_xml(self, c: Container, sb: Sandbox, request: VMRequest, paths: ContainerPaths) -> str:
        """Enough XML for the fakes: the name, and every disk's source path."""
        self.journal.record("render_domain", c.domain_name)
        disks = "".join(f"<disk><source file='{p}'/></disk>" for p in (c.overlay_path, c.seed_path))
        return (f"<domain><name>{c.domain_name}</name><metadata><podvisor container='{c.id}'/>"
                f"</metadata>{disks}</domain>")

    def is_podvisor_domain(self, xml: str) -> bool:
        return re.search(r"<podvisor container='([^']*)'/>", xml) is not None


class ContainerFakes:
    """Every port of a ContainerService, plus handles on each fake."""

    def __init__(self) -> None:
        self.journal = Journal()
        self.store = FakeStore(self.journal)
        self.libvirt = FakeLibvirt(self.journal)
        self.files = FakeFiles(self.journal)
        self.console = FakeConsole(self.journal)
        self.sandboxes = FakeSandboxes(sandbox(), sandbox(OTHER_SANDBOX_ID),
                                       sandbox("f" * 64, state=SandboxState.NOTREADY))
        self.images = FakeImages(self.journal)
        self.vm = FakeVM(self.journal)
        self.clock = FakeClock()
        self.cgroups = FakeCgroups(self.journal)
        self.timer = FakeTimer()
        self.volumes = FakeVolumes(self.journal)
        self.ports = ContainerPorts(
            store=self.store, hypervisor=self.libvirt, files=self.files, console=self.console,
            sandboxes=self.sandboxes, images=self.images, vm=self.vm, clock=self.clock, cgroups=self.cgroups,
            timer=self.timer, volumes=self.volumes,
        )


def record(container_id: str, state: ContainerState, *, sandbox_id: str = SANDBOX_ID,
           created_at_ns: int = 100, root: Path = STATE_ROOT) -> Container:
    """A stored container record, as recovery finds it."""
    d = root / sandbox_id / "containers" / container_id
    return Container(
        id=container_id, sandbox_id=sandbox_id, name="vm", attempt=0, image=IMAGE_REF, image_id=IMAGE_ID,
        state=state, created_at_ns=created_at_ns, domain_name=f"podvisor-{container_id}", directory=str(d),
        overlay_path=str(d / "disk.qcow2"), seed_path=str(d / "cloudinit.iso"),
        console_log=str(d / "console.raw"), serial_socket=f"/run/podvisor/vm/{container_id[:32]}.serial",
        log_path=f"{LOG_DIR}/vm/0.log", vcpus=1, max_vcpus=4, memory_bytes=256 * MiB,
        max_memory_bytes=1024 * MiB,
    )
