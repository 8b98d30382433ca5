"""CreateContainer → ``VMRequest``: sizes, firmware, devices and cloud-init sources merged (pure).

The caller (the containers service) copies the few CRI values it needs into
plain values (``CRIResources``, env pairs, command, args), so this module
stays free of protobuf.

Precedence, most specific first (docs/vms.md and docs/annotations.md):

* Pod and container annotations are merged key by key; the container's value
  wins. ``podvisor.io/user-data`` and ``podvisor.io/user-data-base64`` are two
  spellings of one setting, so the scope (container, else pod) that sets
  either of them supplies the user-data, and within it ``user-data`` wins over
  ``user-data-base64`` as ``userData`` wins over ``userDataBase64`` in KubeVirt.
* Sizing: CRI fields (``memory_limit_in_bytes``; ``cpu_quota / cpu_period``
  rounded up; ``cpu_shares``), then the flat annotations
  (``podvisor.io/vcpus``, ``podvisor.io/memory``), then the ``podvisor.io/vm``
  VMI spec, then ``VMDefaults``. The flat keys beat the VMI spec because they
  are the narrower statement: one value set on purpose, over a whole manifest.
  The same order applies to ``podvisor.io/firmware`` and to cloud-init
  (``user-data``/``network-config`` annotations over the VMI's
  ``cloudInitNoCloud``).
* Maxima (what UpdateContainerResources may grow to): the VMI's
  ``domain.cpu.maxSockets`` / ``domain.memory.maxGuest`` when given (an
  error when below the resolved size); otherwise the larger of the resolved
  size and the configured ``VMDefaults.max_vcpus`` / ``max_memory_bytes``
  (0, the default, means "no headroom": the maximum is the size).
* A requested size is never raised silently: below the minimum is an error
  naming the field and the minimum.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.domain import annotations as ann
from agent.domain import documents
from agent.domain.errors import InvalidArgument
from agent.domain.kubevirt import MIN_MEMORY_BYTES, VMISpec, parse_vmi
from agent.domain.vm import CFS_DEFAULT_PERIOD_US, CloudInit, VMRequest, vcpus_for_quota

POD_ANNOTATIONS_FIELD = "sandbox_config.annotations"
CONTAINER_ANNOTATIONS_FIELD = "config.annotations"
RESOURCES_FIELD = "config.linux.resources"
ENVS_FIELD = "config.envs"
COMMAND_FIELD = "config.command"

# Names that /etc/environment (pam_env) and a POSIX shell both accept.
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

CLOUD_CONFIG_HEADER = b"#cloud-config"
# Lists the seed merge appends to; anything else there is not valid cloud-config.
_CLOUD_CONFIG_LISTS = ("bootcmd", "runcmd", "write_files")


@dataclass(frozen=True)
class CRIResources:
    """The CRI ``LinuxContainerResources`` fields that size a VM (0 = unset, as in protobuf)."""

    memory_limit_in_bytes: int = 0
    cpu_quota: int = 0  # microseconds per period; 0 or -1: no limit
    cpu_period: int = 0  # microseconds; 0: the kernel's 100000
    cpu_shares: int = 0


# The kernel's CFS bandwidth limits (kernel/sched/core.c) and the cpu.shares
# range (libvirt's <cputune><shares> too; kubelet sends at least 2).
CFS_MIN_PERIOD_US = 1_000
CFS_MAX_PERIOD_US = 1_000_000
CFS_MIN_QUOTA_US = 1_000
MIN_CPU_SHARES = 2
MAX_CPU_SHARES = 262_144


@dataclass(frozen=True)
class CRISizes:
    """What ``LinuxContainerResources`` states about a VM's size, checked (0 = not stated)."""

    memory_bytes: int = 0
    vcpus: int = 0
    cpu_shares: int = 0


