"""Pure conversions between runtime.v1 pod sandbox messages and the sandbox model."""

from __future__ import annotations

import json
from typing import Any

from agent.api.convert.containers import container_stats_to_pb, cpu_usage_to_pb, memory_usage_to_pb
from agent.api.gen.runtime.v1 import api_pb2 as pb
from agent.domain.errors import InvalidArgument
from agent.domain.sandbox import (
    DNSConfig,
    Metadata,
    NetworkMode,
    PortMapping,
    Sandbox,
    SandboxFilter,
    SandboxSpec,
)
from agent.services.stats import SandboxStats

_PROTOCOLS = {pb.TCP: "tcp", pb.UDP: "udp", pb.SCTP: "sctp"}


def sandbox_spec_from_pb(req: pb.RunPodSandboxRequest) -> SandboxSpec:
    """RunPodSandbox → ``SandboxSpec``: required fields and enums checked (limits are the service's)."""
    if not req.HasField("config"):
        raise InvalidArgument("config", "is required")
    cfg = req.config
    if not cfg.HasField("metadata"):
        raise InvalidArgument("config.metadata", "is required")
    md = cfg.metadata
    mappings = []
    for i, pm in enumerate(cfg.port_mappings):
        if pm.protocol not in _PROTOCOLS:
            raise InvalidArgument(f"config.port_mappings[{i}].protocol", f"unknown value {pm.protocol}")
        mappings.append(PortMapping(_PROTOCOLS[pm.protocol], pm.container_port, pm.host_port,
                                    pm.host_ip))
    network_mode = NetworkMode.POD
    linux = cfg.linux
    ns_opts = linux.security_context.namespace_options
    if ns_opts.network == pb.NODE:
        network_mode = NetworkMode.NODE
    elif ns_opts.network not in (pb.POD,):
        raise InvalidArgument(
            "config.linux.security_context.namespace_options.network",
            "only POD and NODE network namespaces make sense for a VM sandbox",
        )
    return SandboxSpec(
        metadata=Metadata(md.name, md.namespace, md.uid, md.attempt),
        hostname=cfg.hostname,
        log_directory=cfg.log_directory,
        dns=DNSConfig(tuple(cfg.dns_config.servers), tuple(cfg.dns_config.searches),
                      tuple(cfg.dns_config.options)),
        port_mappings=tuple(mappings),
        labels=dict(cfg.labels),
        annotations=dict(cfg.annotations),
        runtime_handler=req.runtime_handler,
        network_mode=network_mode,
        cgroup_parent=linux.cgroup_parent,
        sysctls=dict(linux.sysctls),
    )


def sandbox_filter_from_pb(req: pb.ListPodSandboxRequest) -> SandboxFilter | None:
    """ListPodSandbox's filter; None when the request has none."""
    if not req.HasField("filter"):
        return None
    f = req.filter
    ready = None
    if f.HasField("state"):
        ready = f.state.state == pb.SANDBOX_READY
    return SandboxFilter(id=f.id, ready=ready, label_selector=dict(f.label_selector))


def sandbox_stats_filter_from_pb(req: pb.ListPodSandboxStatsRequest) -> SandboxFilter:
    """ListPodSandboxStats' filter (an absent one is empty: every sandbox)."""
    f = req.filter
    return SandboxFilter(id=f.id, label_selector=dict(f.label_selector))


def _metadata_pb(md: Metadata) -> pb.PodSandboxMetadata:
    return pb.PodSandboxMetadata(name=md.name, namespace=md.namespace, uid=md.uid,
                                 attempt=md.attempt)


def _state_pb(sb: Sandbox) -> int:
    return int(pb.SANDBOX_READY if sb.state.cri_ready else pb.SANDBOX_NOTREADY)


def sandbox_to_pb(sb: Sandbox) -> pb.PodSandbox:
    """One item of ListPodSandbox."""
    return pb.PodSandbox(
        id=sb.id,
        metadata=_metadata_pb(sb.spec.metadata),
        state=_state_pb(sb),
        created_at=sb.created_at_ns,
        labels=sb.spec.labels,
        annotations=sb.spec.annotations,
        runtime_handler=sb.spec.runtime_handler,
    )


def sandbox_status_to_pb(sb: Sandbox) -> pb.PodSandboxStatus:
    """PodSandboxStatus' status (also sent with every container event)."""
    network_mode = pb.NODE if sb.spec.network_mode is NetworkMode.NODE else pb.POD
    return pb.PodSandboxStatus(
        id=sb.id,
        metadata=_metadata_pb(sb.spec.metadata),
        state=_state_pb(sb),
        created_at=sb.created_at_ns,
        network=pb.PodSandboxNetworkStatus(
            ip=sb.ip, additional_ips=[pb.PodIP(ip=ip) for ip in sb.additional_ips]
        ),
        linux=pb.LinuxPodSandboxStatus(
            namespaces=pb.Namespace(options=pb.NamespaceOption(network=network_mode))
        ),
        labels=sb.spec.labels,
        annotations=sb.spec.annotations,
        runtime_handler=sb.spec.runtime_handler,
    )


def sandbox_verbose_info(sb: Sandbox, state_dir: str) -> dict[str, str]:
    """The ``info`` map of a verbose PodSandboxStatus: one JSON document."""
    spec = sb.spec
    doc: dict[str, Any] = {
        "id": sb.id,
        "state": sb.state.value,
        "createdAt": sb.created_at_ns,
        "stoppedAt": sb.stopped_at_ns,
        "stateDir": state_dir,
        "hostname": spec.hostname,
        "logDirectory": spec.log_directory,
        "networkMode": spec.network_mode.value,
        "dnsConfig": {"servers": list(spec.dns.servers), "searches": list(spec.dns.searches),
                      "options": list(spec.dns.options)},
        "portMappings": [
            {"protocol": p.protocol, "containerPort": p.container_port, "hostPort": p.host_port,
             "hostIp": p.host_ip}
            for p in spec.port_mappings
        ],
        "cgroupParent": spec.cgroup_parent,
        "sysctls": dict(spec.sysctls),
        "vm": None,
    }
    return {"info": json.dumps(doc, sort_keys=True)}


def sandbox_stats_to_pb(st: SandboxStats) -> pb.PodSandboxStats:
    """A sandbox's stats: the totals of its running VMs, and each VM's own."""
    sb = st.sandbox
    return pb.PodSandboxStats(
        attributes=pb.PodSandboxAttributes(id=sb.id, metadata=_metadata_pb(sb.spec.metadata),
                                           labels=sb.spec.labels, annotations=sb.spec.annotations),
        linux=pb.LinuxPodSandboxStats(
            cpu=cpu_usage_to_pb(st.at_ns, st.cpu_time_ns),
            memory=memory_usage_to_pb(st.at_ns, st.rss_bytes),
            containers=[container_stats_to_pb(s) for s in st.containers],
        ),
    )
