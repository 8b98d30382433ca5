"""Virtual machines: the typed values builders and services share (pure).

A ``ContainerSpec`` is CreateContainer as the API received it. A
``VMRequest`` is what a CreateContainer asked for after annotations and the
KubeVirt VMI spec were merged (CRI fields first, then annotations, then the
agent's defaults). A ``DomainSpec`` is everything the domain XML builder
needs, with host paths already decided. Neither knows about protobuf or
libvirt objects.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.domain.sandbox import DNSConfig
from agent.domain.volumes import Device, Mount, Share

METADATA_NAMESPACE = "https://podvisor.io/xmlns/domain/1"
METADATA_PREFIX = "podvisor"

# The kernel's CFS period; kubelet always sends it with a quota, other clients may not.
CFS_DEFAULT_PERIOD_US = 100_000


def vcpus_for_quota(cpu_quota: int, cpu_period: int) -> int:
    """The vCPUs a CRI CPU quota asks for; 0 when the quota sets no limit (0 or -1).

    An unset period (0) is the kernel's. A quota of 1.5 CPUs needs 2 vCPUs to
    be usable: round up, never down. The caller checks the period's sign.
    """
    if cpu_quota <= 0:
        return 0
    return math.ceil(cpu_quota / (cpu_period or CFS_DEFAULT_PERIOD_US))


def quota_for_vcpus(vcpus: int) -> tuple[int, int]:
    """``(cpu_period, cpu_quota)`` stating ``vcpus`` in CRI terms, over the kernel's period."""
    return CFS_DEFAULT_PERIOD_US, CFS_DEFAULT_PERIOD_US * vcpus


class ContainerState(enum.Enum):
    """Container records. CREATING/REMOVING mark operations in progress for
    recovery; CRI sees CREATED, RUNNING, EXITED (and UNKNOWN)."""

    CREATING = "creating"
    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"
    UNKNOWN = "unknown"
    REMOVING = "removing"


@dataclass(frozen=True)
class CloudInit:
    """Sources for the NoCloud seed, before rendering."""

    user_data: bytes | None = None  # verbatim user-data (KubeVirt: userData wins over userDataBase64)
    network_config: bytes | None = None  # verbatim network-config (v1 or v2, no top-level "network:")
    ssh_authorized_keys: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)  # container env → /etc/environment
    command: tuple[str, ...] = ()  # command + args → the VM's workload (runcmd through a wrapper)
    dns: DNSConfig = field(default_factory=DNSConfig)  # the pod's dns_config → /etc/resolv.conf
    sysctls: Mapping[str, str] = field(default_factory=dict)  # the pod's linux.sysctls → the guest kernel
    # CRI devices' container paths: symlinks to their /dev/disk/by-id names, made at every boot.
    device_paths: tuple[str, ...] = ()
    volumes: tuple[Share, ...] = ()  # the container's mounts → the guest mounts the VM's share at boot


@dataclass(frozen=True)
class GuestAccess:
    """Podvisor's own SSH way into a guest (Exec), made per VM at CreateContainer:
    the key the agent logs in with as root, and the guest's SSH host key, so
    the agent knows the host it reaches is that VM (docs/exec.md)."""

    client_public_key: str  # OpenSSH line, authorised for root
    host_public_key: str  # OpenSSH line ("ssh-ed25519 AAAA...")
    host_private_key: str = field(repr=False)  # OpenSSH PEM; a secret: never logged


@dataclass(frozen=True)
class ExecCredentials:
    """What the agent needs to open Exec's SSH session into a guest."""

    client_private_key: bytes = field(repr=False)  # OpenSSH PEM; a secret: never logged
    host_public_key: str  # the only host key accepted ("ssh-ed25519 AAAA...")


@dataclass(frozen=True)
class VMRequest:
    """A VM as CreateContainer asked for it (sizes resolved, nothing host-specific)."""

    vcpus: int
    max_vcpus: int
    memory_bytes: int
    max_memory_bytes: int
    cpu_shares: int | None = None
    firmware: str = "bios"  # "bios" or "uefi"
    disk_bus: str = "virtio"  # bus of the boot disk: virtio, sata, scsi
    containerdisk_path: str | None = None  # a KubeVirt containerDisk "path" naming the disk file
    interface_model: str = "virtio"
    pod_network: bool = True  # False: no NIC (the VMI lists no networks)
    guest_agent: bool = True  # the org.qemu.guest_agent.0 channel (podvisor.io/guest-agent: "false" drops it)
    cloud_init: CloudInit = field(default_factory=CloudInit)
    devices: tuple[Device, ...] = ()  # CRI devices, host paths resolved to the node's block devices


@dataclass(frozen=True)
class DiskSpec:
    source: str  # host path
    format: str  # "qcow2" or "raw", always stated
    target: str  # "vda", "sda", ...
    bus: str  # "virtio", "sata", "scsi"
    device: str = "disk"  # or "cdrom"
    readonly: bool = False
    boot_order: int | None = None
    serial: str = ""
    kind: str = "file"  # "file" (source is an image file) or "block" (a host block device, raw)


@dataclass(frozen=True)
class InterfaceSpec:
    bridge: str  # host bridge the NIC joins ("" for user-mode)
    mac: str
    model: str = "virtio"
    # "bridge": on the pod's host-side bridge (pod network); "user": QEMU's
    # user-mode stack (hostNetwork sandboxes: outbound through the host).
    kind: str = "bridge"