def cri_sizes(cri: CRIResources, field: str) -> CRISizes:
    """Check the CRI resource fields and turn them into sizes.

    The one check CreateContainer (``field`` = ``config.linux.resources``) and
    UpdateContainerResources (``field`` = ``linux``) share: memory not
    negative and, when set, at least 16Mi; period 0 or within the kernel's
    1 ms – 1 s; quota -1, 0 or at least 1 ms, at most ``ann.MAX_VCPUS`` vCPUs;
    shares 0 or within the kernel's 2 – 262144. Raises InvalidArgument naming
    the field.
    """
    memory = cri.memory_limit_in_bytes
    if memory < 0:
        raise InvalidArgument(f"{field}.memory_limit_in_bytes", "must not be negative")
    if 0 < memory < MIN_MEMORY_BYTES:
        raise InvalidArgument(
            f"{field}.memory_limit_in_bytes",
            f"{memory} bytes is below the minimum of 16Mi ({MIN_MEMORY_BYTES} bytes) a VM needs")
    _kernel_range(cri.cpu_period, CFS_MIN_PERIOD_US, CFS_MAX_PERIOD_US, f"{field}.cpu_period", " µs")
    if cri.cpu_quota < -1:
        raise InvalidArgument(f"{field}.cpu_quota", "must be -1 (no limit), 0 (unset) or positive")
    if 0 < cri.cpu_quota < CFS_MIN_QUOTA_US:
        raise InvalidArgument(f"{field}.cpu_quota",
                              f"{cri.cpu_quota} µs is below the kernel's minimum of {CFS_MIN_QUOTA_US} µs")
    vcpus = vcpus_for_quota(cri.cpu_quota, cri.cpu_period)
    if vcpus > ann.MAX_VCPUS:
        period = cri.cpu_period or CFS_DEFAULT_PERIOD_US
        raise InvalidArgument(
            f"{field}.cpu_quota",
            f"{cri.cpu_quota}/{period} asks for {vcpus} vCPUs; at most {ann.MAX_VCPUS} are supported")
    _kernel_range(cri.cpu_shares, MIN_CPU_SHARES, MAX_CPU_SHARES, f"{field}.cpu_shares")
    return CRISizes(memory_bytes=memory, vcpus=vcpus, cpu_shares=cri.cpu_shares)


def _kernel_range(value: int, low: int, high: int, where: str, unit: str = "") -> None:
    """0 (unset) or within the kernel's ``low``–``high``."""
    if value < 0:
        raise InvalidArgument(where, "must not be negative")
    if value and not low <= value <= high:
        raise InvalidArgument(where, f"{value}{unit} is outside the kernel's range of {low} to {high}{unit}")


@dataclass(frozen=True)
class SizeCeiling:
    """The largest VM this node accepts: the configured ``[vm] largest_*`` or the host's size.

    ``*_source`` say where a figure comes from, for the error message.
    """

    vcpus: int
    memory_bytes: int
    vcpus_source: str = "this host's CPU count"
    memory_source: str = "this host's memory"

    def check_vcpus(self, vcpus: int, field: str) -> None:
        if vcpus > self.vcpus:
            raise InvalidArgument(field, f"{vcpus} vCPUs is more than the {self.vcpus} a VM may have on this "
                                         f"node ({self.vcpus_source})")

    def check_memory(self, memory_bytes: int, field: str) -> None:
        if memory_bytes > self.memory_bytes:
            raise InvalidArgument(field, f"{memory_bytes} bytes is more than the {self.memory_bytes} bytes a VM "
                                         f"may have on this node ({self.memory_source})")


