"""Pod networking through the real agent (no VMs): concurrent sandboxes,
failing plugins, crashes — and nothing left behind each time.

Each test uses its own CNI configuration (its own bridge name, /24 subnet and
IPAM directory) and deletes its bridge at the end.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.adapters.network.pod_network import PodNetworkManager
from agent.api.gen.runtime.v1 import api_pb2 as pb
from tests.integration.agentproc import AgentProcess
from tests.integration.cni_conf import write_conflist


def leftovers(ipam: Path, marks: set[str]) -> dict[str, Any]:
    """What is left on the host that belongs to this test (by sandbox ids, IPs,
    state directory): links, namespaces, IPAM leases, iptables rules, dnsmasq."""

    def run(*cmd: str) -> str:
        return subprocess.run(cmd, capture_output=True, text=True).stdout

    def ours(text: str) -> bool:
        return any(m in text for m in marks)

    links = {line.split(":")[1].strip().split("@")[0] for line in run("ip", "-o", "link").splitlines()}
    netns = {line.split()[0] for line in run("ip", "netns", "list").splitlines() if line.strip()}
    leases = sorted(p.name for p in ipam.rglob("*") if p.is_file() and p.name[0].isdigit()) if ipam.exists() else []
    return {
        "links": sorted(name for name in links if ours(name)),
        "netns": sorted(name for name in netns if ours(name)),
        "leases": leases,
        "rules": [line for line in run("iptables-save").splitlines() if ours(line)],
        "dnsmasq": [line for line in run("pgrep", "-a", "dnsmasq").splitlines() if ours(line)],
    }


def marks_for(agent: AgentProcess, made: list[tuple[str, str]]) -> set[str]:
    marks = {str(agent.state_dir)}
    for sid, ip in made:
        marks |= {sid, sid[:12]}
        if ip:
            marks.add(ip + "/")
            marks.add(ip + " ")
    return marks


NOTHING = {"links": [], "netns": [], "leases": [], "rules": [], "dnsmasq": []}


@pytest.fixture
def network(tmp_path: Path) -> Iterator[dict[str, Any]]:
    suffix = secrets.token_hex(3)
    net: dict[str, Any] = {"bridge": f"pvn{suffix}", "name": f"it-{suffix}", "ipam": tmp_path / "ipam",
                           "subnet": f"10.{150 + secrets.randbelow(50)}.{secrets.randbelow(250)}.0/24",
                           "conf": tmp_path / "net.d", "bin": tmp_path / "bin"}
    net["bin"].mkdir()
    write_conflist(net["conf"], name=net["name"], bridge=net["bridge"], subnet=net["subnet"], ipam_dir=net["ipam"],
                   file_name="10-it.conflist")
    net["agents"] = []
    try:
        yield net
    finally:
        for agent in net["agents"]:
            remove_all_pod_networks(agent)
        subprocess.run(["ip", "link", "del", net["bridge"]], capture_output=True)


def remove_all_pod_networks(agent: AgentProcess) -> None:
    """Teardown even when a test failed half-way: through the agent, then from
    the agent's CNI cache with the same adapter (the agent may be dead)."""
    try:
        for sb in agent.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items:
            agent.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sb.id), timeout=120)
    except Exception:  # noqa: BLE001
        pass
    cache = agent.state_dir / "cni"
    if cache.exists():
        manager = PodNetworkManager([], [Path("/usr/lib/cni")], cache, "pvunused0", "10.255.255.0/24")
        for sid in manager.cached_sandbox_ids():
            try:
                manager.remove(sid, agent.state_dir / "sandboxes" / sid)
            except Exception:  # noqa: BLE001
                pass


def agent_with(agent_factory: Any, net: dict[str, Any], state_dir: Path | None = None) -> AgentProcess:
    agent: AgentProcess = agent_factory(cni_conf_dir=net["conf"], network=True, state_dir=state_dir)
    net["agents"].append(agent)
    agent.config_path.write_text(agent.config_path.read_text().replace(
        "conf_dirs = [", f'bin_dirs = ["{net["bin"]}", "/usr/lib/cni"]\nconf_dirs = ['))
    return agent


def sandbox(name: str, host_port: int = 0) -> pb.RunPodSandboxRequest:
    ports = [pb.PortMapping(protocol=pb.TCP, container_port=80, host_port=host_port)] if host_port else []
    return pb.RunPodSandboxRequest(config=pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, namespace="it", uid=uuid.uuid4().hex), hostname=name,
        port_mappings=ports))


