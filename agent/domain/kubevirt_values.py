"""The values a KubeVirt VMI spec is read into, and the readers of its leaves (pure).

``VMISpec`` and its parts (disks, interfaces, volumes) are what
:mod:`agent.domain.kubevirt` hands back for a ``podvisor.io/vm`` annotation.
The readers below turn one leaf of the document (a mapping, a list, a string,
a count, a Kubernetes quantity, inline or base64 data) into a typed value, or
raise ``InvalidArgument`` naming the field they were given.
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
from agent.domain.imageref import ImageRef

# Below this no guest kernel boots; Podvisor refuses rather than rounding up.
MIN_MEMORY_BYTES = 16 * 2**20

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


# -- typed readers: each names the field it rejects -----------------------------


def read_mapping(value: object, where: str, *, required: bool = False) -> Mapping[str, Any]:
    # YAML "pod:" (no value) loads as None; it means the same as "pod: {}".
    if value is None:
        if required:
            raise InvalidArgument(where, "is required")
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(where, f"expected a mapping, got {type(value).__name__}")
    return value


def read_list(value: object, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidArgument(where, f"expected a list, got {type(value).__name__}")
    return value


def read_str(value: object, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidArgument(where, f"expected a string, got {type(value).__name__}")
    return value


def read_name(value: object, where: str) -> str:
    name = read_str(value, where)
    if not name:
        raise InvalidArgument(where, "is required")
    return name


def read_count(value: object, where: str) -> int | None:
    """A non-negative integer; 0 and absent both mean "not set" (Go's zero value)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(where, "expected a non-negative integer")
    return value or None


def read_memory(value: object, where: str) -> int:
    try:
        quantity = parse_quantity(value)
    except ValueError as exc:
        raise InvalidArgument(where, str(exc)) from None
    n = math.ceil(quantity)  # Quantity.Value() rounds up
    if n < MIN_MEMORY_BYTES:
        raise InvalidArgument(where, f"{value!r} is below the minimum of 16Mi ({MIN_MEMORY_BYTES} bytes)")
    return n


def read_cpus(value: object, where: str) -> int:
    try:
        quantity = parse_quantity(value)
    except ValueError as exc:
        raise InvalidArgument(where, str(exc)) from None
    if quantity <= 0:
        raise InvalidArgument(where, f"{value!r}: must be more than 0")
    return math.ceil(quantity)


def read_text_or_base64(body: Mapping[str, Any], key: str, where: str) -> tuple[bytes | None, str]:
    """``key`` verbatim, else ``key + 'Base64'`` decoded (KubeVirt: the plain field wins).

    Both are checked when both are given: a malformed value is an error even
    when it would lose.
    """
    text = read_str(body.get(key), f"{where}.{key}")
    b64 = read_str(body.get(key + "Base64"), f"{where}.{key}Base64")
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
