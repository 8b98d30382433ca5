"""TCP connections to a pod's VM, for PortForward.

Made from the host's network namespace, not the pod's: once the VM took the
pod IP, the pod namespace has no address of the pod network and no route to
it (``eth0`` is a bare bridge port, ``pvbr-eth0`` carries only the DHCP
server's 169.254.75.10/32), and a connection from 169.254.75.10 would get
no answer: the guest routes replies to that address through its default
gateway, into the CNI network, which does not know it. The host reaches the
pod IP as it reaches every pod on the node (the CNI bridge's gateway
address and route; kubelet's HTTP and TCP probes take the same path), and
the guest answers on-link. docs/networking.md#port-forward says more.
"""

from __future__ import annotations

import socket

from agent.domain.errors import DeadlineExceeded, FailedPrecondition, Unavailable


class PodDialer:
    """The ``PodDialer`` port."""

    def dial(self, sandbox_id: str, ip: str, port: int, timeout: float) -> socket.socket:
        """A connected socket to ``ip:port`` (blocking, no timeout set).

        FailedPrecondition when the guest refuses (nothing listens on the
        port), DeadlineExceeded when nothing answers within ``timeout``
        seconds, Unavailable for anything else (no route, host unreachable).
        """
        where = f"port {port} of pod sandbox {sandbox_id[:12]} (VM at {ip})"
        try:
            sock = socket.create_connection((ip, port), timeout=timeout)
        except ConnectionRefusedError:
            raise FailedPrecondition(f"{where}: connection refused (nothing in the guest listens on "
                                     "that port, or its firewall rejects it)") from None
        except TimeoutError:
            raise DeadlineExceeded(f"{where}: no answer within {timeout:g} s (is the guest up, on its "
                                   "pod IP, and does its firewall let the port through?)") from None
        except OSError as exc:
            raise Unavailable(f"{where}: cannot connect: {exc.strerror or exc} (is the pod's VM running?)") from None
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
