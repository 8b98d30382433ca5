"""runtime.v1 container verbs (the VM) and stats: conversions and handlers.

Kept beside runtime_service.py, which mixes these into RuntimeServicer.
"""

from __future__ import annotations

import json
import math
import threading
import time
from typing import Any

from agent.api.convert import sandbox_status_to_pb
from agent.domain.errors import InvalidArgument, PodvisorError
from agent.domain.vm import Container, ContainerSpec, ContainerState
from agent.services.containers import ContainerFilter, ContainerService, ContainerStats
from agent.services.sandboxes import SandboxService

from runtime.v1 import api_pb2 as pb

_STATES = {
    ContainerState.CREATED: pb.CONTAINER_CREATED, ContainerState.RUNNING: pb.CONTAINER_RUNNING,
    ContainerState.EXITED: pb.CONTAINER_EXITED, ContainerState.UNKNOWN: pb.CONTAINER_UNKNOWN,
    ContainerState.REMOVING: pb.CONTAINER_EXITED, ContainerState.CREATING: pb.CONTAINER_CREATED,
}
_STATES_BACK = {pb.CONTAINER_CREATED: ContainerState.CREATED, pb.CONTAINER_RUNNING: ContainerState.RUNNING,
                pb.CONTAINER_EXITED: ContainerState.EXITED, pb.CONTAINER_UNKNOWN: ContainerState.UNKNOWN}
_EVENTS = {"created": pb.CONTAINER_CREATED_EVENT, "started": pb.CONTAINER_STARTED_EVENT,
           "stopped": pb.CONTAINER_STOPPED_EVENT, "deleted": pb.CONTAINER_DELETED_EVENT}


def spec_from_pb(req: pb.CreateContainerRequest) -> ContainerSpec:
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
    # Host mounts cannot enter a VM (no shared filesystem yet). kubelet always
    # sends some (termination log, service account token): they are accepted
    # and not attached, as documented in docs/vms.md.
    res = cfg.linux.resources
    return ContainerSpec(
        sandbox_id=req.pod_sandbox_id, name=cfg.metadata.name, attempt=cfg.metadata.attempt,
        image=cfg.image.image, command=tuple(cfg.command), args=tuple(cfg.args), env=env,
        labels=dict(cfg.labels), annotations=dict(cfg.annotations), log_path=cfg.log_path,
        memory_limit_in_bytes=res.memory_limit_in_bytes, cpu_quota=res.cpu_quota,
        cpu_period=res.cpu_period, cpu_shares=res.cpu_shares,
    )


def filter_from_pb(req: pb.ListContainersRequest) -> ContainerFilter | None:
    if not req.HasField("filter"):
        return None
    f = req.filter
    state = _STATES_BACK.get(f.state.state) if f.HasField("state") else None
    return ContainerFilter(id=f.id, sandbox_id=f.pod_sandbox_id, state=state,
                           label_selector=dict(f.label_selector))


def _metadata(c: Container) -> pb.ContainerMetadata:
    return pb.ContainerMetadata(name=c.name, attempt=c.attempt)


def container_to_pb(c: Container) -> pb.Container:
    return pb.Container(id=c.id, pod_sandbox_id=c.sandbox_id, metadata=_metadata(c),
                        image=pb.ImageSpec(image=c.image), image_ref=c.image_id, image_id=c.image_id,
                        state=_STATES[c.state], created_at=c.created_at_ns, labels=c.labels,
                        annotations=c.annotations)


def status_to_pb(c: Container) -> pb.ContainerStatus:
    return pb.ContainerStatus(
        id=c.id, metadata=_metadata(c), state=_STATES[c.state], created_at=c.created_at_ns,
        started_at=c.started_at_ns, finished_at=c.finished_at_ns, exit_code=c.exit_code,
        image=pb.ImageSpec(image=c.image), image_ref=c.image_id, image_id=c.image_id,
        reason=c.reason, message=c.message, labels=c.labels, annotations=c.annotations,
        log_path=c.log_path,
        resources=pb.ContainerResources(linux=pb.LinuxContainerResources(
            memory_limit_in_bytes=c.memory_bytes,
            cpu_period=100_000, cpu_quota=100_000 * c.vcpus, cpu_shares=c.cpu_shares or 0)),
    )


