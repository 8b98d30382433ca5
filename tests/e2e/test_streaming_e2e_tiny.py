"""Attach and PortForward end to end on the tiny guest under TCG: the real
agent's CRI Attach/PortForward give URLs, and real clients use them: the Go
client (SPDY, as client-go), the ``kubernetes`` Python client's WebSocket
stream client and podvisorctl (subprocesses on the agent's socket).

One tiny VM on a private pod network for the module (the fixture of
test_vm_attach_port_forward.py); its console offers a shell after Enter and
its HTTP server on port 80 answers with the hostname.
"""

from __future__ import annotations

import secrets
import urllib.parse
from pathlib import Path

import pytest
from kubernetes.client import Configuration
from kubernetes.stream.ws_client import PortForward, create_websocket, get_websocket_url

from agent.api.gen.runtime.v1 import api_pb2 as pb
from tests.e2e.streamclients import (
    Proc,
    build_kubeclient,
    ctl_argv,
    ctl_env,
    http_get_local,
    wait_tcp,
    ws_client,
    ws_read_until,
)
from tests.e2e.test_vm_attach_port_forward import HOSTNAME, Pod, pod  # noqa: F401

pytestmark = pytest.mark.e2e
POD_NAME, NAMESPACE = "io", "e2e"  # the fixture's pod


