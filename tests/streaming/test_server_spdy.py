"""The streaming server against a Go client on spdystream that speaks what
client-go's SPDY executor and port forwarder speak (tests/streaming/kubeclient),
with a backend of local processes (tests/streaming/localbackend.py)."""

from __future__ import annotations

import http.client
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from agent.domain.streaming import AttachRequest, ExecRequest, PortForwardRequest
from agent.streaming.server import StreamingServer
from agent.streaming.tokens import RequestCache
from tests.streaming.localbackend import LocalBackend

V4, V3, V2, V1 = "v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io"


def exec_url(server: StreamingServer, cmd: list[str], *, tty: bool = False, stdin: bool = False,
             stderr: bool = True) -> str:
    return server.url_for(ExecRequest("c1", tuple(cmd), tty=tty, stdin=stdin, stdout=True, stderr=stderr))


def run_exec(kubeclient: Path, tmp_path: Path, url: str, *flags: str, protocols: str = "",
             stdin: bytes = b"") -> tuple[subprocess.CompletedProcess[bytes], dict[str, str]]:
    result = tmp_path / f"result-{time.monotonic_ns()}"
    args = [str(kubeclient), "exec", "-url", url, "-result", str(result), *flags]
    if protocols:
        args += ["-protocols", protocols]
    run = subprocess.run(args, input=stdin, capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr
    outcome = dict(line.split("=", 1) for line in result.read_text().splitlines())
    return run, outcome


def test_exec_stdout_stderr_exit_zero(kubeclient: Path, server: StreamingServer, tmp_path: Path):
    url = exec_url(server, ["sh", "-c", "echo to-out; echo to-err >&2; printf 'no newline'"])
    run, outcome = run_exec(kubeclient, tmp_path, url)
    assert run.stdout == b"to-out\nno newline"
    assert run.stderr == b"to-err\n"
    assert outcome == {"protocol": V4, "exit": "0"}


def test_exec_non_zero_exit_code_through_the_v4_status(kubeclient: Path, server: StreamingServer, tmp_path: Path):
    url = exec_url(server, ["sh", "-c", "echo failing >&2; exit 42"])
    run, outcome = run_exec(kubeclient, tmp_path, url)
    assert run.stderr == b"failing\n"
    assert outcome == {"protocol": V4, "exit": "42"}


def test_exec_stdin_to_the_end(kubeclient: Path, server: StreamingServer, tmp_path: Path):
    payload = bytes(range(256)) * 1000  # beyond every window, binary
    url = exec_url(server, ["sh", "-c", "cat; echo done >&2"], stdin=True)
    run, outcome = run_exec(kubeclient, tmp_path, url, "-stdin", stdin=payload)
    assert run.stdout == payload
    assert run.stderr == b"done\n"
    assert outcome["exit"] == "0"


def test_exec_backend_failure_is_a_status_message(kubeclient: Path, server: StreamingServer, tmp_path: Path):
    url = exec_url(server, ["/nonexistent/program"])
    url = server.url_for(AttachRequest("no-such-container", tty=False, stdin=False, stdout=True, stderr=True))
    _, outcome = run_exec(kubeclient, tmp_path, url)
    assert outcome["exit"] == "-1"
    assert outcome["error"] == "container 'no-such-container' not found"


@pytest.mark.parametrize("protocol", [V4, V3, V2, V1])
def test_each_protocol_version(kubeclient: Path, server: StreamingServer, tmp_path: Path, protocol: str):
    url = exec_url(server, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    run, outcome = run_exec(kubeclient, tmp_path, url, protocols=protocol)
    assert (run.stdout, run.stderr) == (b"out\n", b"err\n")
    assert outcome["protocol"] == protocol
    if protocol == V4:
        assert outcome == {"protocol": V4, "exit": "3"}
    else:  # plain text on the error stream, as client-go reads it for v1..v3
        assert outcome["exit"] == "-1"
        assert outcome["error"] == "command terminated with non-zero exit code: exit status 3"


def test_exec_tty_interactive_shell_with_resizes(kubeclient: Path, server: StreamingServer, tmp_path: Path,
                                                 backend: LocalBackend):
    url = exec_url(server, ["sh", "-i"], tty=True, stdin=True, stderr=False)
    result = tmp_path / "result"
    proc = subprocess.Popen([str(kubeclient), "exec", "-url", url, "-result", str(result), "-stdin", "-tty",
                             "-size", "100x30", "-size2", "132x43"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    seen = bytearray()

    def expect(text: bytes) -> None:
        deadline = time.monotonic() + 30
        while text not in seen:
            assert time.monotonic() < deadline, f"{text!r} never came; got {bytes(seen)!r}"
            chunk = proc.stdout.read1(4096)  # type: ignore[union-attr]
            assert chunk, f"output ended before {text!r}; got {bytes(seen)!r}"
            seen.extend(chunk)

    try:
        proc.stdin.write(b"stty size; echo $((6*7))\n")
        proc.stdin.flush()
        expect(b"30 100")
        expect(b"42")
        proc.send_signal(signal.SIGUSR1)  # the client sends the second size
        deadline = time.monotonic() + 30
        while (132, 43) not in backend.resizes_seen:
            assert time.monotonic() < deadline, backend.resizes_seen
            time.sleep(0.05)
        proc.stdin.write(b"stty size\n")
        proc.stdin.flush()
        expect(b"43 132")
        proc.stdin.write(b"exit 7\n")
        proc.stdin.flush()
        proc.stdin.close()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    outcome = dict(line.split("=", 1) for line in result.read_text().splitlines())
    assert outcome == {"protocol": V4, "exit": "7"}


def read_until(proc: subprocess.Popen[bytes], seen: bytearray, text: bytes) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while text not in seen:
        assert time.monotonic() < deadline, f"{text!r} never came; got {bytes(seen)!r}"
        chunk = proc.stdout.read1(4096)  # type: ignore[attr-defined]
        assert chunk, f"output ended before {text!r}; got {bytes(seen)!r}"
        seen.extend(chunk)


def test_attach_reads_and_writes_the_console(kubeclient: Path, server: StreamingServer, tmp_path: Path):
    url = server.url_for(AttachRequest("c-attach", tty=False, stdin=True, stdout=True, stderr=True))
    result = tmp_path / "result"
    proc = subprocess.Popen([str(kubeclient), "exec", "-url", url, "-result", str(result), "-stdin"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    seen = bytearray()
    try:
        for word in (b"one", b"two"):
            proc.stdin.write(word + b"\n")
            proc.stdin.flush()
            read_until(proc, seen, b"console got " + word + b"\n")
        proc.stdin.close()  # leaving: the attach ends, the console goes on
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    outcome = dict(line.split("=", 1) for line in result.read_text().splitlines())
    assert outcome == {"protocol": V4, "exit": "0"}
    # a second client attaches to the same, still running console
    url = server.url_for(AttachRequest("c-attach", tty=False, stdin=True, stdout=True, stderr=True))
    proc = subprocess.Popen([str(kubeclient), "exec", "-url", url, "-result", str(result), "-stdin"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    seen.clear()
    try:
        proc.stdin.write(b"three\n")
        proc.stdin.flush()
        read_until(proc, seen, b"console got three\n")
        proc.stdin.close()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_five_execs_at_once(kubeclient: Path, server: StreamingServer, tmp_path: Path):
    def one(i: int) -> tuple[bytes, dict[str, str]]:
        url = exec_url(server, ["sh", "-c", f"sleep 1; echo exec {i}; exit {i}"])
        run, outcome = run_exec(kubeclient, tmp_path, url)
        return run.stdout, outcome

    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(one, range(5)))
    assert results == [(f"exec {i}\n".encode(), {"protocol": V4, "exit": str(i)}) for i in range(5)]


def upgrade(kubeclient: Path, url: str, protocols: str) -> list[str]:
    run = subprocess.run([str(kubeclient), "upgrade", "-url", url, "-protocols", protocols],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout.splitlines()


def test_token_is_single_use(kubeclient: Path, server: StreamingServer, tmp_path: Path):
    url = exec_url(server, ["true"])
    _, outcome = run_exec(kubeclient, tmp_path, url)
    assert outcome["exit"] == "0"
    assert upgrade(kubeclient, url, V4)[0] == "status=404 protocol= accepted="


def test_unknown_token_and_path_are_404(kubeclient: Path, server: StreamingServer):
    assert upgrade(kubeclient, f"{server.base_url}/exec/AAAAAAAA", V4)[0] == "status=404 protocol= accepted="
    url = exec_url(server, ["true"])
    token = url.rsplit("/", 1)[1]
    # an exec token is not a port-forward token (and is used up by trying)
    assert upgrade(kubeclient, f"{server.base_url}/portforward/{token}", "portforward.k8s.io")[0].startswith(
        "status=404")
    assert upgrade(kubeclient, f"{server.base_url}/other/{token}", V4)[0].startswith("status=404")


def test_expired_token_is_404(kubeclient: Path, backend: LocalBackend):
    now = [1000.0]
    server = StreamingServer(backend, cache=RequestCache(clock=lambda: now[0]))
    server.start()
    try:
        url = exec_url(server, ["true"])
        now[0] += 61
        assert upgrade(kubeclient, url, V4)[0] == "status=404 protocol= accepted="
    finally:
        server.stop()


def test_negotiation(kubeclient: Path, server: StreamingServer):
    # client-go offers v5 first; the SPDY server does not serve it and picks v4
    assert upgrade(kubeclient, exec_url(server, ["true"]), f"v5.channel.k8s.io,{V4},{V3}")[0] == (
        f"status=101 protocol={V4} accepted=")
    lines = upgrade(kubeclient, exec_url(server, ["true"]), "v9.channel.k8s.io")
    assert lines[0] == f"status=403 protocol= accepted={V4},{V3},{V2},{V1}"
    assert upgrade(kubeclient, exec_url(server, ["true"]), "")[0] == "status=400 protocol= accepted="


def test_port_forward_two_ports_several_connections(kubeclient: Path, server: StreamingServer,
                                                    pod_http: dict[int, int]):
    url = server.url_for(PortForwardRequest("sb1", ()))
    proc = subprocess.Popen([str(kubeclient), "portforward", "-url", url, "80", "8080"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        local: dict[int, int] = {}
        while (line := proc.stdout.readline().strip()) != "ready":
            assert line.startswith("forwarding"), line + proc.stderr.read()  # type: ignore[union-attr]
            _, lport, _, rport = line.split()
            local[int(rport)] = int(lport)

        def get(pod_port: int, path: str) -> str:
            conn = http.client.HTTPConnection("127.0.0.1", local[pod_port], timeout=30)
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                assert resp.status == 200
                body = resp.read().decode()
                conn.request("GET", path + "/again")  # keep-alive: a second request on the connection
                return body + conn.getresponse().read().decode()
            finally:
                conn.close()

        jobs = [(p, f"/{p}/{i}") for i in range(4) for p in (80, 8080)]
        with ThreadPoolExecutor(4) as pool:
            bodies = list(pool.map(lambda j: get(*j), jobs))
        assert bodies == [f"hello from {pod_http[p]} path {path}\nhello from {pod_http[p]} path {path}/again\n"
                          for p, path in jobs]
        out, err = proc.communicate(b"" if False else "", timeout=30)
        assert proc.returncode == 0, err
        assert out.splitlines() == ["done"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_port_forward_connection_error_on_the_error_stream(kubeclient: Path, server: StreamingServer,
                                                          backend: LocalBackend):
    import socket

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    backend.ports[9] = closed.getsockname()[1]  # bound, not listening: refused
    url = server.url_for(PortForwardRequest("sb1", ()))
    proc = subprocess.Popen([str(kubeclient), "portforward", "-url", url, "9"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        lport = int(proc.stdout.readline().split()[1])
        assert proc.stdout.readline().strip() == "ready"
        with socket.create_connection(("127.0.0.1", lport), timeout=30) as c:
            assert c.recv(100) == b""  # the client gives up on the connection
        line = proc.stdout.readline().strip()
        assert line.startswith("error port=9: error forwarding port 9 to pod sandbox sb1: "), line
        assert "refused" in line
    finally:
        closed.close()
        proc.kill()
        proc.wait()
