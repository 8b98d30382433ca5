"""KubeVirt VM documents → ``VMISpec``: what a ``podvisor.io/vm`` annotation asks for (pure).

The annotation carries a KubeVirt ``VirtualMachineInstanceSpec`` as JSON or
YAML. So that the seed's ``VirtualMachine`` manifest can be handed over
unchanged, three shapes are accepted:

===========================================  ==================================
document                                     the VMI spec read from
===========================================  ==================================
bare ``VirtualMachineInstanceSpec``          the document itself (it has ``domain``)
``kind: VirtualMachine`` (``kubevirt.io/*``)  ``.spec.template.spec``
``kind: VirtualMachineInstance``             ``.spec``
===========================================  ==================================

Anything else (another kind, another API group, a mapping without ``domain``)
is refused. Error fields are the annotation's field followed by the path
inside the document as written, e.g.
``config.annotations['podvisor.io/vm'].spec.template.spec.domain.resources.requests.memory``.

What is read: ``domain.resources`` (memory, cpu), ``domain.memory``
(``guest``, ``maxGuest``), ``domain.cpu`` (``cores``, ``sockets``,
``threads``, ``maxSockets``), ``domain.firmware.bootloader``,
``domain.devices.disks`` / ``interfaces`` / ``autoattachPodInterface``,
``volumes`` (``containerDisk``, ``cloudInitNoCloud``), ``networks`` (``pod``),
``hostname``. Fields Podvisor does not implement and whose loss changes no
data or hardware (``running``, labels, ``features``, ``clock``, CPU model…)
are ignored. Whatever would make a VM silently lose a disk, a device, its
credentials or its boot path is refused with the field named: volume kinds
other than ``containerDisk``/``cloudInitNoCloud``, Secret references, GPUs,
host devices, filesystems, kernel boot, ``accessCredentials``, instance types
and preferences, non-pod networks, interface bindings other than
``bridge``/``masquerade``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from agent.domain import annotations as ann
from agent.domain.errors import InvalidArgument
from agent.domain.imageref import ImageRef, parse_image_ref

DEFAULT_FIELD = "config.annotations['podvisor.io/vm']"

API_GROUP = "kubevirt.io"
KIND_SPEC = "VirtualMachineInstanceSpec"
KIND_VM = "VirtualMachine"
KIND_VMI = "VirtualMachineInstance"

# Below this no guest kernel boots; Podvisor refuses rather than rounding up.
MIN_MEMORY_BYTES = 16 * 2**20

SUPPORTED_VOLUMES = ("containerDisk", "cloudInitNoCloud")
# KubeVirt's volume sources (kubevirt.io/api/core/v1 VolumeSource), for a
# precise refusal; a key outside both lists is refused as unknown.
_UNSUPPORTED_VOLUMES = frozenset({
    "persistentVolumeClaim", "dataVolume", "ephemeral", "emptyDisk", "hostDisk",
    "configMap", "secret", "serviceAccount", "downwardAPI", "downwardMetrics",
    "cloudInitConfigDrive", "sysprep", "memoryDump", "containerPath",
})
DISK_BUSES = ("virtio", "sata", "scsi")  # what VMRequest.disk_bus can carry
DISK_DEVICES = ("disk", "cdrom", "lun")
INTERFACE_BINDINGS = ("bridge", "masquerade")
_UNSUPPORTED_BINDINGS = ("slirp", "sriov", "macvtap", "passt", "binding")
# KubeVirt's accepted NIC models (virt-api validation).
INTERFACE_MODELS = ("virtio", "e1000", "e1000e", "igb", "ne2k_pci", "pcnet", "rtl8139")
_MAC = re.compile(r"^[0-9A-Fa-f]{2}([:-][0-9A-Fa-f]{2}){5}$")

# Kubernetes resource.Quantity: sign, decimal number, then a binary/decimal SI
# suffix or a decimal exponent (k8s.io/apimachinery/pkg/api/resource).
_QUANTITY = re.compile(
    r"^(?P<num>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
    r"(?:(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)|[eE](?P<exp>[+-]?[0-9]+))?$"
)
_SUFFIXES: dict[str, Fraction] = {
    "Ki": Fraction(2**10), "Mi": Fraction(2**20), "Gi": Fraction(2**30),
    "Ti": Fraction(2**40), "Pi": Fraction(2**50), "Ei": Fraction(2**60),
    "n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "m": Fraction(1, 1000),
    "k": Fraction(10**3), "M": Fraction(10**6), "G": Fraction(10**9),
    "T": Fraction(10**12), "P": Fraction(10**15), "E": Fraction(10**18),
}


@dataclass(frozen=True)
class Disk:
    """One entry of ``domain.devices.disks``."""

    name: str
    device: str  # "disk", "cdrom" or "lun"
    bus: str | None  # as written; None leaves KubeVirt's default (virtio for a disk)
    boot_order: int | None = None
    # True for a volume listed without a disk: KubeVirt then adds a plain disk.
    implicit: bool = False
    field: str = ""  # the disk's field path (the volume's, for an implicit disk)


@dataclass(frozen=True)
class Interface:
    """One entry of ``domain.devices.interfaces`` (a pod network NIC)."""

    name: str
    binding: str  # "bridge" or "masquerade"
    model: str | None = None  # None: KubeVirt's default (virtio)
    mac_address: str | None = None


@dataclass(frozen=True)
class ContainerDiskVolume:
    name: str
    image: str  # as written in the manifest
    image_ref: ImageRef  # normalised, to compare with the CRI image
    path: str | None = None  # the disk file inside the image, when it names one
    field: str = ""  # the volume's field path


@dataclass(frozen=True)
class CloudInitNoCloudVolume:
    """A ``cloudInitNoCloud`` volume, decoded (KubeVirt: ``userData`` wins over ``userDataBase64``)."""

    name: str
    user_data: bytes | None
    network_data: bytes | None  # verbatim: networkData, else networkDataBase64 decoded
    field: str  # the volume's field path, for errors found later (network-config checks)
    user_data_field: str = ""  # the field user_data came from ("" when absent)
    network_data_field: str = ""


@dataclass(frozen=True)
class VMISpec:
    """The parts of a VirtualMachineInstanceSpec that Podvisor implements.

    ``None`` means "not stated": the caller falls back to annotations and
    defaults. Sizes are in bytes and whole vCPUs.
    """

    kind: str  # KIND_SPEC, KIND_VM or KIND_VMI: the shape the document had
    field: str  # where the VMI spec sits, e.g. "config.annotations['podvisor.io/vm'].spec.template.spec"
    name: str | None = None  # metadata.name of a manifest
    hostname: str | None = None  # spec.hostname
    vcpus: int | None = None
    vcpus_field: str = ""
    max_vcpus: int | None = None  # cores * threads * maxSockets (CPU hotplug)
    max_vcpus_field: str = ""
    memory_bytes: int | None = None  # guest memory: memory.guest, else requests, else limits
    memory_field: str = ""
    max_memory_bytes: int | None = None  # memory.maxGuest (memory hotplug)
    max_memory_field: str = ""
    firmware: str | None = None  # "bios" or "uefi"
    secure_boot: bool | None = None  # for uefi: KubeVirt's default is True
    disks: tuple[Disk, ...] = ()
    interfaces: tuple[Interface, ...] = ()
    networks: tuple[str, ...] = ()  # names of pod networks (at most one)
    pod_network: bool = True  # False only when autoattachPodInterface is false and none is listed
    container_disk: ContainerDiskVolume | None = None
    cloud_init: CloudInitNoCloudVolume | None = None

    def disk(self, name: str) -> Disk | None:
        """The disk that attaches volume ``name``."""
        return next((d for d in self.disks if d.name == name), None)

    @property
    def container_disk_disk(self) -> Disk | None:
        """The disk the containerDisk volume is attached as (the boot disk)."""
        return self.disk(self.container_disk.name) if self.container_disk else None

    @property
    def interface(self) -> Interface | None:
        """The pod network's NIC, when one is listed."""
        return self.interfaces[0] if self.interfaces else None


