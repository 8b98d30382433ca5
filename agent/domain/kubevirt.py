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

import re
from collections.abc import Iterator, Mapping
from typing import Any

from agent.domain import annotations as ann
from agent.domain.errors import InvalidArgument
from agent.domain.imageref import parse_image_ref
from agent.domain.kubevirt_values import (
    MIN_MEMORY_BYTES,
    CloudInitNoCloudVolume,
    ContainerDiskVolume,
    Disk,
    Interface,
    VMISpec,
    parse_quantity,
    read_count,
    read_cpus,
    read_list,
    read_mapping,
    read_memory,
    read_name,
    read_str,
    read_text_or_base64,
)

__all__ = [
    "API_GROUP",
    "DEFAULT_FIELD",
    "DISK_BUSES",
    "DISK_DEVICES",
    "INTERFACE_BINDINGS",
    "INTERFACE_MODELS",
    "KIND_SPEC",
    "KIND_VM",
    "KIND_VMI",
    "MIN_MEMORY_BYTES",
    "SUPPORTED_VOLUMES",
    "CloudInitNoCloudVolume",
    "ContainerDiskVolume",
    "Disk",
    "Interface",
    "VMISpec",
    "parse_quantity",
    "parse_vmi",
    "vmi_from_document",
]

DEFAULT_FIELD = "config.annotations['podvisor.io/vm']"

