"""Pod networks for real: network namespaces, the CNI plugins of
containernetworking-plugins, the bridge binding and dnsmasq.

Each test builds a private "host" network namespace and runs the code under
test from inside it (the test thread enters it with setns(2); subprocesses
and threads started from there inherit it). The CNI bridge, the per-sandbox
bridges, portmap's iptables rules and the IP forwarding the bridge plugin
turns on all live in that namespace, so the machine's own network (where
ip_forward may well be 0) is never touched; the test only adds namespaces
of its own under /run/netns and removes them all, even when it fails.

The VM is played by a "client" namespace whose veth joins the sandbox's
host-side bridge with the pod's original MAC, runs busybox udhcpc and serves
HTTP on the address it was given.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.adapters.network import dhcp, netns, state
from agent.adapters.network.cni import CNIError, CNIExec
from agent.adapters.network.pod_network import PodNetworkManager, netns_name
from agent.domain.errors import FailedPrecondition
from agent.domain.network.cni import Attachment, runtime_config
from agent.domain.network.wiring import DHCP_SERVER_IP, DHCPRoute, LinkNames, PodNetworkStatus, PodWiring
from agent.domain.sandbox import DNSConfig, PortMapping

CNI_BIN = Path("/usr/lib/cni")
_TOOLS = ("ip", "iptables", "iptables-save", "dnsmasq", "busybox", "curl", "sysctl")
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(not (CNI_BIN / "bridge").exists(), reason="containernetworking-plugins not installed"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in _TOOLS), reason=f"needs {', '.join(_TOOLS)}"),
]

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

# The VM's stand-in: a tiny HTTP server that answers with a token (TCPServer,
# not http.server's HTTPServer, whose reverse DNS lookup of the bind address
# stalls for seconds in a namespace without DNS).
HTTP_SERVER = """
import socketserver, sys
from http.server import BaseHTTPRequestHandler
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = sys.argv[3].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
socketserver.TCPServer.allow_reuse_address = True
with socketserver.TCPServer((sys.argv[1], int(sys.argv[2])), H) as s:
    s.serve_forever()
"""

UDHCPC_SCRIPT = """#!/bin/sh
# udhcpc calls this with deconfig/bound/renew/nak; the environment holds the lease.
case "$1" in
  bound|renew)
    env > "{env_file}.tmp" && mv "{env_file}.tmp" "{env_file}"
    {ip} addr flush dev "$interface"
    {ip} addr add "$ip/$mask" dev "$interface"
    if [ -n "$router" ]; then {ip} route add default via "${{router%% *}}" dev "$interface"; fi
    ;;
esac
exit 0
"""


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def _in_netns(path: Path) -> Iterator[None]:
    """Run the current thread (and what it starts) inside a network namespace."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(path, os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def _run(*args: str, check: bool = True, timeout: float = 30) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def _link_names() -> list[str]:
    return sorted(line.split(":")[1].strip().split("@")[0] for line in _run("ip", "-o", "link").splitlines())


def _rules(cmd: str) -> list[str]:
    # Counters and the comment header change with every call; the rules do not.
    out = _run(cmd, check=False)
    return [re.sub(r"\[\d+:\d+\]", "", line) for line in out.splitlines() if not line.startswith("#")]


def _http_get(host: str, port: int, timeout: float = 5.0) -> str:
    """GET / over a plain socket: no proxy settings from the environment get in the way."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.0 200"), head
    return body


def _wait_port(host: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@dataclass
class Client:
    """A stand-in VM: a namespace with a NIC on the sandbox's host bridge."""

    netns: str
    host_end: str
    lease: dict[str, str] = field(default_factory=dict)


