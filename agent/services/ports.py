"""Ports: what the services need from the outside world, as Protocols.

Every port is a ``Protocol`` here, and so are the collaborators one service
offers another (``SandboxLookup``, ``SandboxMembers``, ``ContainerImages``,
``VMBuild``). The values they take and return are domain values
(``agent.domain``), so services and their fakes never import an adapter.
Services receive their ports in one bundle each (``Ports`` for sandboxes,
``ContainerPorts`` for VM containers), so service tests hand in recording
fakes while the daemon hands in the adapters.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from agent.concurrency import BlobProgress
from agent.domain.disk import DiskInfo
from agent.domain.host import HostCapacity, HostFacts
from agent.domain.hypervisor import DomainState, DomainStats, HypervisorVersions
from agent.domain.image import BaseDisk, DiskFile, Image
from agent.domain.imageref import ImageRef, RemoteRepository
from agent.domain.network.choice import NetworkChoice
from agent.domain.network.wiring import PodNetworkStatus
from agent.domain.oci import Compression, Descriptor
from agent.domain.registry import RegistryAuth, ResolvedImage
from agent.domain.sandbox import DNSConfig, PortMapping, Sandbox
from agent.domain.streaming import StreamRequest
from agent.domain.virt import KvmFacts
from agent.domain.vm import (
    Container,
    ContainerPaths,
    ContainerSpec,
    ExecCredentials,
    GuestAccess,
    VMRequest,
    WorkloadExit,
)
from agent.domain.volumes import HostPath, Mount, Share
from agent.streaming.backend import ExitStatus, Streams

# Shared ------------------------------------------------------------------------------


class Clock(Protocol):
    """Wall-clock time (``SystemClock``; a stepping fake in tests)."""

    def now_ns(self) -> int: ...


class SystemClock:
    """The real clock."""

    def now_ns(self) -> int:
        """Nanoseconds since the epoch."""
        return time.time_ns()


class Timer(Protocol):
    """Monotonic time and waiting (``SystemTimer``; in tests a fake whose sleep advances it)."""

    def monotonic(self) -> float: ...
    def sleep(self, seconds: float) -> None: ...


class SystemTimer:
    """The real monotonic clock."""

    def monotonic(self) -> float:
        """Seconds on the monotonic clock."""
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds``."""
        time.sleep(seconds)


class Metrics(Protocol):
    """What the agent reports to the operator's metrics (agent.adapters.metrics;
    ``NoMetrics`` where nobody scrapes: service tests, metrics switched off).

    Durations are seconds; ``ok`` is False for a failed call. What is counted
    at scrape time (sandboxes and VMs by state, image store bytes, the libvirt
    connection) is read by the adapter itself, not reported through here.
    """

    def rpc_done(self, service: str, method: str, code: str, seconds: float) -> None: ...
    def vm_started(self, seconds: float) -> None: ...
    def vm_stopped(self, seconds: float) -> None: ...
    def image_pulled(self, seconds: float, size_bytes: int, ok: bool) -> None: ...


class NoMetrics:
    """Metrics nobody reads: every report is dropped."""

    def rpc_done(self, service: str, method: str, code: str, seconds: float) -> None:
        """Dropped."""

    def vm_started(self, seconds: float) -> None:
        """Dropped."""

    def vm_stopped(self, seconds: float) -> None:
        """Dropped."""

    def image_pulled(self, seconds: float, size_bytes: int, ok: bool) -> None:
        """Dropped."""


# Sandboxes ------------------------------------------------------------------------------


class SandboxStore(Protocol):
    """Sandbox rows (agent.adapters.store.Store)."""

    def insert_sandbox(self, sandbox: Sandbox) -> None: ...
    def update_sandbox(self, sandbox: Sandbox) -> None: ...
    def delete_sandbox(self, sandbox_id: str) -> None: ...
    def load_sandboxes(self) -> list[Sandbox]: ...


