"""Runtime-level use cases: Version, Status, host information, and the
choice of virt type at start."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from agent import __version__
from agent.domain import virt
from agent.domain.errors import PodvisorError
from agent.domain.host import HostFacts
from agent.domain.network.choice import NetworkChoice
from agent.domain.virt import KvmFacts, VirtChoice
from agent.services.ports import HostProbe, HypervisorStatus, KvmProbe

log = structlog.get_logger(__name__)

RUNTIME_NAME = "podvisor"
RUNTIME_API_VERSION = "v1"
# The CRI "version" field: the kubelet-facing API version, which upstream
# runtimes report as 0.1.0.
KUBELET_API_VERSION = "0.1.0"


def choose_virt(configured: str, kvm: KvmProbe) -> tuple[VirtChoice, KvmFacts]:
    """The virt type ``[libvirt] virt_type`` leads to on this host, probing
    KVM only when the facts alone cannot tell."""
    facts = kvm.gather()
    if virt.needs_probe(configured, facts):
        ok, detail = kvm.probe()
        facts = virt.KvmFacts(facts.device_present, facts.device_usable, facts.pvm, ok, detail)
    choice = virt.choose(configured, facts)
    if configured == "kvm" and (facts.pvm or not facts.device_usable):
        log.warning("virt_type = kvm is configured, but guests may not run on this /dev/kvm",
                    pvm=facts.pvm, usable=facts.device_usable)
    return choice, facts


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
        libvirt: HypervisorStatus,
        cni_lookup: Callable[[], NetworkChoice],
        host: HostProbe,
        virt: VirtChoice,
        kvm: KvmFacts,
        state_dir: Path,
    ) -> None:
        self._libvirt = libvirt
        self._cni_lookup = cni_lookup
        self._host = host
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
        return True, v.library, v.daemon, v.hypervisor

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
            host=self._host.facts(),
            state_dir=self._state_dir,
            agent_version=__version__,
        )
