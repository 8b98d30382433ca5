"""Pure conversions between runtime.v1 container messages and the VM container model."""

from __future__ import annotations

import json

from agent.api.gen.runtime.v1 import api_pb2 as pb
from agent.domain.errors import InvalidArgument
from agent.domain.vm import Container, ContainerSpec, ContainerState, quota_for_vcpus
from agent.domain.vmrequest import CRIResources
from agent.domain.volumes import Propagation, check_device, check_mount, check_unique
from agent.services.container_events import ContainerEvent
from agent.services.containers import ContainerFilter, ContainerStats

_STATES = {
    ContainerState.CREATED: pb.CONTAINER_CREATED, ContainerState.RUNNING: pb.CONTAINER_RUNNING,
    ContainerState.EXITED: pb.CONTAINER_EXITED, ContainerState.UNKNOWN: pb.CONTAINER_UNKNOWN,
    ContainerState.REMOVING: pb.CONTAINER_EXITED, ContainerState.CREATING: pb.CONTAINER_CREATED,
}
_STATES_BACK = {pb.CONTAINER_CREATED: ContainerState.CREATED, pb.CONTAINER_RUNNING: ContainerState.RUNNING,
                pb.CONTAINER_EXITED: ContainerState.EXITED, pb.CONTAINER_UNKNOWN: ContainerState.UNKNOWN}
_EVENTS = {"created": pb.CONTAINER_CREATED_EVENT, "started": pb.CONTAINER_STARTED_EVENT,
           "stopped": pb.CONTAINER_STOPPED_EVENT, "deleted": pb.CONTAINER_DELETED_EVENT}


def container_spec_from_pb(req: pb.CreateContainerRequest) -> ContainerSpec:
    """CreateContainer → ``ContainerSpec``: required fields checked, env decoded."""
    if not req.pod_sandbox_id:
        raise InvalidArgument("pod_sandbox_id", "is required")
    if not req.HasField("config"):
        raise InvalidArgument("config", "is required")
    cfg = req.config
    if not cfg.HasField("metadata"):
        raise InvalidArgument("config.metadata", "is required")
    env: dict[str, str] = {}
    for i, kv in enumerate(cfg.envs):
        if not kv.key:
            raise InvalidArgument(f"config.envs[{i}].key", "is required")
        value = kv.value
        if isinstance(value, bytes):  # bytes on this wire (string upstream; same encoding)
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidArgument(f"config.envs[{i}].value", "is not UTF-8") from None
        env[kv.key] = value
    mounts = tuple(
        check_mount(f"config.mounts[{i}]", m.container_path, m.host_path, m.readonly,
                    _PROPAGATION.get(m.propagation, Propagation.PRIVATE))
        for i, m in enumerate(cfg.mounts))
    devices = tuple(check_device(f"config.devices[{i}]", d.container_path, d.host_path, d.permissions)
                    for i, d in enumerate(cfg.devices))
    check_unique(mounts, devices)
    res = cfg.linux.resources
    return ContainerSpec(
        sandbox_id=req.pod_sandbox_id, name=cfg.metadata.name, attempt=cfg.metadata.attempt,
        image=cfg.image.image, command=tuple(cfg.command), args=tuple(cfg.args), env=env,
        labels=dict(cfg.labels), annotations=dict(cfg.annotations), log_path=cfg.log_path,
        memory_limit_in_bytes=res.memory_limit_in_bytes, cpu_quota=res.cpu_quota,
        cpu_period=res.cpu_period, cpu_shares=res.cpu_shares, mounts=mounts, devices=devices,
    )


_PROPAGATION = {
    pb.PROPAGATION_PRIVATE: Propagation.PRIVATE,
    pb.PROPAGATION_HOST_TO_CONTAINER: Propagation.HOST_TO_CONTAINER,
    pb.PROPAGATION_BIDIRECTIONAL: Propagation.BIDIRECTIONAL,
}
_PROPAGATION_BACK = {v: k for k, v in _PROPAGATION.items()}


def container_filter_from_pb(req: pb.ListContainersRequest) -> ContainerFilter | None:
    """ListContainers' filter; None when the request has none."""
    if not req.HasField("filter"):
        return None
    f = req.filter
    state = _STATES_BACK.get(f.state.state) if f.HasField("state") else None
    return ContainerFilter(id=f.id, sandbox_id=f.pod_sandbox_id, state=state,
                           label_selector=dict(f.label_selector))


def container_stats_filter_from_pb(req: pb.ListContainerStatsRequest) -> ContainerFilter:
    """ListContainerStats' filter (an absent one is empty: every container)."""
    f = req.filter
    return ContainerFilter(id=f.id, sandbox_id=f.pod_sandbox_id, label_selector=dict(f.label_selector))


def resources_from_pb(req: pb.UpdateContainerResourcesRequest) -> CRIResources:
    """UpdateContainerResources' sizing fields, unchecked (the service checks them as CreateContainer does)."""
    res = req.linux
    return CRIResources(memory_limit_in_bytes=res.memory_limit_in_bytes, cpu_quota=res.cpu_quota,
                        cpu_period=res.cpu_period, cpu_shares=res.cpu_shares)


