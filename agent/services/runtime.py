"""Runtime-level use cases: Version, Status and host information."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent import __version__
from agent.domain.errors import PodvisorError
from agent.domain.host import HostFacts
from agent.domain.network.choice import NetworkChoice
from agent.domain.virt import KvmFacts, VirtChoice

RUNTIME_NAME = "podvisor"
RUNTIME_API_VERSION = "v1"
# The CRI "version" field: the kubelet-facing API version, which upstream
# runtimes report as 0.1.0.
KUBELET_API_VERSION = "0.1.0"


class LibvirtPort(Protocol):
    uri: str

    @property
    def last_error(self) -> str: ...
    def connected(self) -> bool: ...
    def versions(self) -> object: ...


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool
    reason: str = ""
    message: str = ""


@dataclass(frozen=True)
class RuntimeStatus:
    conditions: tuple[Condition, ...]
    info: dict[str, object]


@dataclass(frozen=True)
class HostInfo:
    virt: VirtChoice
    kvm: KvmFacts
    libvirt_uri: str
    libvirt_connected: bool
    libvirt_library: str
    libvirt_daemon: str
    qemu: str
    host: HostFacts
    state_dir: Path
    agent_version: str


class RuntimeInfoService:
    def __init__(
        self,
        libvirt: LibvirtPort,
        cni_lookup: Callable[[], NetworkChoice],
        host_facts: Callable[[], HostFacts],
        virt: VirtChoice,
        kvm: KvmFacts,
        state_dir: Path,
    ) -> None:
        self._libvirt = libvirt
        self._cni_lookup = cni_lookup
        self._host_facts = host_facts
        self.virt = virt
        self.kvm = kvm
        self._state_dir = state_dir

    @staticmethod
    def version() -> dict[str, str]:
        return {
            "version": KUBELET_API_VERSION,
            "runtime_name": RUNTIME_NAME,
            "runtime_version": __version__,
            "runtime_api_version": RUNTIME_API_VERSION,
        }

    def _libvirt_versions(self) -> tuple[bool, str, str, str]:
        if not self._libvirt.connected():
            return False, "", "", ""
        try:
            v = self._libvirt.versions()
        except PodvisorError:
            return False, "", "", ""
        return True, getattr(v, "library", ""), getattr(v, "daemon", ""), getattr(v, "hypervisor", "")

    def status(self) -> RuntimeStatus:
        up, lib, daemon, qemu = self._libvirt_versions()
        runtime = Condition(
            "RuntimeReady",
            up,
            "" if up else "LibvirtUnavailable",
            "" if up else self._libvirt.last_error,
        )
        lookup = self._cni_lookup()
        network = Condition(
            "NetworkReady",
            lookup.config is not None,
            "" if lookup.config is not None else "NetworkPluginNotReady",
            lookup.message,
        )
        info: dict[str, object] = {
            "virtType": self.virt.virt_type,
            "virtTypeReason": self.virt.reason,
            "libvirt": {"uri": self._libvirt.uri, "connected": up, "library": lib,
                        "daemon": daemon, "qemu": qemu},
            "cni": {"config": str(lookup.path) if lookup.path else "", "message": lookup.message},
            "runtime": self.version(),
        }
        return RuntimeStatus((runtime, network), info)

    def host_info(self) -> HostInfo:
        up, lib, daemon, qemu = self._libvirt_versions()
        return HostInfo(
            virt=self.virt,
            kvm=self.kvm,
            libvirt_uri=self._libvirt.uri,
            libvirt_connected=up,
            libvirt_library=lib or "",
            libvirt_daemon=daemon,
            qemu=qemu,
            host=self._host_facts(),
            state_dir=self._state_dir,
            agent_version=__version__,
        )