def parse_quantity(value: object) -> Fraction:
    """A Kubernetes quantity ("64M", "1.5Gi", "1500m", "1e9", 2) → its exact value.

    Raises ValueError for anything else. JSON/YAML numbers are accepted, as
    Kubernetes accepts them.
    """
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError("expected a Kubernetes quantity such as 1Gi, 512M or 1500m")
    text = str(value).strip()
    m = _QUANTITY.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a Kubernetes quantity (such as 1Gi, 512M or 1500m)")
    number = Fraction(m.group("num"))
    if m.group("suffix"):
        number *= _SUFFIXES[m.group("suffix")]
    elif m.group("exp"):
        exp = int(m.group("exp"))
        if abs(exp) > 64:  # keeps "1e999999" from building a huge integer
            raise ValueError(f"{text!r}: exponent out of range")
        number *= Fraction(10) ** exp
    return number


def parse_vmi(text: str, field: str = DEFAULT_FIELD) -> VMISpec:
    """Parse the ``podvisor.io/vm`` annotation value into a ``VMISpec``.

    ``field`` names the annotation (``config.annotations['podvisor.io/vm']``
    or ``sandbox_config.annotations['podvisor.io/vm']``); errors append the
    path inside the document. Raises InvalidArgument.
    """
    try:
        doc = ann.parse_structured(text)
    except ValueError as exc:
        raise InvalidArgument(field, str(exc)) from None
    assert isinstance(doc, dict)
    return vmi_from_document(doc, field)


