"""Pod sandboxes: the slot a VM lives in. Pure model, no I/O."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from agent.domain.errors import InvalidArgument
from agent.domain.filters import selected


class SandboxState(enum.Enum):
    """Lifecycle of a sandbox record.

    CRI knows only READY and NOTREADY. CREATING and REMOVING mark a multi-step
    operation in progress, so that recovery after a crash knows to roll it back
    (CREATING) or finish it (REMOVING).
    """

    CREATING = "creating"
    READY = "ready"
    NOTREADY = "notready"
    REMOVING = "removing"

    @property
    def cri_ready(self) -> bool:
        return self is SandboxState.READY


class NetworkMode(enum.Enum):
    POD = "pod"
    NODE = "node"


@dataclass(frozen=True)
class Metadata:
    name: str
    namespace: str
    uid: str
    attempt: int = 0

    @property
    def reservation_key(self) -> str:
        """The name under which a sandbox is reserved, as containerd forms it."""
        return f"{self.name}_{self.namespace}_{self.uid}_{self.attempt}"


@dataclass(frozen=True)
class DNSConfig:
    servers: tuple[str, ...] = ()
    searches: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class PortMapping:
    protocol: str  # "tcp", "udp" or "sctp"
    container_port: int
    host_port: int
    host_ip: str = ""


@dataclass(frozen=True)
class SandboxSpec:
    """What RunPodSandbox asked for, after validation."""

    metadata: Metadata
    hostname: str = ""
    log_directory: str = ""
    dns: DNSConfig = field(default_factory=DNSConfig)
    port_mappings: tuple[PortMapping, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    runtime_handler: str = ""
    network_mode: NetworkMode = NetworkMode.POD
    cgroup_parent: str = ""
    # linux.sysctls: applied in the guest's kernel (agent.domain.guest_settings).
    sysctls: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Sandbox:
    id: str
    spec: SandboxSpec
    state: SandboxState
    created_at_ns: int
    # Set when the sandbox last left READY (StopPodSandbox), 0 otherwise.
    stopped_at_ns: int = 0
    ip: str = ""
    additional_ips: tuple[str, ...] = ()


@dataclass(frozen=True)
class SandboxFilter:
    """ListPodSandbox filter; empty fields match everything."""

    id: str = ""
    # CRI filters on READY / NOTREADY only; None matches both.
    ready: bool | None = None
    label_selector: Mapping[str, str] = field(default_factory=dict)


def matches(sandbox: Sandbox, flt: SandboxFilter) -> bool:
    """Whether a sandbox passes a filter (id may be a prefix, as crictl sends)."""
    return selected(sandbox.id, sandbox.spec.labels, sandbox.state.cri_ready, id_prefix=flt.id,
                    wanted_state=flt.ready, label_selector=flt.label_selector)


def cri_visible(sandboxes: Iterable[Sandbox]) -> list[Sandbox]:
    """Sandboxes a client may see: not those still being created."""
    return [s for s in sandboxes if s.state is not SandboxState.CREATING]


def resolve_id(wanted: str, ids: Iterable[str], field_name: str) -> str | None:
    """Resolve a full id or a unique prefix of one; None when nothing matches.

    An ambiguous prefix is a client error rather than a guess.
    """
    if not wanted:
        raise InvalidArgument(field_name, "must not be empty")
    matched = [i for i in ids if i.startswith(wanted)]
    if wanted in matched:
        return wanted
    if not matched:
        return None
    if len(matched) > 1:
        raise InvalidArgument(field_name, f"{wanted!r} is an ambiguous id prefix")
    return matched[0]