def _metadata(c: Container) -> pb.ContainerMetadata:
    return pb.ContainerMetadata(name=c.name, attempt=c.attempt)


def container_to_pb(c: Container) -> pb.Container:
    """One item of ListContainers."""
    return pb.Container(id=c.id, pod_sandbox_id=c.sandbox_id, metadata=_metadata(c),
                        image=pb.ImageSpec(image=c.image), image_ref=c.image_id, image_id=c.image_id,
                        state=_STATES[c.state], created_at=c.created_at_ns, labels=c.labels,
                        annotations=c.annotations)


def container_status_to_pb(c: Container) -> pb.ContainerStatus:
    """ContainerStatus' status, with the VM's current size as CRI resources."""
    cpu_period, cpu_quota = quota_for_vcpus(c.vcpus)
    return pb.ContainerStatus(
        id=c.id, metadata=_metadata(c), state=_STATES[c.state], created_at=c.created_at_ns,
        started_at=c.started_at_ns, finished_at=c.finished_at_ns, exit_code=c.exit_code,
        image=pb.ImageSpec(image=c.image), image_ref=c.image_id, image_id=c.image_id,
        reason=c.reason, message=c.message, labels=c.labels, annotations=c.annotations,
        log_path=c.log_path,
        mounts=[pb.Mount(container_path=m.container_path, host_path=m.host_path, readonly=m.readonly,
                         propagation=_PROPAGATION_BACK[m.propagation]) for m in c.mounts],
        resources=pb.ContainerResources(linux=pb.LinuxContainerResources(
            memory_limit_in_bytes=c.memory_bytes,
            cpu_period=cpu_period, cpu_quota=cpu_quota, cpu_shares=c.cpu_shares or 0)),
    )


def container_verbose_info(c: Container, xml: str) -> dict[str, str]:
    """The ``info`` map of a verbose ContainerStatus: one JSON document."""
    return {"info": json.dumps({
        "domain": c.domain_name, "domainXML": xml, "overlay": c.overlay_path, "seed": c.seed_path,
        "consoleLog": c.console_log, "serialSocket": c.serial_socket, "directory": c.directory,
        "vcpus": c.vcpus, "maxVcpus": c.max_vcpus, "memoryBytes": c.memory_bytes,
        "maxMemoryBytes": c.max_memory_bytes, "firmware": c.firmware,
    }, sort_keys=True)}


def cpu_usage_to_pb(at_ns: int, cpu_time_ns: int) -> pb.CpuUsage:
    """CPU time used so far, for a container or a sandbox."""
    return pb.CpuUsage(timestamp=at_ns, usage_core_nano_seconds=pb.UInt64Value(value=cpu_time_ns))


def memory_usage_to_pb(at_ns: int, rss_bytes: int, available_bytes: int | None = None) -> pb.MemoryUsage:
    """Memory use, for a container or a sandbox.

    The host's view: QEMU's resident memory is what the VM costs, so it is the
    working set, the usage and the RSS at once.
    """
    rss = pb.UInt64Value(value=rss_bytes)
    if available_bytes is None:
        return pb.MemoryUsage(timestamp=at_ns, working_set_bytes=rss, usage_bytes=rss, rss_bytes=rss)
    return pb.MemoryUsage(timestamp=at_ns, working_set_bytes=rss, usage_bytes=rss, rss_bytes=rss,
                          available_bytes=pb.UInt64Value(value=available_bytes))


def container_stats_to_pb(s: ContainerStats) -> pb.ContainerStats:
    """One container's stats: CPU, memory and its writable layer (the overlay)."""
    c = s.container
    return pb.ContainerStats(
        attributes=pb.ContainerAttributes(id=c.id, metadata=_metadata(c), labels=c.labels,
                                          annotations=c.annotations),
        cpu=cpu_usage_to_pb(s.at_ns, s.cpu_time_ns),
        memory=memory_usage_to_pb(s.at_ns, s.rss_bytes, available_bytes=max(0, s.balloon_bytes - s.rss_bytes)),
        writable_layer=pb.FilesystemUsage(
            timestamp=s.at_ns, fs_id=pb.FilesystemIdentifier(mountpoint=c.directory),
            used_bytes=pb.UInt64Value(value=s.writable_bytes), inodes_used=pb.UInt64Value(value=3)),
    )


def container_event_to_pb(ev: ContainerEvent, sandbox: pb.PodSandboxStatus | None,
                          container: pb.ContainerStatus | None) -> pb.ContainerEventResponse:
    """One GetContainerEvents message; statuses are left out when their object is gone."""
    resp = pb.ContainerEventResponse(container_id=ev.container_id, container_event_type=_EVENTS[ev.kind],
                                     created_at=ev.at_ns)
    if sandbox is not None:
        resp.pod_sandbox_status.CopyFrom(sandbox)
    if container is not None:
        resp.containers_statuses.append(container)
    return resp
