"""What the CRI streaming server asks of the runtime: a way into a container
(exec, attach) and into a pod's network (port forward).

The server speaks the wire protocols (SPDY/3.1, WebSocket) and hands each
session to a ``StreamBackend`` as plain byte streams; the backend reaches the
guest. Errors are ``agent.domain.errors.PodvisorError`` subclasses; the server
reports them to the client (the remotecommand error stream, the port-forward
error stream) with their message.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class TermSize:
    width: int  # columns
    height: int  # rows


class Input(Protocol):
    def read(self, n: int = 65536) -> bytes:
        """Up to ``n`` bytes the client sent; b"" once the client closed its stdin."""
        ...


class Output(Protocol):
    def write(self, data: bytes) -> None:
        """Send to the client; raises OSError once the client is gone."""
        ...


class Resizes(Protocol):
    def get(self, timeout: float | None = None) -> TermSize | None:
        """The next terminal size the client sent; None when the session ended
        (or ``timeout`` passed with none)."""
        ...


@dataclass
class Streams:
    """One session's streams; a stream the client did not ask for is None.
    With a tty there is no stderr (the terminal merges it into stdout)."""

    stdin: Input | None
    stdout: Output | None
    stderr: Output | None
    resize: Resizes | None


@dataclass(frozen=True)
class ExitStatus:
    """How a command in the guest ended: its exit code (0 is success) and, for
    a failure that is not a plain non-zero exit, a message."""

    code: int
    message: str = ""


class StreamBackend(Protocol):
    def exec(self, container_id: str, cmd: list[str], tty: bool, streams: Streams) -> ExitStatus:
        """Run ``cmd`` in the container's guest with these streams until it ends."""
        ...

    def attach(self, container_id: str, tty: bool, streams: Streams) -> None:
        """Join the container's console until the client leaves or the VM stops."""
        ...

    def port_forward(self, sandbox_id: str, port: int, timeout: float) -> socket.socket:
        """A TCP connection to ``port`` of the pod (its VM), connected."""
        ...