class Lab:
    """One test's private host namespace, CNI network and bookkeeping."""

    def __init__(self, tmp_path: Path) -> None:
        self.tag = secrets.token_hex(3)
        self.tmp = tmp_path
        self.host_netns = f"pvt-host-{self.tag}"
        self.bridge = f"pvtbr{self.tag}"  # the CNI bridge (11 characters)
        rnd = secrets.randbelow(200) + 20
        self.subnet = ipaddress.ip_network(f"10.{rnd}.{secrets.randbelow(250) + 1}.0/24")
        self.gateway = str(self.subnet.network_address + 1)
        self.network = f"pvtnet-{self.tag}"
        self.ipam_dir = tmp_path / "ipam"
        self.cache_dir = tmp_path / "cni-cache"
        self.conf_dir = tmp_path / "net.d"
        self.conf_dir.mkdir()
        self.write_conflist(self.conf_dir)
        self.sandboxes: dict[str, Path] = {}
        self.netns_names: list[str] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        self.clients = 0

    # configuration

    def conflist(self, *extra_plugins: dict[str, Any], ipam: dict[str, Any] | None = None,
                 bridge: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "cniVersion": "1.0.0",
            "name": self.network,
            "plugins": [
                {"type": "bridge", "bridge": self.bridge, "isGateway": True, "ipMasq": True, "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": str(self.subnet)}]],
                          "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(self.ipam_dir), **(ipam or {})},
                 **(bridge or {})},
                *extra_plugins,
                {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
            ],
        }

    def write_conflist(self, conf_dir: Path, *extra_plugins: dict[str, Any],
                       ipam: dict[str, Any] | None = None, bridge: dict[str, Any] | None = None) -> None:
        doc = self.conflist(*extra_plugins, ipam=ipam, bridge=bridge)
        (conf_dir / "10-pvtest.conflist").write_text(json.dumps(doc, indent=1))

    def manager(self, conf_dir: Path | None = None, bin_dirs: tuple[Path, ...] = (CNI_BIN,)) -> PodNetworkManager:
        return PodNetworkManager([conf_dir or self.conf_dir], bin_dirs, self.cache_dir,
                                 builtin_bridge=f"pvtbb{self.tag}", builtin_subnet="10.254.0.0/24",
                                 ipam_data_dir=self.ipam_dir)

    def new_sandbox(self) -> tuple[str, Path]:
        sandbox_id = secrets.token_hex(32)
        workdir = self.tmp / "sandboxes" / sandbox_id
        self.sandboxes[sandbox_id] = workdir
        self.netns_names.append(netns_name(sandbox_id))
        return sandbox_id, workdir

    def add(self, mgr: PodNetworkManager, sandbox_id: str, workdir: Path,
            ports: tuple[PortMapping, ...] = (), dns: DNSConfig | None = None) -> PodNetworkStatus:
        return mgr.add(sandbox_id, name=f"vm-{sandbox_id[:6]}", namespace="default", uid=f"uid-{sandbox_id[:8]}",
                       port_mappings=ports, dns=dns or DNSConfig(), hostname=f"vm-{sandbox_id[:6]}",
                       workdir=workdir)

    # the stand-in VM

    def client(self, wiring: PodWiring) -> Client:
        self.clients += 1
        name = f"pvt-cli-{self.tag}-{self.clients}"
        self.netns_names.append(name)
        _run("ip", "netns", "add", name)
        host_end = f"pvtc{self.tag}{self.clients}"
        _run("ip", "link", "add", host_end, "type", "veth", "peer", "name", "vm0", "netns", name)
        _run("ip", "link", "set", host_end, "master", wiring.host_bridge, "up")
        _run("ip", "-n", name, "link", "set", "vm0", "address", wiring.vm_mac)
        _run("ip", "-n", name, "link", "set", "vm0", "up")
        _run("ip", "-n", name, "link", "set", "lo", "up")
        return Client(netns=name, host_end=host_end)

    def dhcp(self, client: Client) -> dict[str, str]:
        env_file = self.tmp / f"{client.netns}.lease"
        script = self.tmp / f"{client.netns}.udhcpc.sh"
        script.write_text(UDHCPC_SCRIPT.format(env_file=env_file, ip=shutil.which("ip")))
        script.chmod(0o755)
        _run("ip", "netns", "exec", client.netns, "busybox", "udhcpc", "-i", "vm0", "-f", "-q", "-n",
             "-t", "5", "-T", "2", "-O", "search", "-O", "staticroutes", "-O", "mtu", "-s", str(script), timeout=60)
        client.lease = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
        return client.lease

    def serve_http(self, client: Client, ip: str, port: int, token: str) -> None:
        proc = subprocess.Popen(["ip", "netns", "exec", client.netns, sys.executable, "-c", HTTP_SERVER,
                                 ip, str(port), token], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.processes.append(proc)
        _wait_port(ip, port)

    def drop_clients(self) -> None:
        """Stop the stand-in VMs and delete their namespaces."""
        for proc in self.processes:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=10)
        for name in [n for n in self.netns_names if n.startswith("pvt-cli-")]:
            _run("ip", "netns", "delete", name)
            self.netns_names.remove(name)

    # what is left behind

    def state(self) -> dict[str, Any]:
        """Everything a pod network could leave behind, as seen from the lab's host."""
        leases = []
        if self.ipam_dir.exists():
            for p in sorted(self.ipam_dir.rglob("*")):
                with contextlib.suppress(ValueError):
                    ipaddress.ip_address(p.name)
                    leases.append(str(p))
        ours = set(self.netns_names)
        return {
            "links": _link_names(),
            "iptables": _rules("iptables-save"),
            "ip6tables": _rules("ip6tables-save"),
            "netns": sorted(n for n in netns.list_names() if n in ours),
            "leases": leases,
            "cache": sorted(p.name for p in self.cache_dir.glob("*")) if self.cache_dir.exists() else [],
            "dnsmasq": self.dnsmasq_pids(),
            "workdir_files": sorted(str(p) for w in self.sandboxes.values() if w.exists() for p in w.iterdir()),
        }

    def dnsmasq_pids(self) -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "dnsmasq" and \
                        str(self.tmp).encode() in (entry / "cmdline").read_bytes() and \
                        dhcp.proc_state(int(entry.name)) not in ("", "Z"):
                    pids.append(int(entry.name))
        return sorted(pids)

    def warm_up(self, mgr: PodNetworkManager) -> None:
        """Add and remove one sandbox so that what outlives pods by design
        exists on both sides of a before/after comparison: the CNI bridge
        (the bridge plugin never deletes it) and portmap's top-level chains
        (CNI-HOSTPORT-*, never deleted either)."""
        sandbox_id, workdir = self.new_sandbox()
        self.add(mgr, sandbox_id, workdir, ports=(PortMapping("tcp", 80, 30000 + secrets.randbelow(20000)),))
        mgr.remove(sandbox_id, workdir)

    def assert_no_trace(self, sandbox_ids: list[str], ips: list[str]) -> None:
        """Nothing in the lab's host names these sandboxes or their addresses."""
        tags = [LinkNames.for_sandbox(s).host_bridge[3:] for s in sandbox_ids]
        for name in _link_names():
            assert not any(t in name for t in tags), name
        for line in _rules("iptables-save"):
            assert not any(s in line for s in sandbox_ids), line
            assert not any(re.search(rf"\b{re.escape(ip)}\b", line) for ip in ips), line

    # cleanup, also after failures

    def cleanup(self) -> None:
        mgr = self.manager()
        for sandbox_id, workdir in self.sandboxes.items():
            with contextlib.suppress(Exception):
                mgr.remove(sandbox_id, workdir)
        for proc in self.processes:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(timeout=10)
        for pid in self.dnsmasq_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for name in self.netns_names:
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False, timeout=30)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path)
    real_links = set(_link_names())
    _run("ip", "netns", "add", lab.host_netns)
    try:
        _run("ip", "-n", lab.host_netns, "link", "set", "lo", "up")
        with _in_netns(netns.path(lab.host_netns)):
            try:
                yield lab
            finally:
                lab.cleanup()
    finally:
        subprocess.run(["ip", "netns", "delete", lab.host_netns], capture_output=True, check=False, timeout=30)
    # The machine's own network saw none of it. (Only names this test could
    # have made are looked for: others may run pod networks here meanwhile.)
    ours = [lab.tag, *(LinkNames.for_sandbox(s).host_bridge[3:] for s in lab.sandboxes)]
    leaked = [n for n in set(_link_names()) - real_links if any(t in n for t in ours)]
    assert leaked == []
    assert not [n for n in netns.list_names() if lab.tag in n or n in lab.netns_names]