class SandboxNetwork(Protocol):
    """Pod networking: a sandbox's network namespace, CNI attachment and VM
    wiring (agent.adapters.network.pod_network.PodNetworkManager)."""

    def add(self, sandbox_id: str, name: str, namespace: str, uid: str, port_mappings: Sequence[PortMapping],
            dns: DNSConfig, hostname: str, workdir: Path) -> PodNetworkStatus: ...
    def remove(self, sandbox_id: str, workdir: Path) -> None: ...
    def status(self, sandbox_id: str, workdir: Path) -> PodNetworkStatus | None: ...
    def ensure_dhcp(self, sandbox_id: str, workdir: Path) -> bool: ...
    def recover(self, sandbox_id: str, workdir: Path) -> None: ...
    def cached_sandbox_ids(self) -> list[str]: ...
    def readiness(self) -> NetworkChoice: ...


class SandboxFiles(Protocol):
    """Per-sandbox folders and CRI log directories (agent.adapters.files.SandboxFiles)."""

    def sandbox_dir(self, sandbox_id: str) -> Path: ...
    def create_sandbox_dir(self, sandbox_id: str) -> Path: ...
    def remove_sandbox_dir(self, sandbox_id: str) -> None: ...
    def list_sandbox_dirs(self) -> list[str]: ...
    def ensure_log_directory(self, path: str) -> None: ...


class HostProbe(Protocol):
    """The host machine (agent.adapters.host.Host)."""

    def facts(self) -> HostFacts: ...
    def node_ip(self) -> str: ...


@dataclass(frozen=True)
class Ports:
    """What the sandbox service needs."""

    store: SandboxStore
    files: SandboxFiles
    clock: Clock
    # None: no pod networking (disabled in the config, or in service tests).
    network: SandboxNetwork | None = None
    # The node's address is reported as the IP of hostNetwork (NODE)
    # sandboxes; None (service tests): they report none.
    host: HostProbe | None = None


class SandboxMembers(Protocol):
    """What a sandbox holds (its VM container), as the sandbox service sees
    it: stopped with no grace on StopPodSandbox, removed on RemovePodSandbox
    (agent.services.containers.ContainerService)."""

    def stop_in_sandbox(self, sandbox_id: str) -> None: ...
    def remove_in_sandbox(self, sandbox_id: str) -> None: ...


# VM containers ------------------------------------------------------------------------


class ContainerStore(Protocol):
    """Container rows (agent.adapters.store.Store)."""

    def save_container(self, container: Container) -> None: ...
    def delete_container(self, container_id: str) -> None: ...
    def load_containers(self) -> list[Container]: ...


class Hypervisor(Protocol):
    """Domain operations (agent.adapters.libvirt.Libvirt). Failures arrive as
    domain errors: ``Unavailable`` when the hypervisor cannot be reached."""

    def define_domain(self, xml: str) -> None: ...
    def start_domain(self, name: str) -> None: ...
    def shutdown_domain(self, name: str) -> None: ...
    def destroy_domain(self, name: str) -> bool: ...
    def undefine_domain(self, name: str) -> bool: ...
    def domain_state(self, name: str) -> DomainState: ...
    def domain_xml(self, name: str) -> str: ...
    def domain_stats(self, name: str) -> DomainStats: ...
    def set_domain_memory(self, name: str, size_bytes: int, *, live: bool) -> None: ...
    def set_domain_vcpus(self, name: str, count: int, *, live: bool) -> None: ...
    def list_domains(self) -> dict[str, str]: ...
    def domain_pid(self, name: str) -> int: ...
    def guest_shutdown(self, name: str) -> None: ...


class KvmProbe(Protocol):
    """What decides the virt type (agent.adapters.kvm, the module)."""

    def gather(self) -> KvmFacts: ...
    def probe(self) -> tuple[bool, str]: ...


