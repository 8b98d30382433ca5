"""Fixtures for the streaming server's tests: the server on 127.0.0.1 with a
backend of local processes, the Go client (spdystream, as client-go) and
local HTTP servers standing for a pod's ports."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.streaming.server import Settings, StreamingServer
from tests.streaming.gobuild import go_build
from tests.streaming.localbackend import Console, LocalBackend


@pytest.fixture(scope="session")
def kubeclient(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return go_build(Path(__file__).parent / "kubeclient", tmp_path_factory.mktemp("go") / "kubeclient")


class _Hello(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        body = f"hello from {self.server.server_address[1]} path {self.path}\n".encode()  # type: ignore[index]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def pod_http() -> Iterator[dict[int, int]]:
    """Two local HTTP servers standing for the pod's ports 80 and 8080: {pod port: local port}."""
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello) for _ in range(2)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    yield {80: servers[0].server_address[1], 8080: servers[1].server_address[1]}
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.fixture
def backend(pod_http: dict[int, int]) -> Iterator[LocalBackend]:
    b = LocalBackend(ports=dict(pod_http))
    # the "console" of container c-attach: answers every line it reads
    b.consoles["c-attach"] = Console(["sh", "-c", 'echo console ready; while read l; do echo "console got $l"; done'])
    yield b
    b.close()


@pytest.fixture
def server(backend: LocalBackend) -> Iterator[StreamingServer]:
    s = StreamingServer(backend, Settings(idle_timeout_seconds=60, max_sessions=16))
    s.start()
    yield s
    s.stop()