# The tests ----------------------------------------------------------------------------


def test_vm_gets_the_pod_ip_by_dhcp_and_answers_http_and_host_ports(lab: Lab) -> None:
    mgr = lab.manager()
    lab.warm_up(mgr)
    before = lab.state()

    sandbox_id, workdir = lab.new_sandbox()
    host_port = 30000 + secrets.randbelow(20000)
    dns = DNSConfig(servers=("10.96.0.10", "10.96.0.11"), searches=("default.svc.cluster.local", "cluster.local"),
                    options=("ndots:5",))
    status = lab.add(mgr, sandbox_id, workdir, ports=(PortMapping("tcp", 8080, host_port),), dns=dns)
    wiring = status.wiring

    # What add() reports.
    assert ipaddress.ip_address(status.ip) in lab.subnet
    assert status.config_source == str(lab.conf_dir / "10-pvtest.conflist")
    assert status.network_name == lab.network
    assert (wiring.gateway, wiring.prefix) == (lab.gateway, 24)
    found = status.result.sandbox_interface("eth0")
    assert found is not None and wiring.vm_mac == found[1].mac  # the VM takes the pod's original MAC
    names = LinkNames.for_sandbox(sandbox_id)
    assert wiring.host_bridge == names.host_bridge == f"pvb{sandbox_id[:12]}"
    # The bridge plugin's isGateway turned on forwarding: in the lab's host only.
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"

    # What exists now.
    ns = netns_name(sandbox_id)
    assert netns.exists(ns)
    links = _link_names()
    assert names.host_bridge in links and names.host_veth in links
    # The DHCP server starts for the VM (CreateContainer), not with the sandbox.
    assert not dhcp.running(workdir) and lab.dnsmasq_pids() == []
    assert mgr.ensure_dhcp(sandbox_id, workdir) is True
    assert dhcp.running(workdir)
    assert mgr.ensure_dhcp(sandbox_id, workdir) is False
    pod_links = _run("ip", "-n", ns, "-o", "link")
    assert names.inner_bridge in pod_links and names.pod_veth in pod_links
    # eth0 gave up its address and MAC; the in-pod bridge has only the DHCP identity.
    assert "inet " not in _run("ip", "-n", ns, "-o", "addr", "show", "dev", "eth0")
    assert wiring.vm_mac not in _run("ip", "-n", ns, "-o", "link", "show", "dev", "eth0")
    assert f"{DHCP_SERVER_IP}/32" in _run("ip", "-n", ns, "-o", "addr", "show", "dev", names.inner_bridge)
    assert state.load(workdir) == wiring
    assert mgr.status(sandbox_id, workdir) is not None

    # The VM asks for its address: exactly the pod IP, the CNI gateway, the sandbox's DNS.
    client = lab.client(wiring)
    lease = lab.dhcp(client)
    assert lease["ip"] == status.ip
    assert lease["mask"] == "24"
    assert lease["router"] == lab.gateway
    assert lease["dns"].split() == ["10.96.0.10", "10.96.0.11"]
    assert lease["search"].split() == ["default.svc.cluster.local", "cluster.local"]
    assert lease["domain"] == "default.svc.cluster.local"
    assert lease["hostname"] == f"vm-{sandbox_id[:6]}"
    assert lease["serverid"] == DHCP_SERVER_IP
    assert lease["mtu"] == str(wiring.mtu)

    # The VM serves HTTP on the pod IP; the host reaches it directly...
    token = secrets.token_hex(8)
    lab.serve_http(client, status.ip, 8080, token)
    assert _http_get(status.ip, 8080) == token
    out = _run("curl", "--noproxy", "*", "-sS", "-m", "10", f"http://{status.ip}:8080/")
    assert out == token
    # ...and through portmap's host port, on loopback (DNAT to a pod needs
    # route_localnet on the CNI bridge and SNAT for 127.0.0.1, both portmap's
    # doing) and on the CNI bridge's own address.
    assert _http_get("127.0.0.1", host_port) == token
    assert _http_get(lab.gateway, host_port) == token
    # The VM reaches its gateway (the host), through the pod namespace.
    _run("ip", "netns", "exec", client.netns, "busybox", "ping", "-c", "1", "-W", "5", lab.gateway)
    assert "lladdr" in _run("ip", "neigh", "show", status.ip, "dev", lab.bridge)

    # Gone again: remove the stand-in VM's NIC first, as the real VM is stopped first.
    _run("ip", "link", "del", client.host_end)
    mgr.remove(sandbox_id, workdir)
    lab.drop_clients()
    after = lab.state()
    for key in before:
        assert after[key] == before[key], key
    lab.assert_no_trace([sandbox_id], [status.ip])
    with pytest.raises(OSError):
        _http_get("127.0.0.1", host_port, timeout=2)
    # Idempotent.
    mgr.remove(sandbox_id, workdir)