def verbose_info(c: Container, xml: str) -> dict[str, str]:
    return {"info": json.dumps({
        "domain": c.domain_name, "domainXML": xml, "overlay": c.overlay_path, "seed": c.seed_path,
        "consoleLog": c.console_log, "serialSocket": c.serial_socket, "directory": c.directory,
        "vcpus": c.vcpus, "maxVcpus": c.max_vcpus, "memoryBytes": c.memory_bytes,
        "maxMemoryBytes": c.max_memory_bytes, "firmware": c.firmware,
    }, sort_keys=True)}


def stats_to_pb(s: ContainerStats) -> pb.ContainerStats:
    c = s.container
    return pb.ContainerStats(
        attributes=pb.ContainerAttributes(id=c.id, metadata=_metadata(c), labels=c.labels,
                                          annotations=c.annotations),
        cpu=pb.CpuUsage(timestamp=s.at_ns, usage_core_nano_seconds=pb.UInt64Value(value=s.cpu_time_ns)),
        memory=pb.MemoryUsage(
            timestamp=s.at_ns,
            # The host's view: QEMU's resident memory is what the VM costs.
            working_set_bytes=pb.UInt64Value(value=s.rss_bytes),
            usage_bytes=pb.UInt64Value(value=s.rss_bytes),
            rss_bytes=pb.UInt64Value(value=s.rss_bytes),
            available_bytes=pb.UInt64Value(value=max(0, s.balloon_bytes - s.rss_bytes)),
        ),
        writable_layer=pb.FilesystemUsage(
            timestamp=s.at_ns, fs_id=pb.FilesystemIdentifier(mountpoint=c.directory),
            used_bytes=pb.UInt64Value(value=s.writable_bytes), inodes_used=pb.UInt64Value(value=3)),
    )