def vmi_from_document(doc: Mapping[str, Any], field: str = DEFAULT_FIELD) -> VMISpec:
    """Like :func:`parse_vmi` for a document already loaded."""
    kind, name, spec, spec_field = _locate_spec(doc, field)
    return _VMIParser(spec, spec_field).parse(kind, name)


def _locate_spec(doc: Mapping[str, Any], field: str) -> tuple[str, str | None, Mapping[str, Any], str]:
    """Which shape the document has, and where its VMI spec is."""
    kind = doc.get("kind")
    if kind is None and "apiVersion" not in doc:
        if "domain" not in doc:
            raise InvalidArgument(
                field,
                "expected a KubeVirt VirtualMachineInstanceSpec (a mapping with 'domain'), "
                "or a VirtualMachine or VirtualMachineInstance manifest (with 'kind')",
            )
        return KIND_SPEC, None, doc, field
    api_version = doc.get("apiVersion")
    if not isinstance(api_version, str) or not api_version.startswith(API_GROUP + "/"):
        raise InvalidArgument(
            f"{field}.apiVersion", f"expected {API_GROUP}/v1 for a KubeVirt manifest, got {api_version!r}"
        )
    metadata = _mapping(doc.get("metadata"), f"{field}.metadata")
    name = _opt_str(metadata.get("name"), f"{field}.metadata.name")
    spec = _mapping(doc.get("spec"), f"{field}.spec", required=True)
    if kind == KIND_VMI:
        return KIND_VMI, name, spec, f"{field}.spec"
    if kind == KIND_VM:
        # An instance type or preference lives in the cluster: resolving it is
        # the control plane's job, and ignoring it would change the VM's size.
        for key in ("instancetype", "preference"):
            if spec.get(key) is not None:
                raise InvalidArgument(
                    f"{field}.spec.{key}",
                    f"VirtualMachine {key} references are not supported by Podvisor; "
                    "state the sizes in spec.template.spec.domain instead",
                )
        template = _mapping(spec.get("template"), f"{field}.spec.template", required=True)
        inner = _mapping(template.get("spec"), f"{field}.spec.template.spec", required=True)
        return KIND_VM, name, inner, f"{field}.spec.template.spec"
    raise InvalidArgument(
        f"{field}.kind",
        f"expected {KIND_VM} or {KIND_VMI} (or a bare VirtualMachineInstanceSpec), got {kind!r}",
    )