FAILING_PLUGIN = """#!/bin/sh
# A CNI plugin that refuses every ADD (and cleans up nothing on DEL, successfully).
cat > /dev/null
case "$CNI_COMMAND" in
  ADD)
    echo '{"cniVersion": "1.0.0", "code": 7, "msg": "pvt-fail: the network is closed today", "details": "test"}'
    exit 1 ;;
  VERSION)
    echo '{"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0"]}' ;;
esac
exit 0
"""


def test_failing_plugin_raises_its_message_and_leaves_nothing(lab: Lab) -> None:
    lab.warm_up(lab.manager())
    bin_dir = lab.tmp / "bin"
    bin_dir.mkdir()
    (bin_dir / "pvt-fail").write_text(FAILING_PLUGIN)
    (bin_dir / "pvt-fail").chmod(0o755)
    conf_dir = lab.tmp / "net.d-failing"
    conf_dir.mkdir()
    # The failing plugin runs after bridge, so there is something to undo.
    lab.write_conflist(conf_dir, {"type": "pvt-fail"})
    mgr = lab.manager(conf_dir, bin_dirs=(bin_dir, CNI_BIN))
    before = lab.state()

    sandbox_id, workdir = lab.new_sandbox()
    with pytest.raises(CNIError) as info:
        lab.add(mgr, sandbox_id, workdir, ports=(PortMapping("tcp", 80, 30000 + secrets.randbelow(20000)),))
    assert "pvt-fail: the network is closed today" in info.value.message
    assert info.value.plugin == "pvt-fail" and info.value.code == 7
    assert lab.state() == before
    lab.assert_no_trace([sandbox_id], [])