@dataclass(frozen=True)
class DomainSpec:
    name: str  # libvirt domain name
    uuid: str
    virt_type: str  # "kvm" or "qemu"
    vcpus: int
    max_vcpus: int
    memory_bytes: int  # current (balloon target)
    max_memory_bytes: int  # maximum, fixed at define time
    disks: tuple[DiskSpec, ...]
    serial_socket: str  # unix socket for the console (Attach)
    console_log: str  # virtlogd copy of all serial output (the container log's source)
    # Podvisor metadata: what the agent needs to recognise and adopt the domain.
    sandbox_id: str
    container_id: str
    pod_name: str = ""
    pod_namespace: str = ""
    container_name: str = ""
    cpu_shares: int | None = None
    firmware: str = "bios"
    uefi_loader: str = ""  # OVMF code path (firmware == "uefi")
    uefi_vars_template: str = ""
    uefi_nvram: str = ""  # per-VM copy of the vars
    interfaces: tuple[InterfaceSpec, ...] = ()
    guest_agent_socket: str = ""  # virtio-serial channel org.qemu.guest_agent.0; "" for none
    workload_exit: str = ""  # file behind the WORKLOAD_EXIT_CHANNEL port (a VM with a command); "" for none
    machine: str = "q35"
    emulator: str = ""  # "" lets libvirt choose
    # libvirt resource partition (<resource><partition>): the pod's slice for
    # kubelet's systemd driver (agent.domain.cgroups); "" for libvirt's default.
    partition: str = ""
    # The pod volumes' virtiofs share (agent.domain.volumes): the socket of the
    # agent's virtiofsd ("" for a VM without mounts; a VM with one gets shared
    # memfd memory, which vhost-user needs), and the file behind the guest's
    # mount report port.
    virtiofs_socket: str = ""
    volumes_status: str = ""


@dataclass(frozen=True)
class ContainerSpec:
    """CreateContainer after conversion from protobuf."""

    sandbox_id: str
    name: str
    attempt: int
    image: str
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    log_path: str = ""  # relative to the sandbox's log directory
    memory_limit_in_bytes: int = 0
    cpu_quota: int = 0
    cpu_period: int = 0
    cpu_shares: int = 0
    mounts: tuple[Mount, ...] = ()  # pod volumes: virtiofs shares the guest mounts (docs/volumes.md)
    devices: tuple[Device, ...] = ()  # raw block volumes: virtio disks with stable serials


@dataclass(frozen=True)
class ContainerPaths:
    """Where a VM's files live on the host (decided by the VM files adapter)."""

    directory: str
    overlay: str
    seed: str
    console_log: str
    serial_socket: str
    guest_agent_socket: str  # the org.qemu.guest_agent.0 channel (QEMU binds it)
    workload_exit: str = ""  # the command's exit code, as the guest reports it (WORKLOAD_EXIT_CHANNEL)
    virtiofs_socket: str = ""  # the pod volumes' virtiofsd socket (VMs with mounts)
    volumes_status: str = ""  # what the guest's mount script reported (VOLUMES_STATUS_CHANNEL)


@dataclass(frozen=True)
class WorkloadExit:
    """What a VM with a command reported through its exit port."""

    code: int | None  # None: nothing reported (the command had not ended when the guest stopped)


@dataclass(frozen=True)
class Container:
    """A VM container record (what CRI calls a container)."""

    id: str
    sandbox_id: str
    name: str
    attempt: int
    image: str  # the image as CreateContainer named it
    image_id: str
    state: ContainerState
    created_at_ns: int
    domain_name: str
    directory: str  # per-container files: overlay, seed, console log
    overlay_path: str
    seed_path: str
    console_log: str  # raw serial output (virtlogd)
    serial_socket: str
    log_path: str  # absolute CRI log path ("" when kubelet gave none)
    vcpus: int
    max_vcpus: int
    memory_bytes: int
    max_memory_bytes: int
    cpu_shares: int | None = None
    firmware: str = "bios"
    started_at_ns: int = 0
    finished_at_ns: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    # Set while StopContainer runs, so that the "destroyed" event it causes
    # reads as a hard stop (137 Killed) rather than a crash.
    stop_requested: bool = False
    # The container's CRI mounts, as the VM's virtiofs share serves them.
    shares: tuple[Share, ...] = ()

    @property
    def mounts(self) -> tuple[Mount, ...]:
        return tuple(s.mount for s in self.shares)

    @property
    def live(self) -> bool:
        """Occupies its sandbox's VM slot (DESIGN: one VM per sandbox)."""
        return self.state in (ContainerState.CREATING, ContainerState.CREATED, ContainerState.RUNNING)


# The virtio-serial port a VM with a command gets: the guest's workload
# wrapper writes the command's exit code to it, QEMU to a file in the
# container's directory (``ContainerPaths.workload_exit``), the agent reads
# it when the domain stops.
WORKLOAD_EXIT_CHANNEL = "io.podvisor.exit.0"


def parse_workload_exit(data: bytes) -> int | None:
    """The exit code the guest's wrapper reported: the last line that is a number 0..255."""
    for line in reversed(data.decode("ascii", "replace").splitlines()):
        text = line.strip()
        if text.isdigit() and len(text) <= 3 and int(text) <= 255:
            return int(text)
    return None


def domain_name(container_id: str) -> str:
    """The libvirt domain name of a container (recognisable, unique)."""
    return f"podvisor-{container_id}"
