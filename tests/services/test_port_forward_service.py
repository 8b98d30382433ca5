"""PortForwardService with fakes: every check comes before any connection."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext

import pytest

from agent.domain.errors import FailedPrecondition, InvalidArgument, NotFound
from agent.domain.sandbox import Metadata, NetworkMode, Sandbox, SandboxSpec, SandboxState
from agent.services.port_forward import PortForwardService

SID = "a" * 64


def sandbox(state: SandboxState = SandboxState.READY, ip: str = "10.85.0.7",
            mode: NetworkMode = NetworkMode.POD) -> Sandbox:
    return Sandbox(id=SID, spec=SandboxSpec(metadata=Metadata("p", "ns", "u"), network_mode=mode),
                   state=state, created_at_ns=1, ip=ip)


class Lookup:
    def __init__(self, sb: Sandbox | None) -> None:
        self.sb = sb

    def get(self, sandbox_id: str) -> Sandbox:
        if self.sb is None or not self.sb.id.startswith(sandbox_id):
            raise NotFound(f"pod sandbox {sandbox_id!r} not found")
        return self.sb

    def hold(self, sandbox_id: str) -> AbstractContextManager[None]:
        return nullcontext()


class Dialer:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int, float]] = []
        self.pairs: list[socket.socket] = []

    def dial(self, sandbox_id: str, ip: str, port: int, timeout: float) -> socket.socket:
        self.calls.append((sandbox_id, ip, port, timeout))
        a, b = socket.socketpair()
        self.pairs.append(b)
        return a


@pytest.fixture
def dialer() -> Iterator[Dialer]:
    d = Dialer()
    yield d
    for s in d.pairs:
        s.close()


def test_a_ready_pod_network_sandbox_is_dialled_on_its_pod_ip(dialer: Dialer) -> None:
    with PortForwardService(Lookup(sandbox()), dialer).port_forward(SID[:12], 8080, 5.0) as conn:
        assert conn.fileno() >= 0
    assert dialer.calls == [(SID, "10.85.0.7", 8080, 5.0)]


@pytest.mark.parametrize("port", [0, -1, 65536, True])
def test_a_port_out_of_range_is_invalid(dialer: Dialer, port: int) -> None:
    with pytest.raises(InvalidArgument, match="port"):
        PortForwardService(Lookup(sandbox()), dialer).port_forward(SID, port, 5.0)
    assert dialer.calls == []


@pytest.mark.parametrize("timeout", [0.0, -1.0, float("nan")])
def test_a_timeout_that_is_not_positive_is_invalid(dialer: Dialer, timeout: float) -> None:
    with pytest.raises(InvalidArgument, match="timeout"):
        PortForwardService(Lookup(sandbox()), dialer).port_forward(SID, 80, timeout)
    assert dialer.calls == []


def test_unknown_sandbox_is_not_found(dialer: Dialer) -> None:
    with pytest.raises(NotFound):
        PortForwardService(Lookup(None), dialer).port_forward("nope", 80, 5.0)
    assert dialer.calls == []


def test_a_sandbox_not_ready_is_refused(dialer: Dialer) -> None:
    with pytest.raises(FailedPrecondition, match="not ready"):
        PortForwardService(Lookup(sandbox(SandboxState.NOTREADY)), dialer).port_forward(SID, 80, 5.0)
    assert dialer.calls == []


def test_a_host_network_sandbox_is_refused_with_the_reason(dialer: Dialer) -> None:
    with pytest.raises(FailedPrecondition, match="host network.*user-mode NIC"):
        PortForwardService(Lookup(sandbox(mode=NetworkMode.NODE, ip="192.0.2.1")), dialer).port_forward(
            SID, 80, 5.0)
    assert dialer.calls == []


def test_a_sandbox_without_a_pod_ip_is_refused(dialer: Dialer) -> None:
    with pytest.raises(FailedPrecondition, match="no pod IP"):
        PortForwardService(Lookup(sandbox(ip="")), dialer).port_forward(SID, 80, 5.0)
    assert dialer.calls == []
