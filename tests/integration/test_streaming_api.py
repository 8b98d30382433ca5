"""Exec, Attach and PortForward through a real agent process: requests are
checked before a URL is issued, the URL points at the configured streaming
server, and its token works once. (Streams into a VM come with the runtime's
backends; until then the session reports that on its error stream.)"""

from __future__ import annotations

import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.api.gen.runtime.v1 import api_pb2 as pb
from tests.integration.agentproc import AgentProcess
from tests.integration.test_sandbox_lifecycle import run, sandbox_config
from tests.streaming.gobuild import go_build


@pytest.fixture(scope="module")
def kubeclient(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return go_build(Path(__file__).parent.parent / "streaming" / "kubeclient",
                    tmp_path_factory.mktemp("go") / "kubeclient")


@pytest.fixture
def agent(agent_factory: Any) -> AgentProcess:
    a: AgentProcess = agent_factory(extra_config='[streaming]\naddress = "127.0.0.1"\nport = 0\nmax_sessions = 4\n')
    return a.start()


def code_of(fn: Any, request: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        fn(request, timeout=10)
    return err.value.code(), err.value.details() or ""


def test_bad_requests_are_refused_before_a_url(agent: AgentProcess) -> None:
    rt = agent.runtime
    code, msg = code_of(rt.Exec, pb.ExecRequest(container_id="0" * 64, cmd=["true"], stdout=True))
    assert code == grpc.StatusCode.NOT_FOUND and "0" * 64 in msg
    code, msg = code_of(rt.Attach, pb.AttachRequest(container_id="0" * 64, stdout=True))
    assert code == grpc.StatusCode.NOT_FOUND
    code, msg = code_of(rt.Exec, pb.ExecRequest(container_id="0" * 64, cmd=[], stdout=True))
    assert (code, msg) == (grpc.StatusCode.INVALID_ARGUMENT, "cmd: must not be empty")
    code, msg = code_of(rt.Exec, pb.ExecRequest(container_id="0" * 64, cmd=["sh"], tty=True, stdout=True,
                                                 stderr=True))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("stderr: tty and stderr")
    code, msg = code_of(rt.Exec, pb.ExecRequest(container_id="0" * 64, cmd=["sh"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("stdin: one of stdin, stdout and stderr")
    code, msg = code_of(rt.PortForward, pb.PortForwardRequest(pod_sandbox_id="0" * 64, port=[80]))
    assert code == grpc.StatusCode.NOT_FOUND
    code, msg = code_of(rt.PortForward, pb.PortForwardRequest(pod_sandbox_id="0" * 64, port=[0]))
    assert (code, msg) == (grpc.StatusCode.INVALID_ARGUMENT, "port[0]: 0 is not a TCP port (1 to 65535)")


def test_port_forward_url_works_once(agent: AgentProcess, kubeclient: Path) -> None:
    sandbox_id = run(agent, sandbox_config("stream-pf"))
    url = agent.runtime.PortForward(pb.PortForwardRequest(pod_sandbox_id=sandbox_id, port=[80]), timeout=10).url
    parts = urllib.parse.urlsplit(url)
    assert parts.scheme == "http" and parts.hostname == "127.0.0.1" and parts.port
    assert parts.path.startswith("/portforward/") and len(parts.path.rsplit("/", 1)[1]) == 8
    # the session is served; the connection reports that forwarding into VMs is not there yet
    proc = subprocess.Popen([str(kubeclient), "portforward", "-url", url, "80"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        lport = int(proc.stdout.readline().split()[1])
        assert proc.stdout.readline().strip() == "ready"
        import socket

        with socket.create_connection(("127.0.0.1", lport), timeout=30) as c:
            assert c.recv(100) == b""
        line = proc.stdout.readline().strip()
        assert line == (f"error port=80: error forwarding port 80 to pod sandbox {sandbox_id}: "
                        "port forwarding into VMs is not available yet")
    finally:
        proc.kill()
        proc.wait()
    again = subprocess.run([str(kubeclient), "upgrade", "-url", url, "-protocols", "portforward.k8s.io"],
                           capture_output=True, text=True, timeout=60)
    assert again.stdout.splitlines()[0] == "status=404 protocol= accepted="
    # a stopped sandbox gets no URL
    agent.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=30)
    code, msg = code_of(agent.runtime.PortForward, pb.PortForwardRequest(pod_sandbox_id=sandbox_id, port=[80]))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "not ready" in msg


def test_streaming_settings_are_checked_at_start(agent_factory: Any) -> None:
    a: AgentProcess = agent_factory(extra_config='[streaming]\ntls_cert_file = "/etc/x.pem"\n')
    a.start(wait=False)
    assert a.wait(30) != 0
    assert "tls_cert_file, tls_key_file: set both (HTTPS) or neither (HTTP)" in a.log()
