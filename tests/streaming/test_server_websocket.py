"""The streaming server over WebSocket, driven by the `kubernetes` Python
client's own stream client (kubernetes.stream.ws_client), with the backend
of local processes (tests/streaming/localbackend.py)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client import Configuration
from kubernetes.stream.ws_client import PortForward, WSClient, create_websocket, get_websocket_url

from agent.domain.streaming import AttachRequest, ExecRequest, PortForwardRequest
from agent.streaming.server import Settings, StreamingServer
from tests.streaming.localbackend import LocalBackend

V5, V4 = "v5.channel.k8s.io", "v4.channel.k8s.io"


def client(url: str, protocol: str | None = None, configuration: Configuration | None = None) -> WSClient:
    headers = {"sec-websocket-protocol": protocol} if protocol else None
    return WSClient(configuration or Configuration(), get_websocket_url(url), headers, capture_all=True)


def finish(ws: WSClient) -> None:
    ws.run_forever(timeout=30)
    assert not ws.is_open(), "the session did not end"


def exec_request(cmd: list[str], **kw: Any) -> ExecRequest:
    opts = {"tty": False, "stdin": False, "stdout": True, "stderr": True, **kw}
    return ExecRequest("c1", tuple(cmd), **opts)


@pytest.mark.parametrize("protocol", [None, V4])  # None: the client offers v5 then v4
def test_exec_stdout_stderr_and_exit_codes(server: StreamingServer, protocol: str | None):
    ws = client(server.url_for(exec_request(["sh", "-c", "echo to-out; echo to-err >&2"])), protocol)
    assert ws.subprotocol == (protocol or V5)
    finish(ws)
    assert (ws.read_stdout(timeout=0), ws.read_stderr(timeout=0)) == ("to-out\n", "to-err\n")
    assert ws.returncode == 0
    ws = client(server.url_for(exec_request(["sh", "-c", "echo bad >&2; exit 42"])), protocol)
    finish(ws)
    assert ws.read_stderr(timeout=0) == "bad\n"
    assert ws.returncode == 42


def test_exec_stdin_ends_with_the_v5_close_signal(server: StreamingServer):
    ws = client(server.url_for(exec_request(["sh", "-c", "cat; echo cat-ended >&2"], stdin=True)))
    assert ws.subprotocol == V5
    ws.write_stdin("line one\nline two\n")
    ws.close_channel(0)
    finish(ws)
    assert ws.read_stdout(timeout=0) == "line one\nline two\n"
    assert ws.read_stderr(timeout=0) == "cat-ended\n"
    assert ws.returncode == 0


def read_until(ws: WSClient, text: str, channel: int = 1) -> str:
    seen = ""
    deadline = time.monotonic() + 30
    while text not in seen:
        assert time.monotonic() < deadline, f"{text!r} never came; got {seen!r}"
        assert ws.is_open(), f"session ended before {text!r}; got {seen!r}"
        ws.update(timeout=1)
        seen += ws.read_channel(channel)
    return seen


def test_exec_tty_interactive_with_resize(server: StreamingServer, backend: LocalBackend):
    ws = client(server.url_for(exec_request(["sh", "-i"], tty=True, stdin=True, stderr=False)))
    ws.write_channel(4, json.dumps({"Width": 100, "Height": 30}))
    ws.write_stdin("stty size; echo $((6*7))\n")
    out = read_until(ws, "42\r\n")
    assert "30 100" in out
    ws.write_channel(4, json.dumps({"Width": 132, "Height": 43}))
    deadline = time.monotonic() + 30
    while (132, 43) not in backend.resizes_seen:
        assert time.monotonic() < deadline, backend.resizes_seen
        time.sleep(0.05)
    ws.write_stdin("stty size\n")
    read_until(ws, "43 132")
    ws.write_stdin("exit 5\n")
    finish(ws)
    assert ws.returncode == 5


def test_attach_reads_and_writes(server: StreamingServer):
    ws = client(server.url_for(AttachRequest("c-attach", tty=False, stdin=True, stdout=True, stderr=True)))
    for word in ("one", "two"):
        ws.write_stdin(word + "\n")
        read_until(ws, f"console got {word}\n")
    ws.close_channel(0)  # leaving
    finish(ws)
    assert ws.returncode == 0


def test_backend_error_reaches_the_client(server: StreamingServer):
    ws = client(server.url_for(AttachRequest("nope", tty=False, stdin=False, stdout=True, stderr=True)))
    finish(ws)
    status = json.loads(ws.read_channel(3))
    assert status["status"] == "Failure"
    assert status["message"] == "container 'nope' not found"


def http_through(sock: Any, path: str) -> str:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: pod\r\n\r\n".encode())
    data = b""
    deadline = time.monotonic() + 30
    while not (b"\r\n\r\n" in data and data.endswith(b"\n") and b"hello" in data):
        assert time.monotonic() < deadline, data
        chunk = sock.recv(4096)
        assert chunk, data
        data += chunk
    return data.split(b"\r\n\r\n", 1)[1].decode()


def test_port_forward_two_ports(server: StreamingServer, pod_http: dict[int, int]):
    url = server.url_for(PortForwardRequest("sb1", ()))
    websocket = create_websocket(Configuration(), get_websocket_url(url, [("ports", "80,8080")]))
    pf = PortForward(websocket, [80, 8080])
    try:
        for port in (80, 8080):
            sock = pf.socket(port)
            sock.settimeout(30)
            for i in range(2):  # two requests on the one connection each port gets
                assert http_through(sock, f"/{i}") == f"hello from {pod_http[port]} path /{i}\n"
        assert pf.error(80) is None and pf.error(8080) is None
    finally:
        pf.close()


def test_port_forward_refused_port_reports_an_error(server: StreamingServer, backend: LocalBackend):
    import socket

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    backend.ports[9] = closed.getsockname()[1]
    try:
        url = server.url_for(PortForwardRequest("sb1", ()))
        websocket = create_websocket(Configuration(), get_websocket_url(url, [("ports", "9")]))
        pf = PortForward(websocket, [9])
        deadline = time.monotonic() + 30
        while pf.error(9) is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert pf.error(9).startswith("error forwarding port 9 to pod sandbox sb1: ")
        pf.close()
    finally:
        closed.close()


def test_used_token_is_refused(server: StreamingServer):
    url = server.url_for(exec_request(["true"]))
    finish(client(url))
    with pytest.raises(Exception, match="404"):
        client(url)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


def test_tls(backend: LocalBackend, tls_files: tuple[str, str], kubeclient: Path, tmp_path: Path):
    cert, key = tls_files
    server = StreamingServer(backend, Settings(tls_cert_file=cert, tls_key_file=key))
    server.start()
    try:
        url = server.url_for(exec_request(["echo", "over tls"]))
        assert url.startswith("https://127.0.0.1:")
        cfg = Configuration()
        cfg.ssl_ca_cert = cert
        ws = client(url, configuration=cfg)
        finish(ws)
        assert ws.read_stdout(timeout=0) == "over tls\n"
        # and SPDY over TLS
        result = tmp_path / "result"
        run = subprocess.run([str(kubeclient), "exec", "-url", server.url_for(exec_request(["echo", "spdy tls"])),
                              "-result", str(result)], capture_output=True, timeout=60)
        assert run.returncode == 0, run.stderr
        assert run.stdout == b"spdy tls\n"
    finally:
        server.stop()


def test_base64_subprotocol(server: StreamingServer):
    import base64

    import websocket

    url = get_websocket_url(server.url_for(exec_request(["sh", "-c", "printf 'a\\377b'; exit 3"])))
    ws = websocket.create_connection(url, subprotocols=["v4.base64.channel.k8s.io"], timeout=30)
    try:
        messages: list[str] = []
        while True:
            op, data = ws.recv_data()
            if op == websocket.ABNF.OPCODE_CLOSE:
                break
            messages.append(data.decode())
    finally:
        ws.close()
    assert messages[0] == "1"  # ready: an empty stdout message
    stdout = b"".join(base64.b64decode(m[1:]) for m in messages if m[0] == "1")
    assert stdout == b"a\xffb"
    [status] = [json.loads(base64.b64decode(m[1:])) for m in messages if m[0] == "3"]
    assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]


@pytest.mark.parametrize("protocol", ["channel.k8s.io", "base64.channel.k8s.io"])
def test_v1_subprotocols_report_errors_as_text(server: StreamingServer, protocol: str):
    import base64

    import websocket

    url = get_websocket_url(server.url_for(exec_request(["sh", "-c", "echo hi; exit 4"])))
    ws = websocket.create_connection(url, subprotocols=[protocol], timeout=30)
    got: dict[int, bytes] = {}
    try:
        while True:
            op, data = ws.recv_data()
            if op == websocket.ABNF.OPCODE_CLOSE:
                break
            if protocol.startswith("base64"):
                channel, payload = int(chr(data[0])), base64.b64decode(data[1:])
            else:
                channel, payload = data[0], data[1:]
            got[channel] = got.get(channel, b"") + payload
    finally:
        ws.close()
    assert got == {1: b"hi\n", 3: b"command terminated with non-zero exit code: exit status 4"}


def test_port_forward_ends_when_the_pod_closes_the_connection(server: StreamingServer, pod_http: dict[int, int]):
    """No half-close in the WebSocket port-forward protocol: the session's
    close is how a client learns that the pod ended the connection."""
    import websocket

    url = get_websocket_url(server.url_for(PortForwardRequest("sb1", (80,))), [("ports", "80")])
    ws = websocket.create_connection(url, subprotocols=[V4], timeout=30)
    try:
        ws.send_binary(b"\x00GET /once HTTP/1.0\r\nHost: pod\r\n\r\n")  # HTTP/1.0: the server closes after
        got: dict[int, bytes] = {}
        while True:
            op, data = ws.recv_data()
            if op == websocket.ABNF.OPCODE_CLOSE:
                break
            got[data[0]] = got.get(data[0], b"") + data[1:]
    finally:
        ws.close()
    assert got[0].startswith(b"\x50\x00HTTP/1.1 200") and got[0].endswith(b"path /once\n")
    assert got[1] == b"\x50\x00"  # the port prefix, no error


def test_podvisorctl_forward_keeps_the_reply_of_a_half_closed_connection(server: StreamingServer,
                                                                       pod_http: dict[int, int]):
    """A local client that shuts its sending side down after its request
    (HTTP/1.0 clients, `nc -N`) still gets the pod's whole reply."""
    import socket
    import threading

    from agent.cli import streams

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()
    errors: list[str] = []
    t = threading.Thread(target=streams.serve_forwards, daemon=True,
                         args=([(listener, 80)], lambda port: server.url_for(PortForwardRequest("sb1", (port,)))),
                         kwargs={"report": errors.append, "stop": stop})
    t.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=30) as c:
            c.sendall(b"GET /half HTTP/1.0\r\nHost: pod\r\n\r\n")
            c.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := c.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"path /half\n"), data
        assert [e for e in errors if e.startswith("error")] == []
    finally:
        stop.set()
        t.join(10)
        listener.close()