def test_ten_sandboxes_concurrently_leave_nothing(agent_factory: Any, network: dict[str, Any]) -> None:
    agent = agent_with(agent_factory, network).start()

    def one(i: int) -> tuple[str, str]:
        sid = agent.runtime.RunPodSandbox(sandbox(f"n{i}", host_port=20000 + secrets.randbelow(20000)),
                                          timeout=120).pod_sandbox_id
        st = agent.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=30).status
        return sid, st.network.ip

    with ThreadPoolExecutor(10) as pool:
        made = list(pool.map(one, range(10)))
    ips = [ip for _, ip in made]
    assert len(set(ips)) == 10 and all(ips)
    during = leftovers(network["ipam"], marks_for(agent, made))
    # No VM yet, so no DHCP server: it starts with CreateContainer (tests/e2e/test_vm_network.py).
    assert len(during["netns"]) == 10 and len(during["leases"]) == 10 and during["dnsmasq"] == []

    def gone(sid: str) -> None:
        agent.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
        agent.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)

    with ThreadPoolExecutor(10) as pool:
        list(pool.map(gone, [sid for sid, _ in made]))
    assert leftovers(network["ipam"], marks_for(agent, made)) == NOTHING


def test_failing_plugin_fails_run_and_leaves_nothing(agent_factory: Any, network: dict[str, Any]) -> None:
    failing = network["bin"] / "refuse"
    # Refuses ADD (CNI: DEL must succeed on a best-effort basis).
    failing.write_text('#!/bin/sh\ncat >/dev/null\n'
                       'if [ "$CNI_COMMAND" != ADD ]; then echo "{}"; exit 0; fi\n'
                       'echo \'{"cniVersion":"1.0.0","code":11,"msg":"refused by policy","details":"test"}\'\n'
                       'exit 1\n')
    failing.chmod(0o755)
    conf = json.loads((network["conf"] / "10-it.conflist").read_text())
    conf["plugins"].append({"type": "refuse"})
    (network["conf"] / "10-it.conflist").write_text(json.dumps(conf))
    agent = agent_with(agent_factory, network).start()
    netns_before = set(leftovers(network["ipam"], {"podvisor-"})["netns"])
    with pytest.raises(grpc.RpcError) as err:
        agent.runtime.RunPodSandbox(sandbox("denied"), timeout=120)
    assert "refused by policy" in (err.value.details() or "")
    assert agent.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items == []
    # The id never reached the client: look for anything under the agent's state or named podvisor-*.
    assert leftovers(network["ipam"], marks_for(agent, [])) == NOTHING
    assert set(leftovers(network["ipam"], {"podvisor-"})["netns"]) <= netns_before
    assert not [p for p in (agent.state_dir / "sandboxes").iterdir()]
    assert not list((agent.state_dir / "cni").rglob("*.json"))


def test_crash_mid_run_is_rolled_back_at_restart(agent_factory: Any, network: dict[str, Any]) -> None:
    agent = agent_with(agent_factory, network).start()
    sid = agent.runtime.RunPodSandbox(sandbox("crashy"), timeout=120).pod_sandbox_id
    ip = agent.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=30).status.network.ip
    agent.kill9()
    # As if the agent died inside RunPodSandbox, after CNI ADD and the wiring.
    db = sqlite3.connect(agent.state_dir / "podvisor.db")
    db.execute("UPDATE sandboxes SET state = 'creating' WHERE id = ?", (sid,))
    db.commit()
    db.close()
    assert leftovers(network["ipam"], marks_for(agent, [(sid, ip)]))["netns"]
    agent.start()
    assert agent.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items == []
    assert leftovers(network["ipam"], marks_for(agent, [(sid, ip)])) == NOTHING


def test_crash_after_stop_started_is_finished_by_remove(agent_factory: Any, network: dict[str, Any]) -> None:
    agent = agent_with(agent_factory, network).start()
    sid = agent.runtime.RunPodSandbox(sandbox("halfstop"), timeout=120).pod_sandbox_id
    ip = agent.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=30).status.network.ip
    agent.kill9()
    agent.start()
    # The restarted agent still serves the sandbox; stop and remove are idempotent.
    agent.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    agent.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    agent.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    assert leftovers(network["ipam"], marks_for(agent, [(sid, ip)])) == NOTHING


def test_pod_network_lost_in_a_reboot_marks_the_sandbox_notready(agent_factory: Any,
                                                                network: dict[str, Any]) -> None:
    agent = agent_with(agent_factory, network).start()
    sid = agent.runtime.RunPodSandbox(sandbox("rebooted"), timeout=120).pod_sandbox_id
    ip = agent.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=30).status.network.ip
    agent.kill9()
    # What a reboot takes: the DHCP server and the namespace (with its links).
    subprocess.run(["pkill", "-f", f"dnsmasq .*{sid}"], check=False)
    subprocess.run(["ip", "netns", "del", f"podvisor-{sid}"], check=True)
    agent.start()
    st = agent.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=30).status
    assert st.state == pb.SANDBOX_NOTREADY
    agent.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    agent.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    assert leftovers(network["ipam"], marks_for(agent, [(sid, ip)])) == NOTHING
