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
from tests.integration.registry_fixture import RunningRegistry
from tests.integration.test_sandbox_lifecycle import run, sandbox_config
from tests.integration.vmpod import create_pod, purge_domain, push_empty_disk_image, remove_pod
from tests.streaming.gobuild import go_build


@pytest.fixture(scope="module")
def kubeclient(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return go_build(Path(__file__).parent.parent / "streaming" / "kubeclient",
                    tmp_path_factory.mktemp("go") / "kubeclient")


@pytest.fixture
def agent(agent_factory: Any) -> AgentProcess:
    a: AgentProcess = agent_factory(extra_config=('[streaming]\naddress = "127.0.0.1"\nport = 0\nmax_sessions = 4\n'
                                                    '[exec]\nguest_ready_timeout_seconds = 3\n'))
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
    # the session is served; the connection reports why this pod cannot be reached
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
        if not line:
            proc.kill()
            raise AssertionError(f"the client ended without a line: {proc.stderr.read() if proc.stderr else ''}")
        assert line == (f"error port=80: error forwarding port 80 to pod sandbox {sandbox_id}: "
                        f"pod sandbox {sandbox_id} has no pod IP (pod networking is off: [cni] enabled = false), "
                        "so its VM has no address to connect to")
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


def test_exec_and_attach_on_a_real_vm_container(agent: AgentProcess, registry: RunningRegistry, kubeclient: Path,
                                                tmp_path: Path) -> None:
    """One VM (an empty disk: firmware only) for the container states; the
    session behind the URL reports what the not-yet-wired backend says."""
    image = push_empty_disk_image(registry, tmp_path)
    pod = create_pod(agent, image, tmp_path / "logs")
    rt = agent.runtime
    try:
        exec_req = pb.ExecRequest(container_id=pod.container_id, cmd=["id"], stdout=True, stderr=True)
        code, msg = code_of(rt.Exec, exec_req)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "is not running (state created)" in msg
        rt.StartContainer(pb.StartContainerRequest(container_id=pod.container_id), timeout=120)
        url = rt.Exec(exec_req, timeout=10).url
        parts = urllib.parse.urlsplit(url)
        assert (parts.scheme, parts.hostname) == ("http", "127.0.0.1")
        assert parts.path.startswith("/exec/")
        result = tmp_path / "result"
        done = subprocess.run([str(kubeclient), "exec", "-url", url, "-result", str(result)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        outcome = dict(line.split("=", 1) for line in result.read_text().splitlines())
        # No guest agent answers in a firmware-only VM: the wait ([exec] 3 s here) ends with what the
        # guest needs.
        assert outcome["protocol"] == "v4.channel.k8s.io" and outcome["exit"] == "-1"
        assert outcome["error"].startswith(f"the guest agent of podvisor-{pod.container_id} never answered")
        again = subprocess.run([str(kubeclient), "upgrade", "-url", url], capture_output=True, text=True,
                               timeout=60)
        assert again.stdout.splitlines()[0] == "status=404 protocol= accepted="
        url = rt.Attach(pb.AttachRequest(container_id=pod.container_id[:12], stdin=True, stdout=True,
                                         tty=True), timeout=10).url
        assert urllib.parse.urlsplit(url).path.startswith("/attach/")
        remove_pod(agent, pod)
        code, _ = code_of(rt.Exec, exec_req)
        assert code == grpc.StatusCode.NOT_FOUND
    finally:
        purge_domain(pod)
