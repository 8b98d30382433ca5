"""podvisorctl over the mTLS endpoint against a real tiny guest under TCG:
port-forward and attach go through the HTTPS streaming server of the mTLS
endpoint (URLs from calls made over it), with the client certificate.

One tiny VM on a private pod network for the module, on an agent with
[mtls] on 127.0.0.1; its HTTP server on port 80 answers with the hostname.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.api.gen.runtime.v1 import api_pb2 as pb
from tests.e2e.conftest import VM, VMAgent, purge_domains
from tests.e2e.streamclients import Proc, ctl_env, http_get_local, wait_tcp
from tests.e2e.test_streaming_e2e_tiny import type_until
from tests.integration.agentproc import AgentProcess
from tests.integration.test_sandbox_network import remove_all_pod_networks
from tests.mtls.certfiles import Generation, generation

pytestmark = pytest.mark.e2e
HOSTNAME = "mtls-vm"
POD_NAME, NAMESPACE = "io", "e2e"


@dataclass
class MTLSPod:
    vma: VMAgent
    vm: VM
    gen: Generation
    client: tuple[str, str]
    port: int

    def ctl(self, *args: str) -> list[str]:
        import sys

        cert, key = self.client
        return [sys.executable, "-m", "agent.cli.main", "--endpoint", f"tcp://localhost:{self.port}",
                "--cert", cert, "--key", key, "--ca", self.gen.path("ca.crt"), "--timeout", "60", *args]


def listen_port(agent: AgentProcess, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in agent.log().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "mTLS endpoint listening":
                return int(event["address"].rsplit(":", 1)[1])
        time.sleep(0.1)
    raise AssertionError(f"the mTLS endpoint did not start:\n{agent.log()[-3000:]}")


@pytest.fixture(scope="module")
def pod(tiny_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MTLSPod]:
    work = tmp_path_factory.mktemp("mtls-io")
    gen = generation(work / "tls")
    client = gen.client("shim")
    state = Path(tempfile.mkdtemp(prefix="pv-e2e-mtls-", dir="/var/tmp"))
    state.chmod(0o711)
    suffix = secrets.token_hex(3)
    bridge, subnet = f"pvm{suffix}", f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}.0/24"
    conf = work / "net.d"
    conf.mkdir()
    (conf / "10-e2e.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": f"e2e-{suffix}",
        "plugins": [{"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False, "hairpinMode": True,
                     "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                              "dataDir": str(work / "ipam"), "routes": [{"dst": "0.0.0.0/0"}]}}]}))
    agent = AgentProcess(work, state_dir=state / "state", cni_conf_dir=conf, network=True, extra_config=(
        f'[mtls]\nlisten = "127.0.0.1:0"\ncert_file = "{gen.path("server.crt")}"\n'
        f'key_file = "{gen.path("server.key")}"\nclient_ca_file = "{gen.path("ca.crt")}"\n'
        'allowed_clients = ["dns:shim"]\n'))
    agent.config_path.write_text(agent.config_path.read_text().replace(
        "[libvirt]\n", '[libvirt]\nvirt_type = "qemu"\n'))
    vma = VMAgent(agent, tiny_image, work / "pods")
    try:
        agent.start()
        port = listen_port(agent)
        vm = vma.create(POD_NAME, hostname=HOSTNAME)
        vma.start(vm)
        ip = vma.agent.runtime.PodSandboxStatus(
            pb.PodSandboxStatusRequest(pod_sandbox_id=vm.sandbox_id), timeout=30).status.network.ip
        vma.wait_log(vm, "PODVISOR-READY", timeout=240)
        vma.wait_log(vm, f"ip={ip}", timeout=240)
        wait_tcp(ip, 80)
        yield MTLSPod(vma, vm, gen, client, port)
    finally:
        try:
            for sb in agent.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items:
                vma.remove_pod(VM(sb.id, "", Path()))
        except Exception:  # noqa: BLE001 - virsh and ip clean below
            pass
        purge_domains(agent.state_dir)
        remove_all_pod_networks(agent)
        agent.cleanup()
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        shutil.rmtree(state, ignore_errors=True)


def test_port_forward_over_mtls(pod: MTLSPod) -> None:
    client = Proc(pod.ctl("port-forward", "-n", NAMESPACE, POD_NAME, "0:80"), env=ctl_env())
    try:
        words = client.line().split()
        assert words[:2] == ["Forwarding", "from"] and words[-2:] == ["->", "80"], words
        lport = int(words[2].rsplit(":", 1)[1])
        for _ in range(2):
            reply = http_get_local(lport, HOSTNAME)
            assert reply.rstrip().splitlines()[-1] == HOSTNAME
    finally:
        client.stop()
    # those sessions went through the HTTPS streaming server of the mTLS endpoint
    log = pod.vma.agent.log()
    assert "TLS client refused" not in log


def test_attach_over_mtls(pod: MTLSPod) -> None:
    client = Proc(pod.ctl("attach", "-i", "-n", NAMESPACE, POD_NAME), env=ctl_env())
    try:
        type_until(client, "\necho PV-MTLS-$((6*7))\n", "PV-MTLS-42")
    finally:
        client.stop()


def test_urls_over_mtls_are_https(pod: MTLSPod) -> None:
    import grpc

    from agent.api.gen.runtime.v1 import api_pb2_grpc

    cert, key = pod.client
    creds = grpc.ssl_channel_credentials(Path(pod.gen.path("ca.crt")).read_bytes(), Path(key).read_bytes(),
                                         Path(cert).read_bytes())
    with grpc.secure_channel(f"localhost:{pod.port}", creds) as ch:
        url = api_pb2_grpc.RuntimeServiceStub(ch).Attach(pb.AttachRequest(
            container_id=pod.vm.container_id, stdin=True, stdout=True), timeout=30).url
    assert urllib.parse.urlsplit(url).scheme == "https"
    local = pod.vma.agent.runtime.Attach(pb.AttachRequest(
        container_id=pod.vm.container_id, stdin=True, stdout=True), timeout=30).url
    assert urllib.parse.urlsplit(local).scheme == "http"
