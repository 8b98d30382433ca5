"""runtime.v1 ExecSync, mixed into RuntimeServicer: check, one service call, convert out.

Exec, Attach and PortForward (URLs on the streaming server) live in their
own module; ExecSync answers in the call itself.
"""

from __future__ import annotations

from typing import Any

from agent.api.gen.runtime.v1 import api_pb2 as pb
from agent.domain.errors import InvalidArgument, Unimplemented
from agent.services.exec import ExecService


class ExecSyncVerbs:
    """ExecSync. Needs ``_execs`` (None: exec is not wired), set by RuntimeServicer."""

    _execs: ExecService | None

    def ExecSync(self, request: pb.ExecSyncRequest, context: Any) -> pb.ExecSyncResponse:
        if not request.container_id:
            raise InvalidArgument("container_id", "must not be empty")
        if not request.cmd or not request.cmd[0]:
            raise InvalidArgument("cmd", "must name a program to run (cmd[0] is empty or missing)")
        if request.timeout < 0:
            raise InvalidArgument("timeout", "must not be negative")
        if self._execs is None:
            raise Unimplemented("ExecSync is not available in this agent (no exec service)")
        r = self._execs.exec_sync(request.container_id, list(request.cmd), float(request.timeout))
        return pb.ExecSyncResponse(stdout=r.stdout, stderr=r.stderr, exit_code=r.exit_code)