def test_ten_sandboxes_concurrently_leave_nothing(lab: Lab) -> None:
    mgr = lab.manager()
    lab.warm_up(mgr)
    before = lab.state()
    sandboxes = [lab.new_sandbox() for _ in range(10)]
    ports = {sid: 30000 + i * 7 + secrets.randbelow(7) for i, (sid, _) in enumerate(sandboxes)}

    with ThreadPoolExecutor(max_workers=10) as pool:
        statuses = list(pool.map(lambda s: lab.add(mgr, s[0], s[1], ports=(PortMapping("tcp", 80, ports[s[0]]),)),
                                 sandboxes))
    ips = [s.ip for s in statuses]
    assert len(set(ips)) == 10 and all(ipaddress.ip_address(ip) in lab.subnet for ip in ips)
    assert len({s.wiring.host_bridge for s in statuses}) == 10
    with ThreadPoolExecutor(max_workers=10) as pool:
        assert all(pool.map(lambda s: mgr.ensure_dhcp(s[0], s[1]), sandboxes))
    assert all(dhcp.running(w) for _, w in sandboxes)
    assert len(lab.dnsmasq_pids()) == 10

    with ThreadPoolExecutor(max_workers=10) as pool:
        list(pool.map(lambda s: mgr.remove(s[0], s[1]), sandboxes))
    assert lab.state() == before
    lab.assert_no_trace([sid for sid, _ in sandboxes], ips)