@pytest.fixture(scope="module")
def kubeclient(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_kubeclient(tmp_path_factory.mktemp("go"))


@pytest.fixture(scope="module")
def ready(pod: Pod) -> Pod:  # noqa: F811
    """The pod, once its guest's HTTP server accepts."""
    wait_tcp(pod.ip, 80)
    return pod


def attach_url(p: Pod) -> str:
    return str(p.vma.agent.runtime.Attach(pb.AttachRequest(
        container_id=p.vm.container_id, stdin=True, stdout=True), timeout=30).url)


def port_forward_url(p: Pod, port: int = 80) -> str:
    return str(p.vma.agent.runtime.PortForward(pb.PortForwardRequest(
        pod_sandbox_id=p.vm.sandbox_id, port=[port]), timeout=30).url)


def type_until(client: Proc, line: str, marker: str, tries: int = 24) -> str:
    """Types ``line`` until ``marker`` (computed by the guest's shell) is seen:
    busybox offers its console shell after Enter."""
    for _ in range(tries):
        client.type(line)
        try:
            return client.wait_for(marker, timeout=5)
        except AssertionError:
            continue
    return client.wait_for(marker, timeout=5)


# -- the Go client (SPDY) ------------------------------------------------------------


def test_attach_with_the_go_client_reads_and_writes_the_console(ready: Pod, kubeclient: Path,
                                                               tmp_path: Path) -> None:
    client = Proc([str(kubeclient), "exec", "-url", attach_url(ready), "-stdin", "-stderr=false",
                   "-result", str(tmp_path / "result")])
    try:
        type_until(client, "\necho PV-GO-$((6*7))\n", "PV-GO-42")
        client.type("echo PV-GO-AGAIN-$((2+3))\n")
        client.wait_for("PV-GO-AGAIN-5")
        # what the attached client made the guest print reached the container log too
        ready.vma.wait_log(ready.vm, "PV-GO-AGAIN-5", timeout=60)
    finally:
        client.stop()


def test_port_forward_with_the_go_client(ready: Pod, kubeclient: Path) -> None:
    client = Proc([str(kubeclient), "portforward", "-url", port_forward_url(ready), "80"])
    try:
        words = client.line().split()
        assert words[0] == "forwarding" and words[-1] == "80", words
        assert client.line() == "ready"
        for _ in range(2):  # two connections through the one session
            reply = http_get_local(int(words[1]), HOSTNAME)
            assert reply.rstrip().splitlines()[-1] == HOSTNAME
        client.close_stdin()
        rc, out, err = client.finish()
        assert rc == 0, err
        assert "error port=" not in out, out
    finally:
        client.stop()


def test_port_forward_to_a_closed_port_reports_the_error(ready: Pod, kubeclient: Path) -> None:
    client = Proc([str(kubeclient), "portforward", "-url", port_forward_url(ready, 81), "81"])
    try:
        lport = int(client.line().split()[1])
        assert client.line() == "ready"
        import socket

        with socket.create_connection(("127.0.0.1", lport), timeout=60) as c:
            c.settimeout(60)
            assert c.recv(100) == b""
        line = client.line()
        assert line.startswith(f"error port=81: error forwarding port 81 to pod sandbox {ready.vm.sandbox_id}: ")
        assert "connection refused" in line, line
    finally:
        client.stop()


def test_used_and_unknown_tokens_get_404(ready: Pod, kubeclient: Path, tmp_path: Path) -> None:
    import subprocess

    url = port_forward_url(ready)
    first = subprocess.run([str(kubeclient), "upgrade", "-url", url, "-protocols", "portforward.k8s.io"],
                           capture_output=True, text=True, timeout=60)
    assert first.stdout.splitlines()[0].startswith("status=101 protocol=portforward.k8s.io "), first
    again = subprocess.run([str(kubeclient), "upgrade", "-url", url, "-protocols", "portforward.k8s.io"],
                           capture_output=True, text=True, timeout=60)
    assert again.stdout.splitlines()[0] == "status=404 protocol= accepted=", again
    parts = urllib.parse.urlsplit(attach_url(ready))
    forged = urllib.parse.urlunsplit(parts._replace(path=parts.path.rsplit("/", 1)[0] + "/" + secrets.token_hex(4)))
    unknown = subprocess.run([str(kubeclient), "upgrade", "-url", forged], capture_output=True, text=True,
                             timeout=60)
    assert unknown.stdout.splitlines()[0] == "status=404 protocol= accepted=", unknown


# -- the kubernetes Python client (WebSocket) ------------------------------------------


def test_attach_over_websocket(ready: Pod) -> None:
    ws = ws_client(attach_url(ready))
    try:
        assert ws.subprotocol in ("v5.channel.k8s.io", "v4.channel.k8s.io")
        ws_read_until(ws, "PV-WS-56", retype="\necho PV-WS-$((7*8))\n")
        ws.write_stdin("echo PV-WS-AGAIN-$((1+2))\n")
        ws_read_until(ws, "PV-WS-AGAIN-3")
    finally:
        ws.close()


def test_port_forward_over_websocket(ready: Pod) -> None:
    url = port_forward_url(ready)
    websocket = create_websocket(Configuration(), get_websocket_url(url, [("ports", "80")]))
    pf = PortForward(websocket, [80])
    try:
        sock = pf.socket(80)
        sock.settimeout(60)
        sock.sendall(b"GET / HTTP/1.0\r\nHost: pod\r\n\r\n")
        data = b""
        while not data.rstrip().endswith(HOSTNAME.encode()):
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        assert data.startswith(b"HTTP/1."), data
        assert pf.error(80) is None
    finally:
        pf.close()


# -- podvisorctl -------------------------------------------------------------------------


@pytest.mark.parametrize("by", ["name", "id-prefix"])
def test_podvisorctl_port_forward(ready: Pod, by: str) -> None:
    ref = POD_NAME if by == "name" else ready.vm.sandbox_id[:12]
    client = Proc(ctl_argv(ready.vma.agent.socket, "port-forward", "-n", NAMESPACE, ref, "0:80"), env=ctl_env())
    try:
        words = client.line().split()
        assert words[:2] == ["Forwarding", "from"] and words[-2:] == ["->", "80"], words
        lport = int(words[2].rsplit(":", 1)[1])
        for _ in range(2):
            reply = http_get_local(lport, HOSTNAME)
            assert reply.rstrip().splitlines()[-1] == HOSTNAME
    finally:
        client.stop()


@pytest.mark.parametrize("by", ["name", "id-prefix"])
def test_podvisorctl_attach(ready: Pod, by: str) -> None:
    ref = POD_NAME if by == "name" else ready.vm.sandbox_id[:12]
    client = Proc(ctl_argv(ready.vma.agent.socket, "attach", "-i", "-n", NAMESPACE, ref), env=ctl_env())
    try:
        marker = f"PV-CTL-{by}-"
        type_until(client, f"\necho {marker}$((3*3))\n", f"{marker}9")
    finally:
        client.stop()