class _VMIParser:
    """Reads one VMI spec; ``self.field`` prefixes every error path."""

    def __init__(self, spec: Mapping[str, Any], field: str) -> None:
        self.spec = spec
        self.field = field

    def at(self, path: str) -> str:
        return f"{self.field}.{path}"

    def parse(self, kind: str, name: str | None) -> VMISpec:
        spec = self.spec
        domain = _mapping(spec.get("domain"), self.at("domain"), required=True)
        if spec.get("accessCredentials"):
            raise InvalidArgument(
                self.at("accessCredentials"),
                "access credentials come from Kubernetes Secrets, which Podvisor cannot read; "
                "use the podvisor.io/ssh-authorized-keys annotation or cloud-init user-data",
            )
        devices = _mapping(domain.get("devices"), self.at("domain.devices"))
        for key, what in (("gpus", "GPUs"), ("hostDevices", "host devices"), ("filesystems", "filesystems")):
            if devices.get(key):
                raise InvalidArgument(self.at(f"domain.devices.{key}"), f"{what} are not supported by Podvisor")

        vcpus, vcpus_field, max_vcpus, max_vcpus_field = self._cpu(domain)
        memory, memory_field, max_memory, max_memory_field = self._memory(domain)
        firmware, secure_boot = self._firmware(domain)
        volumes = self._volumes()
        disks = self._disks(devices, volumes)
        interfaces, networks, pod_network = self._network(devices)
        container_disks = [v for v in volumes.values() if isinstance(v, ContainerDiskVolume)]
        if len(container_disks) > 1:
            # One VM container has one image, hence one containerDisk.
            raise InvalidArgument(
                self.at("volumes"),
                f"{len(container_disks)} containerDisk volumes; Podvisor boots a VM from exactly one",
            )
        cloud_inits = [v for v in volumes.values() if isinstance(v, CloudInitNoCloudVolume)]
        if len(cloud_inits) > 1:
            raise InvalidArgument(self.at("volumes"), "more than one cloudInitNoCloud volume")
        return VMISpec(
            kind=kind,
            field=self.field,
            name=name,
            hostname=_opt_str(spec.get("hostname"), self.at("hostname")),
            vcpus=vcpus,
            vcpus_field=vcpus_field,
            max_vcpus=max_vcpus,
            max_vcpus_field=max_vcpus_field,
            memory_bytes=memory,
            memory_field=memory_field,
            max_memory_bytes=max_memory,
            max_memory_field=max_memory_field,
            firmware=firmware,
            secure_boot=secure_boot,
            disks=disks,
            interfaces=interfaces,
            networks=networks,
            pod_network=pod_network,
            container_disk=container_disks[0] if container_disks else None,
            cloud_init=cloud_inits[0] if cloud_inits else None,
        )

    # -- sizing -------------------------------------------------------------

    def _cpu(self, domain: Mapping[str, Any]) -> tuple[int | None, str, int | None, str]:
        """vCPUs as KubeVirt counts them (virtwrap converter GetCPUTopology).

        A topology (cores × sockets × threads, an unset member counting 1)
        wins; without one the vCPU count is the CPU limit, else the CPU
        request, rounded up to whole CPUs as resource.Quantity.Value() does.
        """
        cpu = _mapping(domain.get("cpu"), self.at("domain.cpu"))
        topo = {k: _opt_count(cpu.get(k), self.at(f"domain.cpu.{k}")) for k in ("cores", "sockets", "threads")}
        max_sockets = _opt_count(cpu.get("maxSockets"), self.at("domain.cpu.maxSockets"))
        cores, sockets, threads = (topo[k] or 1 for k in ("cores", "sockets", "threads"))
        vcpus: int | None = None
        vcpus_field = ""
        if any(topo.values()):
            vcpus, vcpus_field = cores * sockets * threads, self.at("domain.cpu")
        else:
            resources = _mapping(domain.get("resources"), self.at("domain.resources"))
            for section in ("limits", "requests"):
                where = self.at(f"domain.resources.{section}.cpu")
                value = _mapping(resources.get(section), self.at(f"domain.resources.{section}")).get("cpu")
                if value is not None:
                    vcpus, vcpus_field = _whole_cpus(value, where), where
                    break
        if vcpus is not None and vcpus > ann.MAX_VCPUS:
            raise InvalidArgument(vcpus_field, f"{vcpus} vCPUs; at most {ann.MAX_VCPUS} are supported")
        max_vcpus: int | None = None
        max_field = ""
        if max_sockets:
            max_field = self.at("domain.cpu.maxSockets")
            if max_sockets < sockets:
                raise InvalidArgument(max_field, f"{max_sockets} is less than sockets ({sockets})")
            max_vcpus = cores * threads * max_sockets
            if max_vcpus > ann.MAX_VCPUS:
                raise InvalidArgument(
                    max_field, f"allows {max_vcpus} vCPUs; at most {ann.MAX_VCPUS} are supported"
                )
        return vcpus, vcpus_field, max_vcpus, max_field

    def _memory(self, domain: Mapping[str, Any]) -> tuple[int | None, str, int | None, str]:
        """Guest memory: ``memory.guest``, else the request, else the limit.

        Kubernetes defaults a missing request to the limit, and KubeVirt sizes
        the guest from the request when ``memory.guest`` is unset.
        """
        resources = _mapping(domain.get("resources"), self.at("domain.resources"))
        requests = _mapping(resources.get("requests"), self.at("domain.resources.requests"))
        limits = _mapping(resources.get("limits"), self.at("domain.resources.limits"))
        memory_cfg = _mapping(domain.get("memory"), self.at("domain.memory"))
        candidates = (
            ("guest", memory_cfg.get("guest"), self.at("domain.memory.guest")),
            ("requests", requests.get("memory"), self.at("domain.resources.requests.memory")),
            ("limits", limits.get("memory"), self.at("domain.resources.limits.memory")),
            ("maxGuest", memory_cfg.get("maxGuest"), self.at("domain.memory.maxGuest")),
        )
        found = {key: (_memory_bytes(value, where), where) for key, value, where in candidates if value is not None}
        if "requests" in found and "limits" in found and found["requests"][0] > found["limits"][0]:
            raise InvalidArgument(found["requests"][1], "is greater than domain.resources.limits.memory")
        current = found.get("guest") or found.get("requests") or found.get("limits")
        memory, memory_field = current if current else (None, "")
        max_memory, max_field = found.get("maxGuest", (None, ""))
        if max_memory is not None and memory is not None and max_memory < memory:
            raise InvalidArgument(max_field, f"is less than the guest memory ({memory} bytes, {memory_field})")
        return memory, memory_field, max_memory, max_field

    def _firmware(self, domain: Mapping[str, Any]) -> tuple[str | None, bool | None]:
        firmware = _mapping(domain.get("firmware"), self.at("domain.firmware"))
        if firmware.get("kernelBoot") is not None:
            # Booting a kernel from a container image is another boot path;
            # ignoring it would boot the disk instead.
            raise InvalidArgument(self.at("domain.firmware.kernelBoot"), "kernel boot is not supported by Podvisor")
        where = self.at("domain.firmware.bootloader")
        bootloader = _mapping(firmware.get("bootloader"), where)
        has_efi, has_bios = "efi" in bootloader, "bios" in bootloader
        if has_efi and has_bios:
            raise InvalidArgument(where, "names both efi and bios")
        if has_efi:
            efi = _mapping(bootloader.get("efi"), f"{where}.efi")
            secure = efi.get("secureBoot", True)  # KubeVirt's default
            if not isinstance(secure, bool):
                raise InvalidArgument(f"{where}.efi.secureBoot", "expected true or false")
            return "uefi", secure
        if has_bios:
            return "bios", None
        return None, None

    # -- storage ------------------------------------------------------------

    def _volumes(self) -> dict[str, ContainerDiskVolume | CloudInitNoCloudVolume]:
        volumes: dict[str, ContainerDiskVolume | CloudInitNoCloudVolume] = {}
        for i, volume in enumerate(_list(self.spec.get("volumes"), self.at("volumes"))):
            where = self.at(f"volumes[{i}]")
            volume = _mapping(volume, where, required=True)
            name = _name(volume.get("name"), f"{where}.name")
            if name in volumes:
                raise InvalidArgument(f"{where}.name", f"volume name {name!r} is used twice")
            sources = [k for k in volume if k != "name"]
            if len(sources) != 1:
                raise InvalidArgument(
                    where, f"volume {name!r} must have exactly one source, found {len(sources)}"
                    + (f" ({', '.join(sources)})" if sources else "")
                )
            source = sources[0]
            body = volume[source]
            if source == "containerDisk":
                volumes[name] = self._container_disk(name, body, f"{where}.containerDisk")
            elif source == "cloudInitNoCloud":
                volumes[name] = self._cloud_init(name, body, f"{where}.cloudInitNoCloud")
            else:
                known = "a" if source in _UNSUPPORTED_VOLUMES else "an unknown"
                raise InvalidArgument(
                    f"{where}.{source}",
                    f"volume {name!r} is {known} {source} volume, which Podvisor does not support "
                    f"(supported: {', '.join(SUPPORTED_VOLUMES)}); the VM would lose this disk",
                )
        return volumes

    def _container_disk(self, name: str, body: object, where: str) -> ContainerDiskVolume:
        body = _mapping(body, where)
        image = _opt_str(body.get("image"), f"{where}.image")
        if not image:
            raise InvalidArgument(f"{where}.image", "is required")
        ref = parse_image_ref(image, f"{where}.image")
        path = _opt_str(body.get("path"), f"{where}.path")
        if path is not None:
            parts = path.split("/")
            if not path.startswith("/") or path.endswith("/") or any(p in ("", ".", "..") for p in parts[1:]):
                raise InvalidArgument(f"{where}.path", f"{path!r} must be an absolute, normalised file path")
        return ContainerDiskVolume(name=name, image=image, image_ref=ref, path=path, field=where)

    def _cloud_init(self, name: str, body: object, where: str) -> CloudInitNoCloudVolume:
        body = _mapping(body, where)
        for key in ("secretRef", "userDataSecretRef", "networkDataSecretRef"):
            if body.get(key) is not None:
                raise InvalidArgument(
                    f"{where}.{key}",
                    "Kubernetes Secrets cannot be read by Podvisor; inline the data "
                    "(userData/userDataBase64, networkData/networkDataBase64) instead",
                )
        user, user_field = _text_or_base64(body, "userData", where)
        network, network_field = _text_or_base64(body, "networkData", where)
        return CloudInitNoCloudVolume(
            name=name, user_data=user, network_data=network, field=where,
            user_data_field=user_field, network_data_field=network_field,
        )

    def _disks(
        self, devices: Mapping[str, Any], volumes: Mapping[str, ContainerDiskVolume | CloudInitNoCloudVolume]
    ) -> tuple[Disk, ...]:
        disks: list[Disk] = []
        for i, raw in enumerate(_list(devices.get("disks"), self.at("domain.devices.disks"))):
            where = self.at(f"domain.devices.disks[{i}]")
            raw = _mapping(raw, where, required=True)
            name = _name(raw.get("name"), f"{where}.name")
            if any(d.name == name for d in disks):
                raise InvalidArgument(f"{where}.name", f"disk name {name!r} is used twice")
            if name not in volumes:
                raise InvalidArgument(f"{where}.name", f"disk {name!r} names no volume in {self.at('volumes')}")
            kinds = [k for k in DISK_DEVICES if k in raw]
            if len(kinds) > 1:
                raise InvalidArgument(where, f"disk {name!r} names several device types ({', '.join(kinds)})")
            device = kinds[0] if kinds else "disk"  # KubeVirt's default
            if device == "lun":
                raise InvalidArgument(f"{where}.lun", "lun disks (SCSI passthrough) are not supported by Podvisor")
            target = _mapping(raw.get(device), f"{where}.{device}")
            bus = _opt_str(target.get("bus"), f"{where}.{device}.bus")
            if bus is not None and bus not in DISK_BUSES:
                raise InvalidArgument(
                    f"{where}.{device}.bus", f"bus {bus!r} is not supported (supported: {', '.join(DISK_BUSES)})"
                )
            if device == "cdrom" and bus == "virtio":
                raise InvalidArgument(f"{where}.cdrom.bus", "a cdrom cannot use the virtio bus")
            boot_order = _opt_count(raw.get("bootOrder"), f"{where}.bootOrder")
            disks.append(Disk(name=name, device=device, bus=bus, boot_order=boot_order, field=where))
        # KubeVirt's defaulting webhook gives every volume without a disk a plain disk.
        listed = {d.name for d in disks}
        disks.extend(
            Disk(name=n, device="disk", bus=None, implicit=True, field=v.field)
            for n, v in volumes.items() if n not in listed
        )
        return tuple(disks)

    # -- network ------------------------------------------------------------

    def _network(self, devices: Mapping[str, Any]) -> tuple[tuple[Interface, ...], tuple[str, ...], bool]:
        networks: list[str] = []
        for i, raw in enumerate(_list(self.spec.get("networks"), self.at("networks"))):
            where = self.at(f"networks[{i}]")
            raw = _mapping(raw, where, required=True)
            name = _name(raw.get("name"), f"{where}.name")
            if name in networks:
                raise InvalidArgument(f"{where}.name", f"network name {name!r} is used twice")
            kinds = [k for k in raw if k != "name"]
            if kinds != ["pod"]:
                raise InvalidArgument(
                    where, f"network {name!r}: only pod networks are supported by Podvisor, found "
                    + (", ".join(kinds) if kinds else "no network source"),
                )
            _mapping(raw["pod"], f"{where}.pod")
            networks.append(name)
        if len(networks) > 1:
            raise InvalidArgument(self.at("networks"), "at most one pod network is allowed")

        interfaces: list[Interface] = []
        for i, raw in enumerate(_list(devices.get("interfaces"), self.at("domain.devices.interfaces"))):
            where = self.at(f"domain.devices.interfaces[{i}]")
            raw = _mapping(raw, where, required=True)
            name = _name(raw.get("name"), f"{where}.name")
            if name not in networks:
                raise InvalidArgument(f"{where}.name", f"interface {name!r} names no network in {self.at('networks')}")
            if any(x.name == name for x in interfaces):
                raise InvalidArgument(f"{where}.name", f"interface name {name!r} is used twice")
            bindings = [k for k in (*INTERFACE_BINDINGS, *_UNSUPPORTED_BINDINGS) if k in raw]
            if len(bindings) != 1 or bindings[0] not in INTERFACE_BINDINGS:
                raise InvalidArgument(
                    where, f"interface {name!r}: expected one binding of {', '.join(INTERFACE_BINDINGS)}, found "
                    + (", ".join(bindings) if bindings else "none"),
                )
            model = _opt_str(raw.get("model"), f"{where}.model")
            if model is not None and model not in INTERFACE_MODELS:
                raise InvalidArgument(
                    f"{where}.model", f"{model!r} is not a NIC model KubeVirt knows ({', '.join(INTERFACE_MODELS)})"
                )
            mac = _opt_str(raw.get("macAddress"), f"{where}.macAddress")
            if mac is not None and not _MAC.match(mac):
                raise InvalidArgument(f"{where}.macAddress", f"{mac!r} is not a MAC address")
            interfaces.append(Interface(name=name, binding=bindings[0], model=model, mac_address=mac))
        for name in networks:
            if not any(x.name == name for x in interfaces):
                raise InvalidArgument(
                    self.at("networks"), f"network {name!r} has no interface in {self.at('domain.devices.interfaces')}"
                )
        if networks:
            return tuple(interfaces), tuple(networks), True
        # KubeVirt adds a pod network and NIC when none is listed, unless told not to.
        autoattach = devices.get("autoattachPodInterface", True)
        if not isinstance(autoattach, bool):
            raise InvalidArgument(self.at("domain.devices.autoattachPodInterface"), "expected true or false")
        return (), (), autoattach


