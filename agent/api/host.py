"""podvisor.v1.Host: Podvisor's own API beside the CRI."""

from __future__ import annotations

from typing import Any

from agent.api.convert import host as convert
from agent.api.gen.podvisor.v1 import podvisor_pb2, podvisor_pb2_grpc
from agent.services.runtime import RuntimeInfoService


class HostServicer(podvisor_pb2_grpc.HostServicer):  # type: ignore[misc]
    def __init__(self, runtime: RuntimeInfoService) -> None:
        self._runtime = runtime

    def Info(self, request: podvisor_pb2.HostInfoRequest, context: Any) -> podvisor_pb2.HostInfoResponse:
        return convert.host_info_to_pb(self._runtime.host_info())
