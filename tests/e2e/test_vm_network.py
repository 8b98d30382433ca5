"""A VM pod on a real CNI network: the VM owns the pod IP, answers HTTP on it
and through a hostPort, and teardown leaves nothing behind.

Only this test's own bridge, subnet, namespaces and VMs are touched: the CNI
configuration is private to the test (its own bridge name and a /24), and the
bridge is deleted at the end.
"""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.api.gen.runtime.v1 import api_pb2 as pb
from tests.e2e.conftest import VM, VMAgent, purge_domains
from tests.integration.agentproc import AgentProcess
from tests.integration.test_sandbox_network import remove_all_pod_networks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def netns_list() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def iptables() -> str:
    return subprocess.run(["iptables-save"], capture_output=True, text=True).stdout


def dnsmasq_of(sandbox_id: str) -> list[str]:
    """The DHCP server processes serving that sandbox (its directory is in their command line)."""
    out = subprocess.run(["pgrep", "-a", "dnsmasq"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if sandbox_id in line]


@pytest.fixture
def net_agent(agent_factory: Any, tiny_image: str, tmp_path: Path) -> Iterator[tuple[VMAgent, dict[str, str]]]:
    state = Path(tempfile.mkdtemp(prefix="pv-e2e-net-", dir="/var/tmp"))
    state.chmod(0o711)
    suffix = secrets.token_hex(3)
    net = {"bridge": f"pvt{suffix}", "subnet": f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}.0/24",
           "name": f"e2e-{suffix}", "ipam": str(tmp_path / "ipam")}
    conf = tmp_path / "net.d"
    conf.mkdir()
    (conf / "10-e2e.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": net["name"],
        "plugins": [
            {"type": "bridge", "bridge": net["bridge"], "isGateway": True, "ipMasq": False, "hairpinMode": True,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": net["subnet"]}]], "dataDir": net["ipam"],
                      "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ]}))
    agent: AgentProcess = agent_factory(state_dir=state / "state", cni_conf_dir=conf, network=True)
    agent.config_path.write_text(agent.config_path.read_text().replace(
        "[libvirt]\n", '[libvirt]\nvirt_type = "qemu"\n'))
    agent.start()
    helper = VMAgent(agent, tiny_image, tmp_path / "pods")
    try:
        yield helper, net
    finally:
        try:
            for sb in helper.agent.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items:
                helper.remove_pod(VM(sb.id, "", Path()))
        except Exception:  # noqa: BLE001 - virsh and ip clean below
            pass
        purge_domains(agent.state_dir)
        remove_all_pod_networks(helper.agent)
        subprocess.run(["ip", "link", "del", net["bridge"]], capture_output=True)
        shutil.rmtree(state, ignore_errors=True)


def test_vm_owns_the_pod_ip_and_teardown_leaves_nothing(net_agent: tuple[VMAgent, dict[str, str]]) -> None:
    vma, net = net_agent
    links_before, netns_before = links(), netns_list()
    host_port = free_port()
    vma.agent.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=vma.image)), timeout=300)
    sb_cfg = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name="web", namespace="e2e", uid=uuid.uuid4().hex),
        hostname="web-vm", log_directory=str(vma.logs / "web"),
        port_mappings=[pb.PortMapping(protocol=pb.TCP, container_port=80, host_port=host_port,
                                      host_ip="127.0.0.1")],
        dns_config=pb.DNSConfig(servers=["10.96.0.10"], searches=["e2e.svc.cluster.local"]))
    sid = vma.agent.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=sb_cfg), timeout=60).pod_sandbox_id
    status = vma.agent.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=30).status
    pod_ip = status.network.ip
    assert pod_ip and pod_ip.startswith(net["subnet"].rsplit(".", 1)[0] + ".")
    cfg = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name="vm"), image=pb.ImageSpec(image=vma.image), log_path="vm/0.log",
        linux=pb.LinuxContainerConfig(resources=pb.LinuxContainerResources(memory_limit_in_bytes=96 << 20)))
    cid = vma.agent.runtime.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=sid, config=cfg, sandbox_config=sb_cfg), timeout=120).container_id
    vm = VM(sid, cid, vma.logs / "web" / "vm" / "0.log")
    # The pod's DHCP server started with the VM's creation, not before.
    assert dnsmasq_of(sid)
    info = json.loads(vma.status(vm, verbose=True).info["info"])
    iface = ET.fromstring(info["domainXML"]).find("./devices/interface[@type='bridge']")
    assert iface is not None, info["domainXML"]
    host_bridge = iface.find("source").get("bridge")  # type: ignore[union-attr]
    assert host_bridge in links()
    vma.start(vm)
    # The guest took the pod IP by DHCP from the pod's own responder.
    vma.wait_log(vm, "PODVISOR-READY hostname=web-vm", timeout=240)
    vma.wait_log(vm, f"ip={pod_ip}", timeout=240)  # in the ready line, or a later PODVISOR-IP line

    body = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            body = urllib.request.urlopen(f"http://{pod_ip}/", timeout=5).read().decode()
            break
        except OSError:
            time.sleep(1)
    assert body.strip() == "web-vm"
    via_host_port = urllib.request.urlopen(f"http://127.0.0.1:{host_port}/", timeout=10).read().decode()
    assert via_host_port.strip() == "web-vm"

    vma.remove_pod(vm)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (links() - links_before - {net["bridge"]} or
                                           netns_list() - netns_before):
        time.sleep(0.5)
    assert links() - links_before - {net["bridge"]} == set()
    assert netns_list() - netns_before == set()
    assert pod_ip not in iptables() and sid[:12] not in iptables()
    assert dnsmasq_of(sid) == []
    leases = Path(net["ipam"]) / net["name"]
    assert not leases.exists() or pod_ip not in {p.name for p in leases.iterdir()}


def test_two_vm_pods_reach_each_other_by_pod_ip(net_agent: tuple[VMAgent, dict[str, str]]) -> None:
    vma, _net = net_agent
    server = vma.create("srv", hostname="srv-vm")
    vma.start(server)
    srv_ip = vma.agent.runtime.PodSandboxStatus(
        pb.PodSandboxStatusRequest(pod_sandbox_id=server.sandbox_id), timeout=30).status.network.ip
    # busybox nc with a numeric address and port: the static guest has no NSS
    # (its wget looks the "http" service up and crashes). The marker is built
    # at run time so that the printed user-data does not contain it.
    fetch = ("#!/bin/sh\n"
             "i=0\n"
             "while [ $i -lt 90 ]; do i=$((i+1))\n"
             f"  out=$(printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {srv_ip} 80 | tail -n 1)\n"
             "  if [ -n \"$out\" ]; then echo \"fetched-$(echo from-peer):$out\"; exit 0; fi\n"
             "  sleep 1\n"
             "done\n"
             "echo fetch-failed\n")
    client = vma.create("cli", hostname="cli-vm", annotations={"podvisor.io/user-data": fetch}, pull=False)
    vma.start(client)
    # Under load the lease may come after the ready line (then PODVISOR-IP says it).
    vma.wait_log(server, f"ip={srv_ip}", timeout=240)
    text = vma.wait_log(client, "fetched-from-peer:", timeout=240)
    assert "fetched-from-peer:srv-vm" in text
