"""Exec, Attach and PortForward: check the request against the container or
sandbox, then leave it with the streaming server, which answers with the URL
the client streams through. Nothing runs until the client comes; then the
server hands the session to ``GuestStreams``, the runtime's ways into a guest."""

from __future__ import annotations

import socket

from agent.domain.errors import FailedPrecondition, InvalidArgument
from agent.domain.sandbox import SandboxState
from agent.domain.streaming import AttachRequest, ExecRequest, PortForwardRequest
from agent.domain.vm import ContainerState
from agent.services.attach import AttachService
from agent.services.containers import ContainerService
from agent.services.exec import ExecService
from agent.services.port_forward import PortForwardService
from agent.services.ports import StreamURLs
from agent.services.sandboxes import SandboxService
from agent.streaming.backend import ExitStatus, Streams


class StreamingService:
    def __init__(self, containers: ContainerService, sandboxes: SandboxService, urls: StreamURLs) -> None:
        self._containers = containers
        self._sandboxes = sandboxes
        self._urls = urls

    def _running(self, container_id: str) -> str:
        if not container_id:
            raise InvalidArgument("container_id", "must not be empty")
        c = self._containers.get(container_id)
        if c.state is not ContainerState.RUNNING:
            raise FailedPrecondition(f"container {c.id!r} is not running (state {c.state.value})")
        return c.id

    @staticmethod
    def _check_streams(stdin: bool, stdout: bool, stderr: bool, tty: bool) -> None:
        if not (stdin or stdout or stderr):
            raise InvalidArgument("stdin", "one of stdin, stdout and stderr must be true")
        if tty and stderr:
            raise InvalidArgument("stderr", "tty and stderr cannot both be true (a terminal merges stderr "
                                  "into stdout)")

    def exec(self, container_id: str, cmd: list[str], tty: bool, stdin: bool, stdout: bool,
             stderr: bool) -> str:
        if not cmd:
            raise InvalidArgument("cmd", "must not be empty")
        self._check_streams(stdin, stdout, stderr, tty)
        full = self._running(container_id)
        return self._urls.url_for(ExecRequest(full, tuple(cmd), tty=tty, stdin=stdin, stdout=stdout, stderr=stderr))

    def attach(self, container_id: str, tty: bool, stdin: bool, stdout: bool, stderr: bool) -> str:
        self._check_streams(stdin, stdout, stderr, tty)
        full = self._running(container_id)
        return self._urls.url_for(AttachRequest(full, tty=tty, stdin=stdin, stdout=stdout, stderr=stderr))

    def port_forward(self, sandbox_id: str, ports: list[int]) -> str:
        if not sandbox_id:
            raise InvalidArgument("pod_sandbox_id", "must not be empty")
        for i, port in enumerate(ports):
            if not 1 <= port <= 65535:
                raise InvalidArgument(f"port[{i}]", f"{port} is not a TCP port (1 to 65535)")
        sb = self._sandboxes.get(sandbox_id)
        if sb.state is not SandboxState.READY:
            raise FailedPrecondition(f"pod sandbox {sb.id!r} is not ready")
        return self._urls.url_for(PortForwardRequest(sb.id, tuple(dict.fromkeys(ports))))


class GuestStreams:
    """The streaming server's backend (agent.streaming.backend.StreamBackend):
    exec over SSH or the guest agent, attach to the serial console, port
    forward to the pod IP."""

    def __init__(self, execs: ExecService, attach: AttachService, forwards: PortForwardService) -> None:
        self._execs = execs
        self._attach = attach
        self._forwards = forwards

    def exec(self, container_id: str, cmd: list[str], tty: bool, streams: Streams) -> ExitStatus:
        return self._execs.exec(container_id, cmd, tty, streams)

    def attach(self, container_id: str, tty: bool, streams: Streams) -> None:
        self._attach.attach(container_id, tty, streams)

    def port_forward(self, sandbox_id: str, port: int, timeout: float) -> socket.socket:
        return self._forwards.port_forward(sandbox_id, port, timeout)
