"""Pod volumes of a VM container: CRI mounts and block devices, as model values.

kubelet hands a container its volumes as CRI ``mounts`` (host path →
container path) and raw block persistent volumes as ``devices``. In a VM the
mounts reach the guest over virtiofs and the devices as virtio disks
(docs/volumes.md). This module holds the values and the checks that need no
I/O; where a host path leads is found out by an adapter.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import posixpath
from dataclasses import dataclass

from agent.domain.errors import InvalidArgument, NotFound


class Propagation(enum.Enum):
    """CRI MountPropagation (Linux mount propagation of a bind mount)."""

    PRIVATE = "private"
    HOST_TO_CONTAINER = "rslave"
    BIDIRECTIONAL = "rshared"


@dataclass(frozen=True)
class Mount:
    """One CRI mount of a container, checked."""

    container_path: str  # absolute, normalised, inside the guest
    host_path: str  # absolute, as kubelet gave it (may be a symlink)
    readonly: bool = False
    propagation: Propagation = Propagation.PRIVATE


@dataclass(frozen=True)
class Device:
    """One CRI device (a raw block volume), checked."""

    container_path: str  # where the guest should find it (a symlink to its by-id name)
    host_path: str  # a block device on the host
    permissions: str = "rwm"  # cgroup-style subset of "rwm"; no "w" attaches it read-only

    @property
    def readonly(self) -> bool:
        return "w" not in self.permissions


# Linux virtio-blk serials are at most 20 bytes; /dev/disk/by-id/virtio-<serial>.
DEVICE_SERIAL_LENGTH = 20


def device_serial(container_path: str) -> str:
    """A stable virtio serial for a device at ``container_path`` (same path, same serial)."""
    digest = hashlib.sha256(container_path.encode()).hexdigest()
    return ("pv-" + digest)[:DEVICE_SERIAL_LENGTH]


# Where the guest finds a device: udev names virtio disks by their serial.
DEVICE_BY_ID_DIR = "/dev/disk/by-id"

# At most this many CRI devices per container: each is a virtio disk on its
# own PCIe root port, named vdc.. after the VM's boot disk and seed.
MAX_DEVICES = 16


def device_by_id(container_path: str) -> str:
    """The guest's stable name of the device kubelet wants at ``container_path``."""
    return f"{DEVICE_BY_ID_DIR}/virtio-{device_serial(container_path)}"


class HostPathKind(enum.Enum):
    """What a CRI device's host path is on this node, symlinks followed."""

    MISSING = "missing"
    BLOCK = "block device"
    OTHER = "other"


@dataclass(frozen=True)
class HostPath:
    """A host path as the node answers: its kind and where its symlinks lead."""

    kind: HostPathKind
    real_path: str = ""  # absolute, symlinks resolved ("" when missing)
    what: str = ""  # for OTHER: "a directory", "a regular file", "a character device", ...


def attachable_device(field: str, device: Device, found: HostPath) -> Device:
    """``device`` with its host path resolved to the block device it leads to.

    NotFound when the path does not exist; InvalidArgument when it leads to
    anything but a block device. ``field`` is e.g. ``config.devices[0]``.
    """
    where = f"{field}.host_path"
    if found.kind is HostPathKind.MISSING:
        raise NotFound(f"{where}: {device.host_path!r} does not exist on this node")
    if found.kind is not HostPathKind.BLOCK:
        raise InvalidArgument(where, f"{device.host_path!r} is {found.what or 'not a block device'}; "
                                     "a VM attaches only block devices (raw block volumes)")
    return dataclasses.replace(device, host_path=found.real_path)


def check_distinct_devices(devices: tuple[Device, ...]) -> None:
    """No block device twice (resolved host paths) unless every time read-only:
    QEMU's image locking refuses a second opening of a device it writes."""
    seen: dict[str, int] = {}
    for i, d in enumerate(devices):
        first = seen.setdefault(d.host_path, i)
        if first != i and not (d.readonly and devices[first].readonly):
            raise InvalidArgument(f"config.devices[{i}].host_path",
                                  f"leads to {d.host_path}, as config.devices[{first}] does; one block device "
                                  "is attached twice only when both are read-only")


def _absolute(field: str, value: str) -> str:
    if not value:
        raise InvalidArgument(field, "is required")
    if "\0" in value or "\n" in value:
        raise InvalidArgument(field, "must not contain NUL or newline characters")
    if not value.startswith("/"):
        raise InvalidArgument(field, f"must be an absolute path, not {value!r}")
    if len(value) > 4096:
        raise InvalidArgument(field, "is longer than 4096 bytes")
    return value