class HypervisorStatus(Protocol):
    """The hypervisor connection as Status and Host/Info report it
    (agent.adapters.libvirt.Libvirt)."""

    @property
    def uri(self) -> str: ...
    @property
    def last_error(self) -> str: ...
    def connected(self) -> bool: ...
    def versions(self) -> HypervisorVersions: ...


class VMFiles(Protocol):
    """Per-VM files on the host (agent.adapters.vm_files.VMFiles)."""

    def container_paths(self, sandbox_id: str, container_id: str) -> ContainerPaths: ...
    def create_container_dir(self, paths: ContainerPaths) -> None: ...
    def create_overlay(self, base: Path, base_format: str, overlay: str) -> None: ...
    def write_seed(self, path: str, data: bytes) -> None: ...
    def remove_container_dir(self, directory: str) -> None: ...
    def console_state(self, directory: str) -> str: ...
    def workload_exit(self, directory: str) -> WorkloadExit | None: ...
    def volumes_report(self, directory: str) -> bytes: ...
    def firmware(self, kind: str, paths: ContainerPaths) -> dict[str, str]: ...
    def owns(self, domain_xml: str) -> bool: ...
    def allocated_bytes(self, path: str) -> int: ...


class VolumeHost(Protocol):
    """The pod volumes on the host (agent.adapters.virtiofs.VirtiofsHost): host paths
    inspected at CreateContainer, the VM's virtiofsd, files read for the termination message."""

    def inspect(self, mounts: tuple[Mount, ...]) -> tuple[Share, ...]: ...
    def start(self, directory: str, socket: str, entries: tuple[Share, ...]) -> int: ...
    def stop(self, directory: str, socket: str) -> None: ...
    def read_head(self, path: str, limit: int) -> bytes: ...
    def read_tail(self, path: str, limit: int) -> bytes: ...


class ConsoleLogs(Protocol):
    """The console → CRI log follower (agent.adapters.console_log.ConsoleLogs)."""

    def follow(self, container_id: str, raw: str, cri: str, state_file: str) -> None: ...
    def unfollow(self, container_id: str) -> None: ...
    def reopen(self, container_id: str, cri: str) -> None: ...


class SandboxLookup(Protocol):
    """Sandboxes as the container service reads them
    (agent.services.sandboxes.SandboxService).

    ``hold`` is the sandbox's lock: CreateContainer holds it from its READY
    check to its last step, Stop/RemovePodSandbox across their handling of
    the sandbox's members and state, so no VM is made in a sandbox being
    taken down."""

    def get(self, sandbox_id: str) -> Sandbox: ...
    def hold(self, sandbox_id: str) -> AbstractContextManager[None]: ...


class ContainerImages(Protocol):
    """Pulled images as the container service reads them
    (agent.services.images.ImageService)."""

    def get(self, text: str) -> Image: ...
    def base_disk_path(self, img: Image, disk: BaseDisk) -> Path: ...


class VMNetwork(Protocol):
    """Pod networking as the VM side uses it (the same adapter as
    SandboxNetwork): the sandbox's wiring as on disk, and its DHCP server."""

    def status(self, sandbox_id: str, workdir: Path) -> PodNetworkStatus | None: ...
    def ensure_dhcp(self, sandbox_id: str, workdir: Path) -> bool: ...


class PodCgroups(Protocol):
    """The pod's cgroup on this host (agent.adapters.cgroups.PodCgroups): ``path`` is a
    ``PodCgroup.path``, ``name`` the VM's own cgroup below it (the container id)."""

    def exists(self, path: str) -> bool: ...
    def place(self, path: str, name: str, pid: int) -> None: ...
    def remove(self, path: str, name: str) -> None: ...


class HostSize(Protocol):
    """The host's size, the default ceiling of a VM's (agent.adapters.host.Host)."""

    def capacity(self) -> HostCapacity: ...


class ExecKeyStore(Protocol):
    """Exec's per-VM SSH keys in the container's directory (agent.adapters.exec_keys.ExecKeys)."""

    def create(self, directory: str) -> GuestAccess: ...
    def load(self, directory: str) -> ExecCredentials: ...


