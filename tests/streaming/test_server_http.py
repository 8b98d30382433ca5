"""The streaming server's HTTP edge: methods, missing upgrades, the session
bound, and stopping with sessions open."""

from __future__ import annotations

import http.client
import subprocess
from pathlib import Path

from agent.domain.streaming import ExecRequest
from agent.streaming.server import Settings, StreamingServer
from tests.streaming.localbackend import LocalBackend


def request(server: StreamingServer, method: str, path: str, headers: dict[str, str] | None = None,
            ) -> tuple[int, str, http.client.HTTPResponse]:
    host, port = server.base_url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request(method, path, headers=headers or {})
    resp = conn.getresponse()
    body = resp.read().decode()
    conn.close()
    return resp.status, body, resp


def exec_request(cmd: list[str]) -> ExecRequest:
    return ExecRequest("c1", tuple(cmd), tty=False, stdin=False, stdout=True, stderr=True)


def test_methods_paths_and_upgrades(server: StreamingServer):
    path = server.url_for(exec_request(["true"])).removeprefix(server.base_url)
    status, _, resp = request(server, "PUT", path)
    assert (status, resp.getheader("Allow")) == (405, "GET, POST")
    # without an upgrade the token is not even looked at
    status, body, _ = request(server, "GET", path)
    assert (status, body) == (400, "unable to upgrade: missing upgrade headers in request\n")
    status, _, _ = request(server, "GET", "/exec")
    assert status == 404
    status, _, _ = request(server, "GET", "/exec/a/b")
    assert status == 404
    spdy = {"Connection": "Upgrade", "Upgrade": "SPDY/3.1", "X-Stream-Protocol-Version": "v9"}
    status, _, resp = request(server, "POST", path, spdy)
    assert status == 403
    assert resp.getheader("X-Accepted-Stream-Protocol-Versions") is not None
    status, _, _ = request(server, "POST", path, spdy)  # the token went with the first try
    assert status == 404


def test_sessions_beyond_the_bound_get_429_and_stop_ends_open_ones(kubeclient: Path, backend: LocalBackend,
                                                                     tmp_path: Path):
    server = StreamingServer(backend, Settings(max_sessions=2))
    server.start()
    procs = []
    try:
        for i in range(2):
            url = server.url_for(exec_request(["sh", "-c", f"echo started {i}; sleep 120"]))
            p = subprocess.Popen([str(kubeclient), "exec", "-url", url, "-result", str(tmp_path / f"r{i}")],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            procs.append(p)
            assert p.stdout is not None
            assert p.stdout.readline() == f"started {i}\n".encode()
        assert server.active_sessions() == 2
        url = server.url_for(exec_request(["true"]))
        run = subprocess.run([str(kubeclient), "upgrade", "-url", url, "-protocols", "v4.channel.k8s.io"],
                             capture_output=True, text=True, timeout=60)
        assert run.stdout.splitlines()[0] == "status=429 protocol= accepted="
        server.stop(timeout=1)
        for p in procs:  # the clients see their sessions end
            p.wait(30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        server.stop(timeout=1)


def test_garbage_is_a_400(server: StreamingServer):
    import socket

    host, port = server.base_url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 ")