def test_remove_after_a_crash_works_from_disk_alone(lab: Lab) -> None:
    lab.warm_up(lab.manager())
    before = lab.state()

    # A complete add, then the agent "dies": a new manager knows nothing.
    done_id, done_dir = lab.new_sandbox()
    done = lab.add(lab.manager(), done_id, done_dir, ports=(PortMapping("tcp", 80, 30000 + secrets.randbelow(9999)),))
    assert lab.manager().ensure_dhcp(done_id, done_dir)

    # A crash in the middle of add: namespace made and CNI ADD done, no wiring yet.
    half_id, half_dir = lab.new_sandbox()
    ns_path = netns.create(netns_name(half_id))
    half = CNIExec([CNI_BIN], lab.cache_dir).add(
        lab.conflist(), Attachment(container_id=half_id, netns=ns_path, pod_name="h", pod_namespace="default"),
        runtime_config([PortMapping("tcp", 80, 40000 + secrets.randbelow(9999))], None))

    # A complete add whose sandbox directory (wiring state, dnsmasq's pid
    # file) is lost too: the CNI cache and the derived names must suffice.
    lost_id, lost_dir = lab.new_sandbox()
    lost = lab.add(lab.manager(), lost_id, lost_dir, ports=(PortMapping("tcp", 80, 20000 + secrets.randbelow(9999)),))
    assert lab.manager().ensure_dhcp(lost_id, lost_dir)
    shutil.rmtree(lost_dir)

    fresh = lab.manager()
    assert sorted(fresh.cached_sandbox_ids()) == sorted([done_id, half_id, lost_id])
    fresh.remove(done_id, done_dir)
    fresh.remove(half_id, half_dir)
    fresh.remove(lost_id, lost_dir)
    assert lab.state() == before
    lab.assert_no_trace([done_id, half_id, lost_id], [done.ip, str(half.ips[0].address.ip), lost.ip])
    # Removing what was never there is fine too.
    never_id, never_dir = lab.new_sandbox()
    fresh.remove(never_id, never_dir)


def test_add_retried_after_a_crash_starts_clean(lab: Lab) -> None:
    mgr = lab.manager()
    lab.warm_up(mgr)
    before = lab.state()
    sandbox_id, workdir = lab.new_sandbox()
    first = lab.add(mgr, sandbox_id, workdir)
    assert mgr.ensure_dhcp(sandbox_id, workdir) is True
    # The sandbox service retries RunPodSandbox after a crash: same id again.
    second = lab.add(lab.manager(), sandbox_id, workdir)
    assert lab.dnsmasq_pids() == []  # the first attempt's went with it
    assert lab.manager().ensure_dhcp(sandbox_id, workdir) is True
    assert dhcp.running(workdir) and len(lab.dnsmasq_pids()) == 1
    assert len(list(lab.cache_dir.glob("*.json"))) == 1
    lab.manager().remove(sandbox_id, workdir)
    assert lab.state() == before
    lab.assert_no_trace([sandbox_id], [first.ip, second.ip])


def test_dhcp_server_is_restarted_after_it_died(lab: Lab) -> None:
    mgr = lab.manager()
    sandbox_id, workdir = lab.new_sandbox()
    status = lab.add(mgr, sandbox_id, workdir)
    # Recovery leaves a sandbox alone whose VM never had it started...
    lab.manager().recover(sandbox_id, workdir)
    never_id, never_dir = lab.new_sandbox()
    lab.manager().recover(never_id, never_dir)  # no pod network ever made (networking was off): fine
    assert lab.dnsmasq_pids() == []
    assert mgr.ensure_dhcp(sandbox_id, workdir) is True
    assert mgr.ensure_dhcp(sandbox_id, workdir) is False
    for pid in lab.dnsmasq_pids():
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while dhcp.running(workdir) and time.monotonic() < deadline:
        time.sleep(0.05)
    # ...and restarts one that had been started and died (a new manager: the agent restarted).
    lab.manager().recover(sandbox_id, workdir)
    assert dhcp.running(workdir) and len(lab.dnsmasq_pids()) == 1
    client = lab.client(status.wiring)
    assert lab.dhcp(client)["ip"] == status.ip
    _run("ip", "link", "del", client.host_end)
    mgr.remove(sandbox_id, workdir)
    assert lab.dnsmasq_pids() == []


def test_builtin_network_when_no_configuration_exists(lab: Lab) -> None:
    empty = lab.tmp / "net.d-empty"
    empty.mkdir()
    mgr = lab.manager(empty)
    sandbox_id, workdir = lab.new_sandbox()
    status = lab.add(mgr, sandbox_id, workdir)
    assert status.config_source == "builtin"
    assert status.network_name == "podvisor"
    assert ipaddress.ip_address(status.ip) in ipaddress.ip_network("10.254.0.0/24")
    assert f"pvtbb{lab.tag}" in _link_names()
    assert mgr.ensure_dhcp(sandbox_id, workdir)
    client = lab.client(status.wiring)
    lease = lab.dhcp(client)
    assert (lease["ip"], lease["router"]) == (status.ip, "10.254.0.1")
    assert "dns" not in lease  # neither the sandbox nor CNI named a DNS server
    _run("ip", "link", "del", client.host_end)
    mgr.remove(sandbox_id, workdir)
    lab.assert_no_trace([sandbox_id], [status.ip])
    assert not list((lab.ipam_dir / "podvisor").glob("10.*"))


