"""runtime.v1 runtime information verbs, mixed into RuntimeServicer: Version, Status, UpdateRuntimeConfig."""

from __future__ import annotations

from typing import Any

from agent.api.convert import runtime_info as convert
from agent.api.gen.runtime.v1 import api_pb2 as pb
from agent.services.runtime import RuntimeInfoService
from agent.services.sandboxes import RUNTIME_HANDLERS


class RuntimeInfoVerbs:
    """Needs ``_runtime``, set by RuntimeServicer."""

    _runtime: RuntimeInfoService

    def UpdateRuntimeConfig(self, request: pb.UpdateRuntimeConfigRequest,
                            context: Any) -> pb.UpdateRuntimeConfigResponse:
        # kubelet sends the node's pod CIDR; CNI configuration owns addressing here.
        return pb.UpdateRuntimeConfigResponse()

    def Version(self, request: pb.VersionRequest, context: Any) -> pb.VersionResponse:
        return convert.version_to_pb(self._runtime.version())

    def Status(self, request: pb.StatusRequest, context: Any) -> pb.StatusResponse:
        return convert.status_to_pb(self._runtime.status(), request.verbose, RUNTIME_HANDLERS)