@dataclass(frozen=True)
class VMDefaults:
    """Configured sizes for what neither the CRI nor annotations state."""

    vcpus: int = 1
    memory_bytes: int = 512 * 2**20
    # Ceilings UpdateContainerResources may grow a VM to; a VM's maximum is the
    # larger of its size and these. 0: no headroom.
    max_vcpus: int = 0
    max_memory_bytes: int = 0
    firmware: str = "bios"
    # The largest VM the node accepts (sizes and maxima); 0: the host's CPU
    # count and memory, read at each CreateContainer.
    largest_vcpus: int = 0
    largest_memory_bytes: int = 0

    def ceiling(self, host_cpus: int, host_memory_bytes: int) -> SizeCeiling:
        """The largest VM, from these settings or, where they are 0, the host's figures."""
        return SizeCeiling(
            vcpus=self.largest_vcpus or host_cpus, memory_bytes=self.largest_memory_bytes or host_memory_bytes,
            vcpus_source="[vm] largest_vcpus" if self.largest_vcpus else f"the host's {host_cpus} CPUs",
            memory_source=("[vm] largest_memory_bytes" if self.largest_memory_bytes
                           else f"the host's {host_memory_bytes} bytes of memory"))

    def __post_init__(self) -> None:
        if not 1 <= self.vcpus <= ann.MAX_VCPUS:
            raise ValueError(f"vcpus must be between 1 and {ann.MAX_VCPUS}")
        if not 0 <= self.max_vcpus <= ann.MAX_VCPUS:
            raise ValueError(f"max_vcpus must be between 0 and {ann.MAX_VCPUS}")
        if self.memory_bytes < MIN_MEMORY_BYTES:
            raise ValueError(f"memory_bytes must be at least {MIN_MEMORY_BYTES} (16Mi)")
        if self.max_memory_bytes < 0:
            raise ValueError("max_memory_bytes must not be negative")
        if not 0 <= self.largest_vcpus <= ann.MAX_VCPUS:
            raise ValueError(f"largest_vcpus must be between 0 and {ann.MAX_VCPUS}")
        if self.largest_memory_bytes and self.largest_memory_bytes < MIN_MEMORY_BYTES:
            raise ValueError(f"largest_memory_bytes must be 0 or at least {MIN_MEMORY_BYTES} (16Mi)")
        if self.firmware not in ("bios", "uefi"):
            raise ValueError("firmware must be bios or uefi")


class UserDataFormat(enum.Enum):
    """How cloud-init will read a user-data blob (cloud-init's user_data.py rules)."""

    NONE = "none"  # absent or empty
    CLOUD_CONFIG = "cloud-config"  # a "#cloud-config" YAML document: Podvisor merges into it
    MIME = "mime"  # MIME multipart ("mime-version:" in the first 4096 bytes)
    OTHER = "other"  # script, #include, #cloud-boothook, jinja template, gzip, unknown text…


def user_data_format(data: bytes | None) -> UserDataFormat:
    """Classify user-data the way cloud-init does before it picks a handler."""
    if not data:
        return UserDataFormat.NONE
    if data.startswith(b"\x1f\x8b"):  # gzip: cloud-init decompresses, we keep it opaque
        return UserDataFormat.OTHER
    if b"mime-version:" in data[:4096].lower():
        return UserDataFormat.MIME
    # "#cloud-config-archive" and "#cloud-config-jsonp" share the prefix but are other formats.
    if data.startswith(CLOUD_CONFIG_HEADER) and not data.startswith((b"#cloud-config-archive",
                                                                     b"#cloud-config-jsonp")):
        return UserDataFormat.CLOUD_CONFIG
    return UserDataFormat.OTHER