def test_cni_routes_and_dns_reach_the_vm(lab: Lab) -> None:
    # The bridge plugin reports the network configuration's "dns"; the
    # sandbox has no DNS config of its own, so the CNI result's is what the VM gets.
    router = str(lab.subnet.network_address + 254)
    conf_dir = lab.tmp / "net.d-routes"
    conf_dir.mkdir()
    lab.write_conflist(conf_dir, ipam={"routes": [{"dst": "0.0.0.0/0"}, {"dst": "192.168.77.0/24", "gw": router}]},
                       bridge={"dns": {"nameservers": ["10.53.0.10"], "search": ["cni.example", "other.example"]}})
    mgr = lab.manager(conf_dir)
    sandbox_id, workdir = lab.new_sandbox()
    status = lab.add(mgr, sandbox_id, workdir)
    assert status.wiring.routes == (DHCPRoute("0.0.0.0/0", lab.gateway),
                                    DHCPRoute("192.168.77.0/24", router))
    assert mgr.ensure_dhcp(sandbox_id, workdir)
    client = lab.client(status.wiring)
    lease = lab.dhcp(client)
    assert lease["ip"] == status.ip
    # Classless routes (RFC 3442) repeat the default route; busybox lists them as "dst gw" pairs.
    assert lease["staticroutes"].split() == ["192.168.77.0/24", router, "0.0.0.0/0", lab.gateway]
    assert lease["dns"].split() == ["10.53.0.10"]
    assert lease["search"].split() == ["cni.example", "other.example"]
    lab.drop_clients()
    mgr.remove(sandbox_id, workdir)
    lab.assert_no_trace([sandbox_id], [status.ip])


def test_pod_mtu_reaches_every_link_and_the_vm(lab: Lab) -> None:
    conf_dir = lab.tmp / "net.d-mtu"
    conf_dir.mkdir()
    lab.write_conflist(conf_dir, bridge={"mtu": 1400})
    mgr = lab.manager(conf_dir)
    sandbox_id, workdir = lab.new_sandbox()
    status = lab.add(mgr, sandbox_id, workdir)
    names = LinkNames.for_sandbox(sandbox_id)
    assert status.wiring.mtu == 1400
    ns = netns_name(sandbox_id)
    for link, where in ((names.host_bridge, None), (names.host_veth, None), (names.pod_veth, ns),
                        (names.inner_bridge, ns), ("eth0", ns)):
        out = _run("ip", *(["-n", where] if where else []), "-o", "link", "show", "dev", link)
        assert " mtu 1400 " in out, out
    assert mgr.ensure_dhcp(sandbox_id, workdir)
    client = lab.client(status.wiring)
    lease = lab.dhcp(client)
    assert (lease["ip"], lease["mtu"]) == (status.ip, "1400")
    lab.drop_clients()
    mgr.remove(sandbox_id, workdir)
    lab.assert_no_trace([sandbox_id], [status.ip])


def test_a_foreign_bridge_with_the_same_name_is_refused_and_left_alone(lab: Lab) -> None:
    """Link names carry 48 bits of the sandbox id: a sandbox whose id begins
    like another's must neither take over nor, rolling back, delete its bridge."""
    mgr = lab.manager()
    lab.warm_up(mgr)
    sandbox_id, workdir = lab.new_sandbox()
    other = sandbox_id[:12] + secrets.token_hex(26)
    names = LinkNames.for_sandbox(sandbox_id)
    _run("ip", "link", "add", "name", names.host_bridge, "type", "bridge")
    try:
        _run("ip", "link", "set", "dev", names.host_bridge, "alias", f"podvisor sandbox {other}")
        before = lab.state()
        with pytest.raises(FailedPrecondition, match="belongs to"):
            lab.add(mgr, sandbox_id, workdir)
        assert names.host_bridge in _link_names()
        assert f"podvisor sandbox {other}" in _run("ip", "-o", "link", "show", "dev", names.host_bridge)
        assert lab.state() == before
        assert not netns.exists(netns_name(sandbox_id))
    finally:
        _run("ip", "link", "del", names.host_bridge, check=False)
