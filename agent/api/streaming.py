"""runtime.v1 streaming verbs, mixed into RuntimeServicer: Exec, Attach and
PortForward answer with a URL on the streaming server (agent.streaming)."""

from __future__ import annotations

from typing import Any

from agent.api.gen.runtime.v1 import api_pb2 as pb
from agent.services.streaming import StreamingService


class StreamingVerbs:
    """Needs ``_streaming``, set by RuntimeServicer."""

    _streaming: StreamingService

    def Exec(self, request: pb.ExecRequest, context: Any) -> pb.ExecResponse:
        return pb.ExecResponse(url=self._streaming.exec(
            request.container_id, list(request.cmd), request.tty, request.stdin, request.stdout, request.stderr))

    def Attach(self, request: pb.AttachRequest, context: Any) -> pb.AttachResponse:
        return pb.AttachResponse(url=self._streaming.attach(
            request.container_id, request.tty, request.stdin, request.stdout, request.stderr))

    def PortForward(self, request: pb.PortForwardRequest, context: Any) -> pb.PortForwardResponse:
        return pb.PortForwardResponse(url=self._streaming.port_forward(request.pod_sandbox_id, list(request.port)))