def parse_cloud_config(data: bytes) -> dict[str, Any]:
    """The mapping of a ``#cloud-config`` document; ValueError says what is wrong.

    Checks only what merging needs: YAML, a mapping (or empty), and list-typed
    ``runcmd`` / ``write_files`` / ``ssh_authorized_keys`` (a string is
    accepted for the last, as cloud-init accepts it).
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("a #cloud-config document must be UTF-8 text") from None
    try:
        doc = documents.load_yaml(text, max_bytes=ann.MAX_USER_DATA_BYTES)
    except ValueError as exc:
        raise ValueError(f"the #cloud-config document is {exc}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ValueError("a #cloud-config document must be a YAML mapping")
    for key in _CLOUD_CONFIG_LISTS:
        if key in doc and not isinstance(doc[key], list):
            raise ValueError(f"'{key}' in the #cloud-config document must be a list")
    keys = doc.get("ssh_authorized_keys")
    if keys is not None and not isinstance(keys, (list, str)):
        raise ValueError("'ssh_authorized_keys' in the #cloud-config document must be a list")
    return doc


def check_network_config(data: bytes) -> None:
    """Check NoCloud network-config content: v1 or v2, without a top-level ``network:`` key."""
    try:
        doc = documents.load_json_or_yaml(data.decode("utf-8"), max_bytes=ann.MAX_USER_DATA_BYTES)
    except UnicodeDecodeError:
        raise ValueError("network-config must be UTF-8 text") from None
    except ValueError as exc:
        raise ValueError(f"network-config is {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError("network-config must be a JSON or YAML mapping")
    if "network" in doc:
        raise ValueError(
            "network-config has a top-level 'network:' key; NoCloud's network-config is the content "
            "under it: put 'version:' and the rest at the top level"
        )
    version = doc.get("version")
    if isinstance(version, bool) or version not in (1, 2):
        raise ValueError(f"network-config needs 'version: 1' or 'version: 2' at the top level, got {version!r}")
    if version == 1 and not isinstance(doc.get("config"), list):
        raise ValueError("network-config version 1 needs a 'config' list")


@dataclass(frozen=True)
class _Annotation:
    value: str
    field: str  # e.g. "config.annotations['podvisor.io/memory']"


def _ours(values: Mapping[str, str], field: str) -> dict[str, _Annotation]:
    return {k: _Annotation(v, f"{field}[{k!r}]") for k, v in values.items() if k.startswith(ann.PREFIX)}


def _merge(pod: Mapping[str, str], container: Mapping[str, str]) -> dict[str, _Annotation]:
    """Podvisor keys of both scopes; the container's value wins per key."""
    return {**_ours(pod, POD_ANNOTATIONS_FIELD), **_ours(container, CONTAINER_ANNOTATIONS_FIELD)}


def resolve_vmi(pod_annotations: Mapping[str, str], container_annotations: Mapping[str, str]) -> VMISpec | None:
    """The ``podvisor.io/vm`` spec that applies (the container's, else the pod's), parsed."""
    vm = _merge(pod_annotations, container_annotations).get(ann.VM)
    return parse_vmi(vm.value, vm.field) if vm else None


