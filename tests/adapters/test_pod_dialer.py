"""The pod dialer on loopback: a connection, a refusal, a silent address."""

from __future__ import annotations

import socket

import pytest

from agent.adapters.network.dial import PodDialer
from agent.domain.errors import DeadlineExceeded, FailedPrecondition

SID = "a" * 64


def test_a_listening_port_gives_a_connected_blocking_socket() -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        conn = PodDialer().dial(SID, "127.0.0.1", port, 5.0)
        peer, _ = srv.accept()
        with conn, peer:
            assert conn.gettimeout() is None
            conn.sendall(b"ping")
            assert peer.recv(4) == b"ping"


def test_a_closed_port_is_refused_clearly() -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
    with pytest.raises(FailedPrecondition, match=f"port {port} of pod sandbox {SID[:12]}.*connection refused"):
        PodDialer().dial(SID, "127.0.0.1", port, 5.0)


def test_no_answer_in_time_is_a_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    # A listener whose backlog is full never completes another handshake.
    def no_answer(address: tuple[str, int], timeout: float) -> socket.socket:
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", no_answer)
    with pytest.raises(DeadlineExceeded, match="no answer within 0.5 s"):
        PodDialer().dial(SID, "10.85.0.9", 80, 0.5)
