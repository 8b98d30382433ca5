"""runtime.v1 pod sandbox verbs, mixed into RuntimeServicer: check, convert in, one service call, convert out."""

from __future__ import annotations

import time
from typing import Any

from agent.api.convert import sandboxes as convert
from agent.api.convert.wire import EncodedCache
from agent.api.gen.runtime.v1 import api_pb2 as pb
from agent.services.sandboxes import SandboxService
from agent.services.stats import StatsService


class SandboxVerbs:
    """RunPodSandbox, Stop, Remove, Status, List and the sandbox stats calls.

    Needs ``_sandboxes``, ``_stats``, ``_sandboxes_dir`` and ``_list_encoder``
    (an ``EncodedCache`` of ``sandbox_to_pb``), set by RuntimeServicer.
    """

    _sandboxes: SandboxService
    _stats: StatsService
    _sandboxes_dir: str
    _list_encoder: EncodedCache

    def RunPodSandbox(self, request: pb.RunPodSandboxRequest, context: Any) -> pb.RunPodSandboxResponse:
        sb = self._sandboxes.run(convert.sandbox_spec_from_pb(request))
        return pb.RunPodSandboxResponse(pod_sandbox_id=sb.id)

    def StopPodSandbox(self, request: pb.StopPodSandboxRequest, context: Any) -> pb.StopPodSandboxResponse:
        self._sandboxes.stop(request.pod_sandbox_id)
        return pb.StopPodSandboxResponse()

    def RemovePodSandbox(self, request: pb.RemovePodSandboxRequest, context: Any) -> pb.RemovePodSandboxResponse:
        self._sandboxes.remove(request.pod_sandbox_id)
        return pb.RemovePodSandboxResponse()

    def PodSandboxStatus(self, request: pb.PodSandboxStatusRequest, context: Any) -> pb.PodSandboxStatusResponse:
        sb = self._sandboxes.get(request.pod_sandbox_id)
        resp = pb.PodSandboxStatusResponse(status=convert.sandbox_status_to_pb(sb), timestamp=time.time_ns())
        if request.verbose:
            resp.info.update(convert.sandbox_verbose_info(sb, f"{self._sandboxes_dir}/{sb.id}"))
        return resp

    def ListPodSandbox(self, request: pb.ListPodSandboxRequest, context: Any) -> bytes:
        # kubelet relists every second: answer from cached encodings of each
        # (immutable) sandbox value, joined as the repeated field 1 "items".
        items = self._sandboxes.list(convert.sandbox_filter_from_pb(request))
        return self._list_encoder.encode(items, complete=not request.HasField("filter"))

    def PodSandboxStats(self, request: pb.PodSandboxStatsRequest, context: Any) -> pb.PodSandboxStatsResponse:
        return pb.PodSandboxStatsResponse(
            stats=convert.sandbox_stats_to_pb(self._stats.sandbox(request.pod_sandbox_id)))

    def ListPodSandboxStats(self, request: pb.ListPodSandboxStatsRequest,
                            context: Any) -> pb.ListPodSandboxStatsResponse:
        items = self._stats.list_sandboxes(convert.sandbox_stats_filter_from_pb(request))
        return pb.ListPodSandboxStatsResponse(stats=[convert.sandbox_stats_to_pb(s) for s in items])
