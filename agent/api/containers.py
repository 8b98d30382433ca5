"""runtime.v1 container verbs (the VM), mixed into RuntimeServicer: check, convert in, one service call, convert out."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from agent.api.convert import containers as convert
from agent.api.convert.sandboxes import sandbox_status_to_pb
from agent.api.gen.runtime.v1 import api_pb2 as pb
from agent.domain.errors import InvalidArgument, PodvisorError
from agent.services.container_events import ContainerEvent
from agent.services.containers import ContainerService
from agent.services.sandboxes import SandboxService
from agent.services.stats import StatsService


class ContainerVerbs:
    """Create, start, stop, remove, list, status, resources, log reopening, stats and events.

    Needs ``_containers``, ``_sandboxes``, ``_stats`` and ``_stopping`` (set
    when the agent drains, to end event streams), set by RuntimeServicer.
    """

    _containers: ContainerService
    _sandboxes: SandboxService
    _stats: StatsService
    _stopping: threading.Event

    def CreateContainer(self, request: pb.CreateContainerRequest, context: Any) -> pb.CreateContainerResponse:
        c = self._containers.create(convert.container_spec_from_pb(request))
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
        items = self._containers.list(convert.container_filter_from_pb(request))
        return pb.ListContainersResponse(containers=[convert.container_to_pb(c) for c in items])

    def ContainerStatus(self, request: pb.ContainerStatusRequest, context: Any) -> pb.ContainerStatusResponse:
        c = self._containers.get(request.container_id)
        resp = pb.ContainerStatusResponse(status=convert.container_status_to_pb(c))
        if request.verbose:
            resp.info.update(convert.container_verbose_info(c, self._containers.domain_xml(c)))
        return resp

    def UpdateContainerResources(self, request: pb.UpdateContainerResourcesRequest,
                                 context: Any) -> pb.UpdateContainerResourcesResponse:
        self._containers.update_resources(request.container_id, convert.resources_from_pb(request))
        return pb.UpdateContainerResourcesResponse()

    def ReopenContainerLog(self, request: pb.ReopenContainerLogRequest,
                           context: Any) -> pb.ReopenContainerLogResponse:
        self._containers.reopen_log(request.container_id)
        return pb.ReopenContainerLogResponse()

    def ContainerStats(self, request: pb.ContainerStatsRequest, context: Any) -> pb.ContainerStatsResponse:
        return pb.ContainerStatsResponse(
            stats=convert.container_stats_to_pb(self._stats.container(request.container_id)))

    def ListContainerStats(self, request: pb.ListContainerStatsRequest,
                           context: Any) -> pb.ListContainerStatsResponse:
        items = self._stats.list_containers(convert.container_stats_filter_from_pb(request))
        return pb.ListContainerStatsResponse(stats=[convert.container_stats_to_pb(s) for s in items])

    def GetContainerEvents(self, request: pb.GetEventsRequest, context: Any) -> Iterator[pb.ContainerEventResponse]:
        stop = threading.Event()
        context.add_callback(stop.set)
        for ev in self._containers.events(stop):
            if self._stopping.is_set():
                return
            yield convert.container_event_to_pb(ev, self._sandbox_status(ev), self._container_status(ev))

    def _sandbox_status(self, ev: ContainerEvent) -> pb.PodSandboxStatus | None:
        try:
            return sandbox_status_to_pb(self._sandboxes.get(ev.sandbox_id))
        except PodvisorError:
            return None  # the sandbox is gone already

    def _container_status(self, ev: ContainerEvent) -> pb.ContainerStatus | None:
        if ev.kind == "deleted":
            return None
        try:
            return convert.container_status_to_pb(self._containers.get(ev.container_id))
        except PodvisorError:
            return None