class HostBlockDevices(Protocol):
    """What a CRI device's host path is on this node (agent.adapters.block_devices)."""

    def lookup(self, path: str) -> HostPath: ...


class VMBuild(Protocol):
    """What a VM is made of: its request, NoCloud seed and domain XML, and
    the pod network it joins (agent.services.vm_build.VMBuilder)."""

    def request(self, spec: ContainerSpec, sandbox: Sandbox) -> VMRequest: ...
    def prepare_network(self, sandbox: Sandbox) -> None: ...
    def seed(self, request: VMRequest, container: Container, sandbox: Sandbox) -> bytes: ...
    def domain_xml(self, container: Container, sandbox: Sandbox, request: VMRequest,
                   paths: ContainerPaths) -> str: ...
    def is_podvisor_domain(self, xml: str) -> bool: ...


@dataclass(frozen=True)
class ContainerPorts:
    """What the container service needs."""

    store: ContainerStore
    hypervisor: Hypervisor
    files: VMFiles
    console: ConsoleLogs
    sandboxes: SandboxLookup
    images: ContainerImages
    vm: VMBuild
    clock: Clock
    cgroups: PodCgroups
    # StopContainer's deadlines and polling.
    timer: Timer = field(default_factory=SystemTimer)
    # VM start and stop durations.
    metrics: Metrics = field(default_factory=NoMetrics)
    # The pod volumes (None: this agent serves none; CreateContainer with mounts is refused).
    volumes: VolumeHost | None = None


# --- images --------------------------------------------------------------------------------
# What the image service needs (agent.services.images and .pull); the values
# these ports trade live in agent.domain (registry, image, oci, disk).


class RegistryPort(Protocol):
    """An OCI registry, pull side (agent.adapters.registry.RegistryClient).

    ``auth`` is a pull's own credentials, scoped to the registry they belong to.
    """

    def resolve(self, ref: ImageRef, *, auth: RegistryAuth | None = None) -> ResolvedImage: ...
    def fetch_config(self, repo: RemoteRepository, config: Descriptor, *,
                     auth: RegistryAuth | None = None) -> bytes: ...
    def fetch_blob(self, repo: RemoteRepository, digest: str, dest_path: str | os.PathLike[str], *,
                   expected_size: int | None = None, auth: RegistryAuth | None = None,
                   progress: BlobProgress | None = None) -> int: ...


class ImageStorePort(Protocol):
    """Image records (agent.adapters.store.Store)."""

    def save_images(self, images: list[Image], delete: tuple[str, ...] = ()) -> None: ...
    def delete_image(self, image_id: str) -> None: ...
    def load_images(self) -> list[Image]: ...


class ImageFilesPort(Protocol):
    """Blobs, scratch space and base disks on the host (agent.adapters.image_files.ImageFiles)."""

    def blob_path(self, digest: str) -> Path: ...
    def has_blob(self, digest: str) -> bool: ...
    def write_blob(self, digest: str, data: bytes) -> None: ...
    def blob_digests(self) -> list[str]: ...
    def remove_blob(self, digest: str) -> None: ...
    def new_workdir(self) -> Path: ...
    def clear_tmp(self) -> list[str]: ...
    def install_disks(self, image_id: str, files: dict[str, Path]) -> None: ...
    def disk_path(self, image_id: str, file: str) -> Path: ...
    def has_disks(self, image_id: str, files: list[str]) -> bool: ...
    def disk_image_ids(self) -> list[str]: ...
    def remove_disks(self, image_id: str) -> None: ...
    def usage(self) -> tuple[int, int]: ...
    def free_bytes(self) -> int: ...


class DiskExtractorPort(Protocol):
    """Applies one image's layers to find its /disk/ files (agent.adapters.layers.DiskExtractor)."""

    def add_layer(self, stream: BinaryIO, compression: Compression, digest: str) -> str: ...  # → its diff_id
    def disks(self) -> dict[str, DiskFile]: ...
    def discard(self) -> None: ...