def build_vm_request(
    *,
    cri_resources: CRIResources,
    pod_annotations: Mapping[str, str],
    container_annotations: Mapping[str, str],
    env: Mapping[str, str] | Iterable[tuple[str, str]] = (),
    command: Sequence[str] = (),
    args: Sequence[str] = (),
    defaults: VMDefaults | None = None,
    ceiling: SizeCeiling | None = None,
) -> VMRequest:
    """Resolve what a CreateContainer asks for into a ``VMRequest``.

    ``env`` is the container's environment in CRI order (a later duplicate
    wins, as in a shell). ``command`` and ``args`` are concatenated into the
    guest's command: a VM image has no ENTRYPOINT for ``args`` to extend.
    ``ceiling`` bounds every size and maximum (``VMDefaults.ceiling``).
    Raises InvalidArgument naming the CRI field or annotation at fault.
    """
    defaults = defaults or VMDefaults()
    sizes = cri_sizes(cri_resources, RESOURCES_FIELD)
    ann.validate(pod_annotations, POD_ANNOTATIONS_FIELD)
    ann.validate(container_annotations, CONTAINER_ANNOTATIONS_FIELD)
    merged = _merge(pod_annotations, container_annotations)
    vm = merged.get(ann.VM)
    vmi = parse_vmi(vm.value, vm.field) if vm else None

    vcpus, vcpus_field = _vcpus(sizes, merged, vmi, defaults)
    memory, memory_field = _memory(sizes, merged, vmi, defaults)
    max_vcpus = _maximum(vcpus, vcpus_field, vmi.max_vcpus if vmi else None,
                         vmi.max_vcpus_field if vmi else "", defaults.max_vcpus, "vCPUs")
    max_memory = _maximum(memory, memory_field, vmi.max_memory_bytes if vmi else None,
                          vmi.max_memory_field if vmi else "", defaults.max_memory_bytes, "bytes")
    if ceiling is not None:
        ceiling.check_vcpus(vcpus, vcpus_field)
        ceiling.check_memory(memory, memory_field)
        if vmi and vmi.max_vcpus is not None:
            ceiling.check_vcpus(max_vcpus, vmi.max_vcpus_field)
        if vmi and vmi.max_memory_bytes is not None:
            ceiling.check_memory(max_memory, vmi.max_memory_field)
        # Configured headroom never takes a VM past the ceiling.
        max_vcpus = max(vcpus, min(max_vcpus, ceiling.vcpus))
        max_memory = max(memory, min(max_memory, ceiling.memory_bytes))

    firmware = defaults.firmware
    if ann.FIRMWARE in merged:
        firmware = ann.parse_firmware(merged[ann.FIRMWARE].value)
    elif vmi and vmi.firmware:
        firmware = vmi.firmware

    disk_bus = "virtio"
    containerdisk_path = None
    interface_model = "virtio"
    pod_network = True
    if vmi:
        boot = vmi.container_disk_disk
        if boot and boot.device != "disk":
            raise InvalidArgument(
                f"{boot.field}.{boot.device}",
                f"the containerDisk volume {boot.name!r} must be attached as a disk, not a {boot.device}",
            )
        disk_bus = (boot.bus if boot else None) or "virtio"
        containerdisk_path = vmi.container_disk.path if vmi.container_disk else None
        interface_model = (vmi.interface.model if vmi.interface else None) or "virtio"
        pod_network = vmi.pod_network

    guest_agent = ann.parse_bool(merged[ann.GUEST_AGENT].value) if ann.GUEST_AGENT in merged else True

    return VMRequest(
        vcpus=vcpus,
        max_vcpus=max_vcpus,
        memory_bytes=memory,
        max_memory_bytes=max_memory,
        cpu_shares=sizes.cpu_shares or None,
        firmware=firmware,
        disk_bus=disk_bus,
        containerdisk_path=containerdisk_path,
        interface_model=interface_model,
        pod_network=pod_network,
        guest_agent=guest_agent,
        cloud_init=_cloud_init(pod_annotations, container_annotations, merged, vmi, env, command, args),
    )


# -- sizing -------------------------------------------------------------------


def _vcpus(
    sizes: CRISizes, merged: Mapping[str, _Annotation], vmi: VMISpec | None, defaults: VMDefaults
) -> tuple[int, str]:
    if sizes.vcpus:
        return sizes.vcpus, f"{RESOURCES_FIELD}.cpu_quota"
    if ann.VCPUS in merged:
        a = merged[ann.VCPUS]
        return ann.parse_vcpus(a.value), a.field
    if vmi and vmi.vcpus is not None:
        return vmi.vcpus, vmi.vcpus_field
    return defaults.vcpus, "the agent's default vCPUs"


def _memory(
    sizes: CRISizes, merged: Mapping[str, _Annotation], vmi: VMISpec | None, defaults: VMDefaults
) -> tuple[int, str]:
    if sizes.memory_bytes:
        return sizes.memory_bytes, f"{RESOURCES_FIELD}.memory_limit_in_bytes"
    if ann.MEMORY in merged:
        a = merged[ann.MEMORY]
        return ann.parse_memory(a.value), a.field
    if vmi and vmi.memory_bytes is not None:
        return vmi.memory_bytes, vmi.memory_field
    return defaults.memory_bytes, "the agent's default memory"


def _maximum(size: int, size_field: str, explicit: int | None, explicit_field: str, configured: int,
             unit: str) -> int:
    """The ceiling a VM may grow to: the VMI's own maximum, else max(size, configured)."""
    if explicit is not None:
        if explicit < size:
            raise InvalidArgument(
                explicit_field, f"allows {explicit} {unit}, less than the {size} {unit} set by {size_field}"
            )
        return explicit
    return max(size, configured)


