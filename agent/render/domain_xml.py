"""libvirt domain XML from a ``DomainSpec`` (pure: typed value → text).

Built like KubeVirt's virt-launcher converter: small configurators, one per
concern, each adding its part to an ElementTree in a fixed order. Values only
ever reach the XML as element text or attribute values, so ElementTree escapes
them; nothing is formatted into markup.

``parse_metadata`` reads the Podvisor ``<metadata>`` element back from a domain
XML as libvirt returns it (``virDomainGetXMLDesc``), which is how the agent
recognises and adopts its domains after a restart.
"""

from __future__ import annotations

import dataclasses
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator

from agent.domain.vm import METADATA_NAMESPACE, METADATA_PREFIX, WORKLOAD_EXIT_CHANNEL, DiskSpec, DomainSpec
from agent.domain.volumes import VIRTIOFS_TAG, VOLUMES_STATUS_CHANNEL

# Serialise our namespace as ``podvisor:`` rather than ``ns0:`` (process-wide
# ElementTree registry; harmless, the prefix is ours).
ET.register_namespace(METADATA_PREFIX, METADATA_NAMESPACE)

VIRT_TYPES = ("kvm", "qemu")
FIRMWARES = ("bios", "uefi")
DISK_BUSES = ("virtio", "sata", "scsi")
DISK_DEVICES = ("disk", "cdrom")
DISK_FORMATS = ("qcow2", "raw")

# Host page cache with guest flushes honoured. cache='none' (O_DIRECT) is what
# a tuned host would use, but QEMU then refuses to open files on filesystems
# without O_DIRECT (tmpfs state directories, some overlay setups) and the
# renderer cannot know the filesystem. 'writeback' works everywhere, stays
# crash-consistent for guests that flush (virtio-blk/SCSI/AHCI advertise a
# write cache, so they do), and lets the many overlays on one shared base disk
# share that base's pages in the host page cache.
DISK_CACHE = "writeback"
DISK_KINDS = ("file", "block")
# A host block device (a CRI device, a raw block volume): O_DIRECT and Linux
# native AIO, as for any raw LUN. A block device always takes O_DIRECT, and
# nothing is gained from caching a shared volume's blocks in the host's memory.
BLOCK_CACHE = "none"
BLOCK_IO = "native"

MEMBALLOON_STATS_PERIOD_S = 5
GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"
ARCH = "x86_64"
# virtqueue size of the virtiofs device (libvirt's and virtiofsd's usual value).
VIRTIOFS_QUEUE = "1024"

# Metadata child elements, in document order, and the parse_metadata keys they map to.
_METADATA_ROOT = "container"
_METADATA_FIELDS: tuple[tuple[str, str], ...] = (
    ("sandbox-id", "sandbox_id"),
    ("container-id", "container_id"),
    ("pod-name", "pod_name"),
    ("pod-namespace", "pod_namespace"),
    ("container-name", "container_name"),
)


def _ns(tag: str) -> str:
    return f"{{{METADATA_NAMESPACE}}}{tag}"


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    """Append ``<tag attrs...>text</tag>``; attribute order is the keyword order (deterministic)."""
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def _devices(domain: ET.Element) -> ET.Element:
    devices = domain.find("devices")
    if devices is None:
        devices = _sub(domain, "devices")
    return devices