class ExtractorFactory(Protocol):
    """(workdir, image name, largest file, largest total it may extract,
    free space it must leave on the filesystem) → extractor."""

    def __call__(self, workdir: Path, image: str, max_file_bytes: int = ..., max_total_bytes: int | None = ...,
                 min_free_bytes: int = ...) -> DiskExtractorPort: ...


# (path, source named in errors, largest virtual size, format its name
# declares or None) → the checked disk (agent.adapters.qemu_img.info).
DiskInspector = Callable[[Path, str, int, str | None], DiskInfo]
# (OCI layout directory on this host, ref name in its index.json or "") → a
# registry serving that one image (agent.adapters.oci_layout_source.LayoutSource).
LayoutOpener = Callable[[Path, str], RegistryPort]


@dataclass(frozen=True)
class ImagePorts:
    registry: RegistryPort
    store: ImageStorePort
    files: ImageFilesPort
    new_extractor: ExtractorFactory
    inspect_disk: DiskInspector
    clock: Clock
    # Pull durations and bytes.
    metrics: Metrics = field(default_factory=NoMetrics)
    open_layout: LayoutOpener | None = None  # image import; None: refused


# --- exec, attach and port forward ----------------------------------------------------------
# What agent.services.exec, agent.services.attach and agent.services.port_forward need.


class ContainerLookup(Protocol):
    """Containers by id, their state reconciled with libvirt
    (agent.services.containers.ContainerService)."""

    def get(self, container_id: str) -> Container: ...


class ConsoleSession(Protocol):
    """One client's share of a VM's serial console (agent.adapters.console.ConsoleSession)."""

    @property
    def ended_reason(self) -> str: ...  # "" (open, or closed by the client), "eof", "slow"
    def read(self, timeout: float | None = None) -> bytes | None: ...  # b"": ended; None: timeout
    def write(self, data: bytes) -> None: ...
    def close(self) -> None: ...


class Consoles(Protocol):
    """Serial consoles shared by every attached client, one connection per VM
    (agent.adapters.console.ConsoleHub)."""

    def join(self, key: str, socket_path: str) -> ConsoleSession: ...


class PodDialer(Protocol):
    """TCP connections to a pod's VM (agent.adapters.network.dial.PodDialer):
    a connected socket, or a domain error saying why not."""

    def dial(self, sandbox_id: str, ip: str, port: int, timeout: float) -> socket.socket: ...


# Streaming (Exec, Attach, PortForward) -------------------------------------------------


class StreamURLs(Protocol):
    """The streaming server's request cache (agent.streaming.server): keeps a
    checked request under a fresh single-use token and returns its URL."""

    def url_for(self, request: StreamRequest) -> str: ...
class GuestAgent(Protocol):
    """A running domain's QEMU guest agent (agent.adapters.libvirt.Libvirt).

    ``command`` is one agent command (``{"execute": ..., "arguments": ...}``);
    the answer is its ``return`` value. Raises ``GuestAgentNotReady`` while the
    agent is not connected or does not answer within ``timeout_s``,
    ``GuestAgentRefused`` for the agent's own errors, ``FailedPrecondition``
    when the domain has no agent channel or is not running.
    """

    def guest_agent_command(self, name: str, command: dict[str, Any], timeout_s: int) -> Any: ...


class ShellSession(Protocol):
    """One authenticated SSH connection into a guest (agent.adapters.ssh.SSHSession)."""

    def run(self, command: str, tty: bool, streams: Streams) -> ExitStatus: ...
    def close(self) -> None: ...


class GuestShell(Protocol):
    """SSH into guests (agent.adapters.ssh.GuestSSH). Raises ``GuestNotReady``
    while nothing answers, ``FailedPrecondition`` for a wrong host key or a
    refused login."""

    def connect(self, host: str, credentials: ExecCredentials, timeout_s: float) -> ShellSession: ...