# -- cloud-init ---------------------------------------------------------------


def _cloud_init(
    pod: Mapping[str, str],
    container: Mapping[str, str],
    merged: Mapping[str, _Annotation],
    vmi: VMISpec | None,
    env: Mapping[str, str] | Iterable[tuple[str, str]],
    command: Sequence[str],
    args: Sequence[str],
) -> CloudInit:
    vmi_ci = vmi.cloud_init if vmi else None

    user_data, user_field = _user_data(pod, container)
    if user_data is None and vmi_ci and vmi_ci.user_data is not None:
        user_data, user_field = vmi_ci.user_data, vmi_ci.user_data_field
    if user_data_format(user_data) is UserDataFormat.CLOUD_CONFIG:
        assert user_data is not None
        try:
            parse_cloud_config(user_data)
        except ValueError as exc:
            raise InvalidArgument(user_field, str(exc)) from None

    # Every network-config given is checked, also one that loses: a malformed
    # value is an error wherever it sits.
    sources: list[tuple[bytes, str]] = []
    if ann.NETWORK_CONFIG in merged:
        a = merged[ann.NETWORK_CONFIG]
        sources.append((a.value.encode("utf-8"), a.field))
    if vmi_ci and vmi_ci.network_data is not None:
        sources.append((vmi_ci.network_data, vmi_ci.network_data_field))
    for data, where in sources:
        try:
            check_network_config(data)
        except ValueError as exc:
            raise InvalidArgument(where, str(exc)) from None

    keys: tuple[str, ...] = ()
    if ann.SSH_AUTHORIZED_KEYS in merged:
        text = merged[ann.SSH_AUTHORIZED_KEYS].value
        keys = tuple(line.strip() for line in text.splitlines() if line.strip())

    full_command = (*command, *args)
    for i, word in enumerate(full_command):
        if "\x00" in word:
            where = f"{COMMAND_FIELD}[{i}]" if i < len(command) else f"config.args[{i - len(command)}]"
            raise InvalidArgument(where, "must not contain NUL characters")

    return CloudInit(
        user_data=user_data,
        network_config=sources[0][0] if sources else None,
        ssh_authorized_keys=keys,
        env=_environment(env),
        command=full_command,
    )


def _user_data(pod: Mapping[str, str], container: Mapping[str, str]) -> tuple[bytes | None, str]:
    """User-data from the most specific scope that sets it; plain text wins over base64."""
    for values, field in ((container, CONTAINER_ANNOTATIONS_FIELD), (pod, POD_ANNOTATIONS_FIELD)):
        if ann.USER_DATA in values:
            return values[ann.USER_DATA].encode("utf-8"), f"{field}[{ann.USER_DATA!r}]"
        if ann.USER_DATA_BASE64 in values:
            # validate() has already checked the encoding and size.
            return ann.decode_base64(values[ann.USER_DATA_BASE64]), f"{field}[{ann.USER_DATA_BASE64!r}]"
    return None, ""


def _environment(env: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, str]:
    """Container env as /etc/environment can hold it; a later duplicate wins."""
    pairs = env.items() if isinstance(env, Mapping) else env
    result: dict[str, str] = {}
    for i, (key, value) in enumerate(pairs):
        if not _ENV_NAME.fullmatch(key):
            raise InvalidArgument(
                f"{ENVS_FIELD}[{i}].key",
                f"{key!r} cannot be exported in the guest: expected letters, digits and '_', not starting with a digit",
            )
        if any(c in value for c in "\x00\r\n"):
            raise InvalidArgument(
                f"{ENVS_FIELD}[{i}].value",
                f"the value of {key} has a line break or NUL, which /etc/environment cannot hold",
            )
        result.pop(key, None)  # keep the order of the last assignment
        result[key] = value
    return result
