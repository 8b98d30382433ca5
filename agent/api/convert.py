"""Pure conversions between runtime.v1 protobuf messages and the domain model."""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format

import agent.api.gen  # noqa: F401  (puts the generated packages on sys.path)
from agent.domain.errors import InvalidArgument
from agent.domain.image import Image
from agent.domain.registry import RegistryAuth
from agent.domain.sandbox import (
    DNSConfig,
    Metadata,
    NetworkMode,
    PortMapping,
    Sandbox,
    SandboxFilter,
    SandboxSpec,
)
from agent.services.runtime import HostInfo, RuntimeStatus

from podvisor.v1 import podvisor_pb2
from runtime.v1 import api_pb2 as pb

_PROTOCOLS = {pb.TCP: "tcp", pb.UDP: "udp", pb.SCTP: "sctp"}
_PROTOCOLS_BACK = {v: k for k, v in _PROTOCOLS.items()}


def sandbox_spec_from_pb(req: pb.RunPodSandboxRequest) -> SandboxSpec:
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
    )


def sandbox_filter_from_pb(req: pb.ListPodSandboxRequest) -> SandboxFilter | None:
    if not req.HasField("filter"):
        return None
    f = req.filter
    ready = None
    if f.HasField("state"):
        ready = f.state.state == pb.SANDBOX_READY
    return SandboxFilter(id=f.id, ready=ready, label_selector=dict(f.label_selector))


def _metadata_pb(md: Metadata) -> pb.PodSandboxMetadata:
    return pb.PodSandboxMetadata(name=md.name, namespace=md.namespace, uid=md.uid,
                                 attempt=md.attempt)


def _state_pb(sb: Sandbox) -> int:
    return int(pb.SANDBOX_READY if sb.state.cri_ready else pb.SANDBOX_NOTREADY)


def sandbox_to_pb(sb: Sandbox) -> pb.PodSandbox:
    return pb.PodSandbox(
        id=sb.id,
        metadata=_metadata_pb(sb.spec.metadata),
        state=_state_pb(sb),
        created_at=sb.created_at_ns,
        labels=sb.spec.labels,
        annotations=sb.spec.annotations,
        runtime_handler=sb.spec.runtime_handler,
    )


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


class EncodedCache:
    """Encodes frozen domain values as one repeated message field, with caching.

    A value is re-encoded only when the service replaced it (identity check),
    so a relist of unchanged sandboxes is a bytes join. The output is exactly
    what protobuf produces for ``repeated Msg items = field_number``.
    """

    def __init__(self, to_pb: Any, field_number: int) -> None:
        self._to_pb = to_pb
        self._tag = _varint(field_number << 3 | 2)  # wire type 2: length-delimited
        self._cache: dict[str, tuple[Any, bytes]] = {}

    def encode(self, values: list[Any], complete: bool = True) -> bytes:
        """``complete``: ``values`` holds every live value (no filter applied)."""
        cache = self._cache
        parts = []
        for value in values:
            hit = cache.get(value.id)
            if hit is None or hit[0] is not value:
                body = self._to_pb(value).SerializeToString(deterministic=True)
                hit = (value, self._tag + _varint(len(body)) + body)
                cache[value.id] = hit
            parts.append(hit[1])
        if complete and len(cache) > len(values):
            # Forget values that no longer exist.
            live = {v.id for v in values}
            # list(cache) is one atomic copy: other RPC threads may be adding.
            for key in [k for k in list(cache) if k not in live]:
                cache.pop(key, None)
        return b"".join(parts)


def sandbox_status_to_pb(sb: Sandbox) -> pb.PodSandboxStatus:
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
        "vm": None,
    }
    return {"info": json.dumps(doc, sort_keys=True)}


def image_to_pb(img: Image) -> pb.Image:
    out = pb.Image(
        id=img.id,
        repo_tags=img.repo_tags,
        repo_digests=img.repo_digests,
        size=img.size,
        spec=pb.ImageSpec(image=img.id),
        pinned=False,
    )
    user = img.user.split(":", 1)[0]
    if user.isdigit():
        out.uid.value = int(user)
    elif user:
        out.username = user
    return out


def image_verbose_info(img: Image, disk_paths: dict[str, str]) -> str:
    """The JSON document behind a verbose ImageStatus' ``info``."""
    return json.dumps({
        "id": img.id,
        "manifestDigest": img.manifest_digest,
        "layers": list(img.layers),
        "configMediaType": img.config_media_type,
        "disks": [
            {"pathInImage": d.path_in_image, "format": d.format, "virtualSize": d.virtual_size,
             "size": d.size, "hostPath": disk_paths.get(d.file, "")}
            for d in img.disks
        ],
        "containerDisk": not img.disk_problem,
        "diskProblem": img.disk_problem,
    }, sort_keys=True)


def version_to_pb(v: dict[str, str]) -> pb.VersionResponse:
    return pb.VersionResponse(**v)


def status_to_pb(st: RuntimeStatus, verbose: bool, handlers: tuple[str, ...]) -> pb.StatusResponse:
    resp = pb.StatusResponse(
        status=pb.RuntimeStatus(
            conditions=[
                pb.RuntimeCondition(type=c.type, status=c.status, reason=c.reason,
                                    message=c.message)
                for c in st.conditions
            ]
        ),
        runtime_handlers=[pb.RuntimeHandler(name=h, features=pb.RuntimeHandlerFeatures())
                          for h in handlers],
        features=pb.RuntimeFeatures(supplemental_groups_policy=False),
    )
    if verbose:
        for key, value in st.info.items():
            resp.info[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return resp


def host_info_to_pb(h: HostInfo) -> podvisor_pb2.HostInfoResponse:
    return podvisor_pb2.HostInfoResponse(
        virt_type=h.virt.virt_type,
        virt_type_reason=h.virt.reason,
        libvirt_version=h.libvirt_library,
        libvirtd_version=h.libvirt_daemon,
        qemu_version=h.qemu,
        libvirt_uri=h.libvirt_uri,
        libvirt_connected=h.libvirt_connected,
        hostname=h.host.hostname,
        kernel_release=h.host.kernel_release,
        cpu_model=h.host.cpu_model,
        cpus=h.host.cpus,
        memory_total_bytes=h.host.memory_total_bytes,
        memory_available_bytes=h.host.memory_available_bytes,
        state_dir=str(h.state_dir),
        state_disk_total_bytes=h.host.disk_total_bytes,
        state_disk_free_bytes=h.host.disk_free_bytes,
        agent_version=h.agent_version,
        kvm_device_present=h.kvm.device_present,
        kvm_pvm=h.kvm.pvm,
    )


def message_to_json(msg: Any) -> str:
    return str(json_format.MessageToJson(msg, preserving_proto_field_name=True))


def registry_auth_from_pb(auth: pb.AuthConfig) -> RegistryAuth:
    """A PullImage's ``AuthConfig`` as the domain's registry credentials."""
    return RegistryAuth(
        username=auth.username,
        password=auth.password,
        auth=auth.auth,
        server_address=auth.server_address,
        identity_token=auth.identity_token,
        registry_token=auth.registry_token,
    )