def _kib(n_bytes: int) -> str:
    # libvirt takes KiB; round up so a request is never silently shrunk.
    return str(-(-n_bytes // 1024))


# Characters XML 1.0 cannot carry at all (ElementTree would write them raw and
# libvirt would refuse the document).
_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
# libvirt refuses other characters in a disk <serial> ("contains unsafe characters").
_DISK_SERIAL = re.compile(r"[A-Za-z0-9_ .+-]*")


def _strings(value: object, path: str) -> Iterator[tuple[str, str]]:
    """Every string inside a (nested) spec dataclass, with its field path."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, tuple):
        for i, item in enumerate(value):
            yield from _strings(item, f"{path}[{i}]")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _strings(getattr(value, f.name), f"{path}.{f.name}" if path else f.name)


def _check(spec: DomainSpec) -> None:
    """Refuse specs libvirt would reject or misread; the services build valid ones."""
    problems = [f"{path} holds a character XML cannot carry" for path, text in _strings(spec, "")
                if _XML_ILLEGAL.search(text)]
    if spec.virt_type not in VIRT_TYPES:
        problems.append(f"virt_type {spec.virt_type!r} is not one of {VIRT_TYPES}")
    if spec.firmware not in FIRMWARES:
        problems.append(f"firmware {spec.firmware!r} is not one of {FIRMWARES}")
    if spec.firmware == "uefi" and not (spec.uefi_loader and spec.uefi_nvram):
        problems.append("uefi firmware needs uefi_loader and uefi_nvram")
    if not 1 <= spec.vcpus <= spec.max_vcpus:
        problems.append(f"vcpus {spec.vcpus} must be between 1 and max_vcpus {spec.max_vcpus}")
    if not 0 < spec.memory_bytes <= spec.max_memory_bytes:
        problems.append(f"memory_bytes {spec.memory_bytes} must be > 0 and <= max_memory_bytes "
                        f"{spec.max_memory_bytes}")
    if spec.cpu_shares is not None and spec.cpu_shares < 1:
        problems.append(f"cpu_shares {spec.cpu_shares} must be positive")
    if spec.partition and (not spec.partition.startswith("/") or "//" in spec.partition):
        problems.append(f"partition {spec.partition!r} must be an absolute path")
    if spec.volumes_status and not spec.virtiofs_socket:
        problems.append("volumes_status needs virtiofs_socket")
    if not (spec.name and spec.uuid and spec.serial_socket and spec.console_log):
        problems.append("name, uuid, serial_socket and console_log must be set")
    targets = [d.target for d in spec.disks]
    if len(set(targets)) != len(targets):
        problems.append(f"disk targets repeat: {targets}")
    orders = [d.boot_order for d in spec.disks if d.boot_order is not None]
    if len(set(orders)) != len(orders) or any(o < 1 for o in orders):
        problems.append(f"disk boot orders must be distinct and >= 1: {orders}")
    for d in spec.disks:
        if d.kind not in DISK_KINDS:
            problems.append(f"disk {d.target}: kind {d.kind!r} is not one of {DISK_KINDS}")
        if d.kind == "block" and d.format != "raw":
            problems.append(f"disk {d.target}: a block device is attached raw, not {d.format!r}")
        if d.format not in DISK_FORMATS:
            problems.append(f"disk {d.target}: format {d.format!r} is not one of {DISK_FORMATS}")
        if d.bus not in DISK_BUSES:
            problems.append(f"disk {d.target}: bus {d.bus!r} is not one of {DISK_BUSES}")
        if d.device not in DISK_DEVICES:
            problems.append(f"disk {d.target}: device {d.device!r} is not one of {DISK_DEVICES}")
        if d.device == "cdrom" and d.bus == "virtio":
            problems.append(f"disk {d.target}: a cdrom cannot sit on the virtio bus")
        if d.device == "disk" and d.bus == "sata" and d.readonly:
            # QEMU's ide-hd has no read-only mode; libvirt refuses it. A read-only
            # seed on SATA is a cdrom (KubeVirt does the same).
            problems.append(f"disk {d.target}: a read-only sata disk must be a cdrom")
        if not _DISK_SERIAL.fullmatch(d.serial):
            problems.append(f"disk {d.target}: serial {d.serial!r} may hold only letters, digits and '_ .+-'")
    if problems:
        raise ValueError("invalid domain spec: " + "; ".join(problems))


# --- configurators: each adds one concern to the <domain> element -------------------------------


def configure_identity(domain: ET.Element, spec: DomainSpec) -> None:
    """``<name>``, ``<uuid>`` and the Podvisor ``<metadata>`` the agent adopts domains by."""
    _sub(domain, "name", spec.name)
    _sub(domain, "uuid", spec.uuid)
    metadata = _sub(domain, "metadata")
    ours = _sub(metadata, _ns(_METADATA_ROOT))
    for tag, attr in _METADATA_FIELDS:
        _sub(ours, _ns(tag), getattr(spec, attr))


def configure_memory(domain: ET.Element, spec: DomainSpec) -> None:
    """``<memory>`` is the ceiling fixed at define time; ``<currentMemory>`` the balloon target."""
    _sub(domain, "memory", _kib(spec.max_memory_bytes), unit="KiB")
    _sub(domain, "currentMemory", _kib(spec.memory_bytes), unit="KiB")


def configure_memory_backing(domain: ET.Element, spec: DomainSpec) -> None:
    """A VM with a virtiofs share: guest memory in a shared memfd, which the
    vhost-user virtiofsd maps (docs/volumes.md: what it costs)."""
    if not spec.virtiofs_socket:
        return
    backing = _sub(domain, "memoryBacking")
    _sub(backing, "source", type="memfd")
    _sub(backing, "access", mode="shared")


def configure_vcpus(domain: ET.Element, spec: DomainSpec) -> None:
    """``<vcpu>`` (max, with ``current`` when lower), ``<cputune><shares>`` from CRI cpu_shares."""
    vcpu = _sub(domain, "vcpu", str(spec.max_vcpus), placement="static")
    if spec.vcpus != spec.max_vcpus:
        vcpu.set("current", str(spec.vcpus))
    if spec.cpu_shares is not None:
        cputune = _sub(domain, "cputune")
        _sub(cputune, "shares", str(spec.cpu_shares))


def configure_cpu(domain: ET.Element, spec: DomainSpec) -> None:
    """KVM: the host CPU as is. TCG: no ``<cpu>`` element at all.

    host-passthrough means ``-cpu host``, which QEMU refuses without KVM. On TCG
    we leave the model to QEMU's default (qemu64): every TCG build implements
    all of it, it is the same on every host, and it is what the test guests and
    the integration tests boot with. A newer named model or ``mode='maximum'``
    (``-cpu max``) would expose more features but also whatever TCG emulates
    imperfectly in this QEMU version.
    """
    if spec.virt_type == "kvm":
        _sub(domain, "cpu", mode="host-passthrough", check="none", migratable="on")


def configure_resource(domain: ET.Element, spec: DomainSpec) -> None:
    """``<resource><partition>``: the cgroup partition libvirt starts QEMU in (the pod's slice).

    Absent, libvirt uses its default (``/machine``). The partition must exist
    when the domain starts; the container service checks that first.
    """
    if spec.partition:
        resource = _sub(domain, "resource")
        _sub(resource, "partition", spec.partition)


def configure_os(domain: ET.Element, spec: DomainSpec) -> None:
    """``<os>``: hvm on the spec's machine type; OVMF pflash + per-VM NVRAM for uefi.

    Boot order is per device (``<boot order>`` on disks), so there is no
    ``<os><boot dev>`` — libvirt refuses both together.
    """
    os_el = _sub(domain, "os")
    _sub(os_el, "type", "hvm", arch=ARCH, machine=spec.machine)
    if spec.firmware == "uefi":
        _sub(os_el, "loader", spec.uefi_loader, readonly="yes", type="pflash")
        nvram = _sub(os_el, "nvram", spec.uefi_nvram)
        if spec.uefi_vars_template:
            nvram.set("template", spec.uefi_vars_template)


def configure_features(domain: ET.Element, spec: DomainSpec) -> None:
    """ACPI (graceful shutdown through the power button) and the APIC."""
    features = _sub(domain, "features")
    _sub(features, "acpi")
    _sub(features, "apic")


def configure_clock(domain: ET.Element, spec: DomainSpec) -> None:
    """UTC, with the timer policies virt-install and KubeVirt use for x86 Linux guests."""
    clock = _sub(domain, "clock", offset="utc")
    _sub(clock, "timer", name="rtc", tickpolicy="catchup")
    _sub(clock, "timer", name="pit", tickpolicy="delay")
    _sub(clock, "timer", name="hpet", present="no")


def configure_lifecycle(domain: ET.Element, spec: DomainSpec) -> None:
    """A powered-off or crashed guest ends (the container exits); a reboot stays inside the VM."""
    _sub(domain, "on_poweroff", "destroy")
    _sub(domain, "on_reboot", "restart")
    _sub(domain, "on_crash", "destroy")


def configure_emulator(domain: ET.Element, spec: DomainSpec) -> None:
    """``<emulator>`` only when the spec names one; otherwise libvirt picks its default."""
    if spec.emulator:
        _sub(_devices(domain), "emulator", spec.emulator)


def _disk(devices: ET.Element, disk: DiskSpec) -> None:
    el = _sub(devices, "disk", type=disk.kind, device=disk.device)
    if disk.kind == "block":
        driver = _sub(el, "driver", name="qemu", type=disk.format, cache=BLOCK_CACHE, io=BLOCK_IO)
    else:
        driver = _sub(el, "driver", name="qemu", type=disk.format, cache=DISK_CACHE)
    if not disk.readonly:
        # Guest TRIM frees space in the overlay (qcow2), punches holes (raw)
        # or discards on the block device.
        driver.set("discard", "unmap")
    if disk.kind == "block":
        _sub(el, "source", dev=disk.source)
    else:
        _sub(el, "source", file=disk.source)
    _sub(el, "target", dev=disk.target, bus=disk.bus)
    if disk.readonly:
        _sub(el, "readonly")
    if disk.serial:
        _sub(el, "serial", disk.serial)
    if disk.boot_order is not None:
        _sub(el, "boot", order=str(disk.boot_order))


def configure_disks(domain: ET.Element, spec: DomainSpec) -> None:
    """One ``<disk>`` per DiskSpec, format always explicit (never probed): ``type='file'``
    for the VM's own images, ``type='block'`` for a host block device (a CRI device,
    read-only when its permissions lack ``w``, found in the guest by its ``<serial>``).

    A qcow2 overlay's backing file and its format are recorded in the overlay
    itself; libvirt reads the chain from there, so nothing is added here.
    """
    for disk in spec.disks:
        _disk(_devices(domain), disk)


def configure_filesystems(domain: ET.Element, spec: DomainSpec) -> None:
    """The pod volumes' share: virtiofs served by the agent's own virtiofsd
    (libvirt connects QEMU to its socket and neither starts nor stops it)."""
    if not spec.virtiofs_socket:
        return
    fs = _sub(_devices(domain), "filesystem", type="mount")
    _sub(fs, "driver", type="virtiofs", queue=VIRTIOFS_QUEUE)
    _sub(fs, "source", socket=spec.virtiofs_socket)
    _sub(fs, "target", dir=VIRTIOFS_TAG)


def configure_controllers(domain: ET.Element, spec: DomainSpec) -> None:
    """virtio-scsi when a disk is on the scsi bus (libvirt's default would be an
    emulated LSI HBA); no USB controller (nothing uses it, and it costs boot time)."""
    devices = _devices(domain)
    if any(d.bus == "scsi" for d in spec.disks):
        _sub(devices, "controller", type="scsi", index="0", model="virtio-scsi")
    _sub(devices, "controller", type="usb", model="none")


def configure_interfaces(domain: ET.Element, spec: DomainSpec) -> None:
    """NICs on host bridges with the pod interface's MAC.

    The option ROM is off: nothing network-boots (boot order is on disks only),
    and loading iPXE costs seconds under TCG.
    """
    for iface in spec.interfaces:
        el = _sub(_devices(domain), "interface", type=iface.kind)
        _sub(el, "mac", address=iface.mac)
        if iface.kind == "bridge":
            _sub(el, "source", bridge=iface.bridge)
        _sub(el, "model", type=iface.model)
        _sub(el, "rom", enabled="no")


def configure_console(domain: ET.Element, spec: DomainSpec) -> None:
    """Serial port 0 on a unix socket (Attach), logged by virtlogd to console_log.

    ``<log>`` makes virtlogd copy every byte the guest writes to the serial port
    even when nobody is attached: the container log is built from that file.
    ``<console>`` names the same serial port so ``virsh console`` works too.
    """
    devices = _devices(domain)
    serial = _sub(devices, "serial", type="unix")
    _sub(serial, "source", mode="bind", path=spec.serial_socket)
    _sub(serial, "log", file=spec.console_log, append="on")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="unix")
    _sub(console, "source", mode="bind", path=spec.serial_socket)
    _sub(console, "log", file=spec.console_log, append="on")
    _sub(console, "target", type="serial", port="0")


def configure_guest_agent(domain: ET.Element, spec: DomainSpec) -> None:
    """The QEMU guest agent's virtio-serial channel (Exec), when the spec asks for one."""
    if not spec.guest_agent_socket:
        return
    channel = _sub(_devices(domain), "channel", type="unix")
    _sub(channel, "source", mode="bind", path=spec.guest_agent_socket)
    _sub(channel, "target", type="virtio", name=GUEST_AGENT_CHANNEL)


def configure_workload_exit(domain: ET.Element, spec: DomainSpec) -> None:
    """A VM with a command: the virtio-serial port its wrapper writes the exit code to, into a file."""
    if not spec.workload_exit:
        return
    channel = _sub(_devices(domain), "channel", type="file")
    _sub(channel, "source", path=spec.workload_exit)
    _sub(channel, "target", type="virtio", name=WORKLOAD_EXIT_CHANNEL)


def configure_volumes_status(domain: ET.Element, spec: DomainSpec) -> None:
    """A VM with a share: the port the guest's mount script reports on, into a file."""
    if not spec.volumes_status:
        return
    channel = _sub(_devices(domain), "channel", type="file")
    _sub(channel, "source", path=spec.volumes_status)
    _sub(channel, "target", type="virtio", name=VOLUMES_STATUS_CHANNEL)


def configure_rng(domain: ET.Element, spec: DomainSpec) -> None:
    """virtio-rng from /dev/urandom, so guests do not stall at boot waiting for entropy."""
    rng = _sub(_devices(domain), "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")


def configure_memballoon(domain: ET.Element, spec: DomainSpec) -> None:
    """virtio balloon: UpdateContainerResources moves currentMemory; stats feed ContainerStats."""
    balloon = _sub(_devices(domain), "memballoon", model="virtio")
    _sub(balloon, "stats", period=str(MEMBALLOON_STATS_PERIOD_S))


Configurator = Callable[[ET.Element, DomainSpec], None]

# Order matters only for readability of the output (libvirt reorders anyway):
# it follows the order of libvirt's own XMLDesc.
CONFIGURATORS: tuple[Configurator, ...] = (
    configure_identity,
    configure_memory,
    configure_memory_backing,
    configure_vcpus,
    configure_resource,
    configure_os,
    configure_features,
    configure_cpu,
    configure_clock,
    configure_lifecycle,
    configure_emulator,
    configure_disks,
    configure_filesystems,
    configure_controllers,
    configure_interfaces,
    configure_console,
    configure_guest_agent,
    configure_workload_exit,
    configure_volumes_status,
    configure_rng,
    configure_memballoon,
)


def build(spec: DomainSpec) -> ET.Element:
    """Return the ``<domain>`` element for ``spec``; ValueError names what is invalid."""
    _check(spec)
    domain = ET.Element("domain", {"type": spec.virt_type})
    for configure in CONFIGURATORS:
        configure(domain, spec)
    return domain


def render(spec: DomainSpec) -> str:
    """Return libvirt domain XML for ``spec``: deterministic, indented, newline-terminated.

    Raises ValueError when the spec is not one libvirt could define as meant
    (unknown virt type, bus or format, vcpus/memory above their maximum, ...).
    """
    domain = build(spec)
    ET.indent(domain, space="  ")
    return ET.tostring(domain, encoding="unicode") + "\n"


def parse_metadata(xml_text: str) -> dict[str, str] | None:
    """Read the Podvisor metadata back from domain XML (ours, or libvirt's XMLDesc).

    Returns ``{"sandbox_id", "container_id", "pod_name", "pod_namespace",
    "container_name"}`` (missing children read as ""), or None when the domain
    carries no Podvisor metadata — a domain someone else defined. Raises
    ValueError when the text is not XML.
    """
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as exc:
        raise ValueError(f"domain XML does not parse: {exc}") from None
    ours = root.find(f"metadata/{_ns(_METADATA_ROOT)}")
    if ours is None:
        return None
    return {attr: ours.findtext(_ns(tag)) or "" for tag, attr in _METADATA_FIELDS}
