"""PortForward: a TCP connection to a port of a pod, i.e. of its VM.

The VM owns the pod IP (bridge binding, docs/networking.md), so a pod's
port is the guest's port on the pod IP. The ``PodDialer`` port connects to
it; the streaming server then copies bytes both ways. Only pod-network
sandboxes can be reached: a host-network (NODE) sandbox's VM sits behind a
QEMU user-mode NIC that nothing outside QEMU can connect into, and the call
is refused with FAILED_PRECONDITION saying so.
"""

from __future__ import annotations

import socket

from agent.domain.errors import FailedPrecondition, InvalidArgument
from agent.domain.sandbox import NetworkMode, SandboxState
from agent.services.ports import PodDialer, SandboxLookup


class PortForwardService:
    def __init__(self, sandboxes: SandboxLookup, dialer: PodDialer) -> None:
        self._sandboxes = sandboxes
        self._dialer = dialer

    def port_forward(self, sandbox_id: str, port: int, timeout: float) -> socket.socket:
        """A connected TCP socket to ``port`` of the sandbox's VM, on the pod IP.

        InvalidArgument for a port outside 1–65535 or a timeout that is not
        positive; NotFound for an unknown sandbox; FailedPrecondition for a
        sandbox that is not ready, uses the host network or has no pod IP;
        the dialer's error (refused, no answer in time, unreachable) otherwise.
        """
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise InvalidArgument("port", f"{port!r} is not a TCP port (1-65535)")
        if not timeout > 0:
            raise InvalidArgument("timeout", f"{timeout!r} must be a positive number of seconds")
        sb = self._sandboxes.get(sandbox_id)
        if sb.state is not SandboxState.READY:
            raise FailedPrecondition(f"pod sandbox {sb.id} is not ready ({sb.state.value}): "
                                     "port-forward needs a running pod")
        if sb.spec.network_mode is NetworkMode.NODE:
            raise FailedPrecondition(
                f"pod sandbox {sb.id} uses the host network: its VM is on a QEMU user-mode NIC, which "
                "takes no connections from outside, so its ports cannot be forwarded; "
                "use a pod-network sandbox (hostNetwork: false)")
        if not sb.ip:
            raise FailedPrecondition(f"pod sandbox {sb.id} has no pod IP (pod networking is off: "
                                     "[cni] enabled = false), so its VM has no address to connect to")
        return self._dialer.dial(sb.id, sb.ip, port, timeout)