def check_mount(field: str, container_path: str, host_path: str, readonly: bool,
                propagation: Propagation) -> Mount:
    """A Mount from CRI's fields; ``field`` is e.g. ``config.mounts[2]``."""
    cpath = _absolute(f"{field}.container_path", container_path)
    if ".." in cpath.split("/"):
        raise InvalidArgument(f"{field}.container_path", "must not contain '..'")
    cpath = posixpath.normpath(cpath)
    if cpath == "/":
        raise InvalidArgument(f"{field}.container_path", "must not be / (a VM's root is its disk)")
    hpath = _absolute(f"{field}.host_path", host_path)
    return Mount(container_path=cpath, host_path=hpath, readonly=readonly, propagation=propagation)


def check_device(field: str, container_path: str, host_path: str, permissions: str) -> Device:
    """A Device from CRI's fields; ``field`` is e.g. ``config.devices[0]``."""
    cpath = _absolute(f"{field}.container_path", container_path)
    if ".." in cpath.split("/"):
        raise InvalidArgument(f"{field}.container_path", "must not contain '..'")
    hpath = _absolute(f"{field}.host_path", host_path)
    perms = permissions or "rwm"
    if set(perms) - set("rwm"):
        raise InvalidArgument(f"{field}.permissions", f"must be letters of 'rwm', not {permissions!r}")
    if "r" not in perms:
        raise InvalidArgument(f"{field}.permissions", "must include 'r' (a VM cannot attach a write-only disk)")
    return Device(container_path=posixpath.normpath(cpath), host_path=hpath, permissions=perms)


def check_unique(mounts: tuple[Mount, ...], devices: tuple[Device, ...]) -> None:
    """No two mounts or devices at one container path."""
    seen: dict[str, str] = {}
    paths = [("mounts", i, m.container_path) for i, m in enumerate(mounts)]
    paths += [("devices", i, d.container_path) for i, d in enumerate(devices)]
    for kind, i, path in paths:
        if path in seen:
            raise InvalidArgument(f"config.{kind}[{i}].container_path", f"{path!r} is also {seen[path]}")
        seen[path] = f"config.{kind}[{i}]"


# --- the VM's share -------------------------------------------------------------------------
# One virtiofs share per VM with mounts (docs/volumes.md): the agent's
# virtiofsd serves a private root holding one entry per mount ("0", "1", ...,
# a bind mount of the host path); the guest mounts the share at GUEST_ROOT and
# binds each entry at its container path.

VIRTIOFS_TAG = "podvisor-volumes"
GUEST_ROOT = "/run/podvisor/volumes"
# The virtio-serial port the guest's mount script reports on ("ok" or "error: ...").
VOLUMES_STATUS_CHANNEL = "io.podvisor.volumes.0"


@dataclass(frozen=True)
class Share:
    """A mount as the VM's share serves it: its entry's name and whether it is a directory."""

    mount: Mount
    name: str  # the entry in the share's root ("0", "1", ...)
    is_dir: bool


def shares(mounts: tuple[Mount, ...], dirs: tuple[bool, ...]) -> tuple[Share, ...]:
    """The share's entries for ``mounts`` (``dirs[i]``: mount i's host path is a directory)."""
    return tuple(Share(mount=m, name=str(i), is_dir=d) for i, (m, d) in enumerate(zip(mounts, dirs, strict=True)))


def volumes_problem(report: bytes) -> str:
    """What the guest's mount script reported as a problem ("" for none, or nothing reported yet)."""
    for line in reversed(report.decode("utf-8", "replace").splitlines()):
        text = line.strip()
        if text == "ok":
            return ""
        if text.startswith("error:"):
            return text[len("error:"):].strip()[:1024]
    return ""


# --- the termination message ----------------------------------------------------------------
# kubelet's annotations on the container (pkg/kubelet/kuberuntime/labels.go).

TERMINATION_PATH_ANNOTATION = "io.kubernetes.container.terminationMessagePath"
TERMINATION_POLICY_ANNOTATION = "io.kubernetes.container.terminationMessagePolicy"
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
FALLBACK_TO_LOGS = "FallbackToLogsOnError"
# kubelet's limits: the file is read up to 4096 bytes; the log fallback takes
# the last 80 lines, at most 2048 bytes.
MAX_TERMINATION_MESSAGE = 4096
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048


def termination_mount(shares_: tuple[Share, ...], annotations: dict[str, str] | None) -> Mount | None:
    """The mount holding the termination-message file (None: the container has none)."""
    path = (annotations or {}).get(TERMINATION_PATH_ANNOTATION) or DEFAULT_TERMINATION_PATH
    path = posixpath.normpath(path)
    return next((s.mount for s in shares_ if s.mount.container_path == path), None)


def falls_back_to_logs(annotations: dict[str, str] | None, exit_code: int) -> bool:
    return exit_code != 0 and (annotations or {}).get(TERMINATION_POLICY_ANNOTATION) == FALLBACK_TO_LOGS


def log_tail(text: bytes) -> str:
    """The end of a container log as kubelet's fallback takes it: 80 lines, at most 2048 bytes."""
    lines = text.splitlines(keepends=True)[-FALLBACK_LOG_LINES:]
    tail = b"".join(lines)[-FALLBACK_LOG_BYTES:]
    return tail.decode("utf-8", "replace")