API_GROUP = "kubevirt.io"
KIND_SPEC = "VirtualMachineInstanceSpec"
KIND_VM = "VirtualMachine"
KIND_VMI = "VirtualMachineInstance"

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
    metadata = read_mapping(doc.get("metadata"), f"{field}.metadata")
    name = read_str(metadata.get("name"), f"{field}.metadata.name")
    spec = read_mapping(doc.get("spec"), f"{field}.spec", required=True)
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
        template = read_mapping(spec.get("template"), f"{field}.spec.template", required=True)
        inner = read_mapping(template.get("spec"), f"{field}.spec.template.spec", required=True)
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

    def _entries(self, value: object, path: str, what: str) -> Iterator[tuple[str, Mapping[str, Any], str]]:
        """The entries of the list at ``path``: each a mapping with a ``name`` used once.

        Yields ``(field, entry, name)``; ``what`` names an entry in errors.
        """
        seen: set[str] = set()
        for i, raw in enumerate(read_list(value, self.at(path))):
            where = self.at(f"{path}[{i}]")
            entry = read_mapping(raw, where, required=True)
            name = read_name(entry.get("name"), f"{where}.name")
            if name in seen:
                raise InvalidArgument(f"{where}.name", f"{what} name {name!r} is used twice")
            seen.add(name)
            yield where, entry, name

    def parse(self, kind: str, name: str | None) -> VMISpec:
        spec = self.spec
        domain = read_mapping(spec.get("domain"), self.at("domain"), required=True)
        if spec.get("accessCredentials"):
            raise InvalidArgument(
                self.at("accessCredentials"),
                "access credentials come from Kubernetes Secrets, which Podvisor cannot read; "
                "use the podvisor.io/ssh-authorized-keys annotation or cloud-init user-data",
            )
        devices = read_mapping(domain.get("devices"), self.at("domain.devices"))
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
            hostname=read_str(spec.get("hostname"), self.at("hostname")),
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
        cpu = read_mapping(domain.get("cpu"), self.at("domain.cpu"))
        topo = {k: read_count(cpu.get(k), self.at(f"domain.cpu.{k}")) for k in ("cores", "sockets", "threads")}
        max_sockets = read_count(cpu.get("maxSockets"), self.at("domain.cpu.maxSockets"))
        cores, sockets, threads = (topo[k] or 1 for k in ("cores", "sockets", "threads"))
        vcpus: int | None = None
        vcpus_field = ""
        if any(topo.values()):
            vcpus, vcpus_field = cores * sockets * threads, self.at("domain.cpu")
        else:
            resources = read_mapping(domain.get("resources"), self.at("domain.resources"))
            for section in ("limits", "requests"):
                where = self.at(f"domain.resources.{section}.cpu")
                value = read_mapping(resources.get(section), self.at(f"domain.resources.{section}")).get("cpu")
                if value is not None:
                    vcpus, vcpus_field = read_cpus(value, where), where
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
        resources = read_mapping(domain.get("resources"), self.at("domain.resources"))
        requests = read_mapping(resources.get("requests"), self.at("domain.resources.requests"))
        limits = read_mapping(resources.get("limits"), self.at("domain.resources.limits"))
        memory_cfg = read_mapping(domain.get("memory"), self.at("domain.memory"))
        candidates = (
            ("guest", memory_cfg.get("guest"), self.at("domain.memory.guest")),
            ("requests", requests.get("memory"), self.at("domain.resources.requests.memory")),
            ("limits", limits.get("memory"), self.at("domain.resources.limits.memory")),
            ("maxGuest", memory_cfg.get("maxGuest"), self.at("domain.memory.maxGuest")),
        )
        found = {key: (read_memory(value, where), where) for key, value, where in candidates if value is not None}
        if "requests" in found and "limits" in found and found["requests"][0] > found["limits"][0]:
            raise InvalidArgument(found["requests"][1], "is greater than domain.resources.limits.memory")
        current = found.get("guest") or found.get("requests") or found.get("limits")
        memory, memory_field = current if current else (None, "")
        max_memory, max_field = found.get("maxGuest", (None, ""))
        if max_memory is not None and memory is not None and max_memory < memory:
            raise InvalidArgument(max_field, f"is less than the guest memory ({memory} bytes, {memory_field})")
        return memory, memory_field, max_memory, max_field

    def _firmware(self, domain: Mapping[str, Any]) -> tuple[str | None, bool | None]:
        firmware = read_mapping(domain.get("firmware"), self.at("domain.firmware"))
        if firmware.get("kernelBoot") is not None:
            # Booting a kernel from a container image is another boot path;
            # ignoring it would boot the disk instead.
            raise InvalidArgument(self.at("domain.firmware.kernelBoot"), "kernel boot is not supported by Podvisor")
        where = self.at("domain.firmware.bootloader")
        bootloader = read_mapping(firmware.get("bootloader"), where)
        has_efi, has_bios = "efi" in bootloader, "bios" in bootloader
        if has_efi and has_bios:
            raise InvalidArgument(where, "names both efi and bios")
        if has_efi:
            efi = read_mapping(bootloader.get("efi"), f"{where}.efi")
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
        for where, volume, name in self._entries(self.spec.get("volumes"), "volumes", "volume"):
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
        body = read_mapping(body, where)
        image = read_str(body.get("image"), f"{where}.image")
        if not image:
            raise InvalidArgument(f"{where}.image", "is required")
        ref = parse_image_ref(image, f"{where}.image")
        path = read_str(body.get("path"), f"{where}.path")
        if path is not None:
            parts = path.split("/")
            if not path.startswith("/") or path.endswith("/") or any(p in ("", ".", "..") for p in parts[1:]):
                raise InvalidArgument(f"{where}.path", f"{path!r} must be an absolute, normalised file path")
        return ContainerDiskVolume(name=name, image=image, image_ref=ref, path=path, field=where)

    def _cloud_init(self, name: str, body: object, where: str) -> CloudInitNoCloudVolume:
        body = read_mapping(body, where)
        for key in ("secretRef", "userDataSecretRef", "networkDataSecretRef"):
            if body.get(key) is not None:
                raise InvalidArgument(
                    f"{where}.{key}",
                    "Kubernetes Secrets cannot be read by Podvisor; inline the data "
                    "(userData/userDataBase64, networkData/networkDataBase64) instead",
                )
        user, user_field = read_text_or_base64(body, "userData", where)
        network, network_field = read_text_or_base64(body, "networkData", where)
        return CloudInitNoCloudVolume(
            name=name, user_data=user, network_data=network, field=where,
            user_data_field=user_field, network_data_field=network_field,
        )

    def _disks(
        self, devices: Mapping[str, Any], volumes: Mapping[str, ContainerDiskVolume | CloudInitNoCloudVolume]
    ) -> tuple[Disk, ...]:
        disks: list[Disk] = []
        for where, raw, name in self._entries(devices.get("disks"), "domain.devices.disks", "disk"):
            if name not in volumes:
                raise InvalidArgument(f"{where}.name", f"disk {name!r} names no volume in {self.at('volumes')}")
            kinds = [k for k in DISK_DEVICES if k in raw]
            if len(kinds) > 1:
                raise InvalidArgument(where, f"disk {name!r} names several device types ({', '.join(kinds)})")
            device = kinds[0] if kinds else "disk"  # KubeVirt's default
            if device == "lun":
                raise InvalidArgument(f"{where}.lun", "lun disks (SCSI passthrough) are not supported by Podvisor")
            target = read_mapping(raw.get(device), f"{where}.{device}")
            bus = read_str(target.get("bus"), f"{where}.{device}.bus")
            if bus is not None and bus not in DISK_BUSES:
                raise InvalidArgument(
                    f"{where}.{device}.bus", f"bus {bus!r} is not supported (supported: {', '.join(DISK_BUSES)})"
                )
            if device == "cdrom" and bus == "virtio":
                raise InvalidArgument(f"{where}.cdrom.bus", "a cdrom cannot use the virtio bus")
            boot_order = read_count(raw.get("bootOrder"), f"{where}.bootOrder")
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
        for where, raw, name in self._entries(self.spec.get("networks"), "networks", "network"):
            kinds = [k for k in raw if k != "name"]
            if kinds != ["pod"]:
                raise InvalidArgument(
                    where, f"network {name!r}: only pod networks are supported by Podvisor, found "
                    + (", ".join(kinds) if kinds else "no network source"),
                )
            read_mapping(raw["pod"], f"{where}.pod")
            networks.append(name)
        if len(networks) > 1:
            raise InvalidArgument(self.at("networks"), "at most one pod network is allowed")

        interfaces: list[Interface] = []
        # _entries refuses a repeated name before the network look-up; the
        # outcome is the same, as the name's first use found its network.
        for where, raw, name in self._entries(devices.get("interfaces"), "domain.devices.interfaces", "interface"):
            if name not in networks:
                raise InvalidArgument(f"{where}.name", f"interface {name!r} names no network in {self.at('networks')}")
            bindings = [k for k in (*INTERFACE_BINDINGS, *_UNSUPPORTED_BINDINGS) if k in raw]
            if len(bindings) != 1 or bindings[0] not in INTERFACE_BINDINGS:
                raise InvalidArgument(
                    where, f"interface {name!r}: expected one binding of {', '.join(INTERFACE_BINDINGS)}, found "
                    + (", ".join(bindings) if bindings else "none"),
                )
            model = read_str(raw.get("model"), f"{where}.model")
            if model is not None and model not in INTERFACE_MODELS:
                raise InvalidArgument(
                    f"{where}.model", f"{model!r} is not a NIC model KubeVirt knows ({', '.join(INTERFACE_MODELS)})"
                )
            mac = read_str(raw.get("macAddress"), f"{where}.macAddress")
            if mac is not None and not _MAC.fullmatch(mac):
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