# -- small typed readers: each names the field it rejects ----------------------


def _mapping(value: object, where: str, *, required: bool = False) -> Mapping[str, Any]:
    # YAML "pod:" (no value) loads as None; it means the same as "pod: {}".
    if value is None:
        if required:
            raise InvalidArgument(where, "is required")
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(where, f"expected a mapping, got {type(value).__name__}")
    return value


def _list(value: object, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidArgument(where, f"expected a list, got {type(value).__name__}")
    return value


def _opt_str(value: object, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidArgument(where, f"expected a string, got {type(value).__name__}")
    return value


def _name(value: object, where: str) -> str:
    name = _opt_str(value, where)
    if not name:
        raise InvalidArgument(where, "is required")
    return name


def _opt_count(value: object, where: str) -> int | None:
    """A non-negative integer; 0 and absent both mean "not set" (Go's zero value)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(where, "expected a non-negative integer")
    return value or None


def _memory_bytes(value: object, where: str) -> int:
    try:
        quantity = parse_quantity(value)
    except ValueError as exc:
        raise InvalidArgument(where, str(exc)) from None
    n = math.ceil(quantity)  # Quantity.Value() rounds up
    if n < MIN_MEMORY_BYTES:
        raise InvalidArgument(where, f"{value!r} is below the minimum of 16Mi ({MIN_MEMORY_BYTES} bytes)")
    return n


def _whole_cpus(value: object, where: str) -> int:
    try:
        quantity = parse_quantity(value)
    except ValueError as exc:
        raise InvalidArgument(where, str(exc)) from None
    if quantity <= 0:
        raise InvalidArgument(where, f"{value!r}: must be more than 0")
    return math.ceil(quantity)


def _text_or_base64(body: Mapping[str, Any], key: str, where: str) -> tuple[bytes | None, str]:
    """``key`` verbatim, else ``key + 'Base64'`` decoded (KubeVirt: the plain field wins).

    Both are checked when both are given: a malformed value is an error even
    when it would lose.
    """
    text = _opt_str(body.get(key), f"{where}.{key}")
    b64 = _opt_str(body.get(key + "Base64"), f"{where}.{key}Base64")
    decoded: bytes | None = None
    if b64 is not None:
        # Go's base64.StdEncoding (KubeVirt) skips line breaks; so do we.
        try:
            decoded = ann.decode_base64(b64.replace("\r", "").replace("\n", ""))
        except ValueError as exc:
            raise InvalidArgument(f"{where}.{key}Base64", str(exc)) from None
    if text is not None:
        data = text.encode("utf-8")
        if len(data) > ann.MAX_USER_DATA_BYTES:
            raise InvalidArgument(f"{where}.{key}", f"larger than {ann.MAX_USER_DATA_BYTES} bytes")
        return data, f"{where}.{key}"
    if decoded is not None:
        return decoded, f"{where}.{key}Base64"
    return None, ""