class ContainerVerbs:
    """Mixed into RuntimeServicer; needs self._containers and self._sandboxes."""

    _containers: ContainerService
    _sandboxes: SandboxService
    _stopping: threading.Event

    def CreateContainer(self, request: pb.CreateContainerRequest, context: Any) -> pb.CreateContainerResponse:
        c = self._containers.create(spec_from_pb(request))
        return pb.CreateContainerResponse(container_id=c.id)

    def StartContainer(self, request: pb.StartContainerRequest, context: Any) -> pb.StartContainerResponse:
        self._containers.start(request.container_id)
        return pb.StartContainerResponse()

    def StopContainer(self, request: pb.StopContainerRequest, context: Any) -> pb.StopContainerResponse:
        if request.timeout < 0:
            raise InvalidArgument("timeout", "must not be negative")
        self._containers.stop(request.container_id, int(request.timeout))
        return pb.StopContainerResponse()

    def RemoveContainer(self, request: pb.RemoveContainerRequest, context: Any) -> pb.RemoveContainerResponse:
        self._containers.remove(request.container_id)
        return pb.RemoveContainerResponse()

    def ListContainers(self, request: pb.ListContainersRequest, context: Any) -> pb.ListContainersResponse:
        items = self._containers.list(filter_from_pb(request))
        return pb.ListContainersResponse(containers=[container_to_pb(c) for c in items])

    def ContainerStatus(self, request: pb.ContainerStatusRequest, context: Any) -> pb.ContainerStatusResponse:
        c = self._containers.get(request.container_id)
        resp = pb.ContainerStatusResponse(status=status_to_pb(c))
        if request.verbose:
            resp.info.update(verbose_info(c, self._containers.domain_xml(c)))
        return resp

    def UpdateContainerResources(self, request: pb.UpdateContainerResourcesRequest,
                                 context: Any) -> pb.UpdateContainerResourcesResponse:
        res = request.linux
        vcpus = 0
        if res.cpu_quota > 0:
            # As at create: an unset period is the kernel's 100000 µs.
            vcpus = math.ceil(res.cpu_quota / (res.cpu_period or 100_000))
        self._containers.update_resources(request.container_id, memory_bytes=res.memory_limit_in_bytes,
                                          vcpus=vcpus)
        return pb.UpdateContainerResourcesResponse()

    def ReopenContainerLog(self, request: pb.ReopenContainerLogRequest,
                           context: Any) -> pb.ReopenContainerLogResponse:
        self._containers.reopen_log(request.container_id)
        return pb.ReopenContainerLogResponse()

    def ContainerStats(self, request: pb.ContainerStatsRequest, context: Any) -> pb.ContainerStatsResponse:
        c = self._containers.get(request.container_id)
        return pb.ContainerStatsResponse(stats=stats_to_pb(self._containers.stats(c)))

    def ListContainerStats(self, request: pb.ListContainerStatsRequest,
                           context: Any) -> pb.ListContainerStatsResponse:
        f = request.filter
        flt = ContainerFilter(id=f.id, sandbox_id=f.pod_sandbox_id, label_selector=dict(f.label_selector))
        items = [c for c in self._containers.list(flt) if c.state is not ContainerState.EXITED]
        return pb.ListContainerStatsResponse(stats=[stats_to_pb(self._containers.stats(c)) for c in items])

    def _sandbox_stats(self, sandbox: Any) -> pb.PodSandboxStats:
        md = sandbox.spec.metadata
        stats = [self._containers.stats(c) for c in self._containers.in_sandbox(sandbox.id)
                 if c.state is ContainerState.RUNNING]
        now = time.time_ns()
        cpu = sum(s.cpu_time_ns for s in stats)
        rss = sum(s.rss_bytes for s in stats)
        return pb.PodSandboxStats(
            attributes=pb.PodSandboxAttributes(
                id=sandbox.id, metadata=pb.PodSandboxMetadata(name=md.name, namespace=md.namespace, uid=md.uid,
                                                              attempt=md.attempt),
                labels=sandbox.spec.labels, annotations=sandbox.spec.annotations),
            linux=pb.LinuxPodSandboxStats(
                cpu=pb.CpuUsage(timestamp=now, usage_core_nano_seconds=pb.UInt64Value(value=cpu)),
                memory=pb.MemoryUsage(timestamp=now, working_set_bytes=pb.UInt64Value(value=rss),
                                      usage_bytes=pb.UInt64Value(value=rss), rss_bytes=pb.UInt64Value(value=rss)),
                containers=[stats_to_pb(s) for s in stats],
            ),
        )

    def PodSandboxStats(self, request: pb.PodSandboxStatsRequest, context: Any) -> pb.PodSandboxStatsResponse:
        sandbox = self._sandboxes.get(request.pod_sandbox_id)
        return pb.PodSandboxStatsResponse(stats=self._sandbox_stats(sandbox))

    def ListPodSandboxStats(self, request: pb.ListPodSandboxStatsRequest,
                            context: Any) -> pb.ListPodSandboxStatsResponse:
        f = request.filter
        out = []
        for sb in self._sandboxes.list():
            if f.id and not sb.id.startswith(f.id):
                continue
            if any(sb.spec.labels.get(k) != v for k, v in f.label_selector.items()):
                continue
            out.append(self._sandbox_stats(sb))
        return pb.ListPodSandboxStatsResponse(stats=out)

    def GetContainerEvents(self, request: pb.GetEventsRequest, context: Any) -> Any:
        stop = threading.Event()
        context.add_callback(stop.set)
        for ev in self._containers.events(stop):
            if self._stopping.is_set():
                return
            resp = pb.ContainerEventResponse(container_id=ev.container_id,
                                             container_event_type=_EVENTS[ev.kind], created_at=ev.at_ns)
            try:
                resp.pod_sandbox_status.CopyFrom(sandbox_status_to_pb(self._sandboxes.get(ev.sandbox_id)))
            except PodvisorError:
                pass  # the sandbox is gone already
            if ev.kind != "deleted":
                try:
                    resp.containers_statuses.append(status_to_pb(self._containers.get(ev.container_id)))
                except PodvisorError:
                    pass
            yield resp
