"""Network namespaces made and entered by the agent's own threads
(agent.adapters.network.netns), for real, under /run/netns with this test's own names."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
from collections.abc import Iterator

import pytest

from agent.adapters.network import netns
from agent.domain.errors import Internal

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")


@pytest.fixture
def name() -> Iterator[str]:
    n = f"pvt-ns-{secrets.token_hex(4)}"
    try:
        yield n
    finally:
        subprocess.run(["ip", "netns", "delete", n], capture_output=True, check=False, timeout=30)
        netns.path(n).unlink(missing_ok=True)


def _inode(path: str) -> int:
    return os.stat(path).st_ino


def test_create_enter_and_delete(name: str) -> None:
    p = netns.create(name)
    assert netns.exists(name) and name in netns.list_names()
    # `ip` sees it as one of its own: a link made there is found from inside.
    subprocess.run(["ip", "-n", name, "link", "add", "pvt0", "type", "bridge"], check=True, timeout=30)
    inside = netns.run_in(name, lambda: (_inode("/proc/thread-self/ns/net"), socket.if_nametoindex("pvt0")))
    assert inside[0] == _inode(str(p)) != _inode("/proc/thread-self/ns/net")
    # Processes started from the thread run in the namespace too.
    out = netns.run_in(name, lambda: subprocess.run(["ip", "-o", "link"], capture_output=True, text=True,
                                                    check=True, timeout=30).stdout)
    assert "pvt0" in out
    # The caller's thread never left its own namespace.
    with pytest.raises(OSError):
        socket.if_nametoindex("pvt0")
    assert netns.create(name, exist_ok=True) == p
    with pytest.raises(Internal, match="exists"):
        netns.create(name)
    netns.delete(name)
    assert not netns.exists(name) and not p.exists()
    netns.delete(name)  # gone already: fine


def test_errors_inside_reach_the_caller(name: str) -> None:
    netns.create(name)

    def fails() -> None:
        raise ValueError("from inside")

    with pytest.raises(ValueError, match="from inside"):
        netns.run_in(name, fails)
    with pytest.raises(Internal, match="cannot enter"):
        netns.run_in(f"{name}-missing", lambda: None)


def test_a_plain_file_left_by_a_crash_is_replaced_or_removed(name: str) -> None:
    p = netns.path(name)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"")  # a crash between creating the mount point and mounting
    assert not netns.exists(name)
    netns.create(name, exist_ok=True)
    assert netns.exists(name)
    netns.delete(name)
    p.write_bytes(b"")
    netns.delete(name)
    assert not p.exists()


def _eth0(name: str) -> tuple[str, list[str], str]:
    """eth0's MAC, IPv4 addresses (with prefix) and master, as `ip` sees them."""
    import json

    doc = json.loads(subprocess.run(["ip", "-n", name, "-j", "addr", "show", "dev", "eth0"], capture_output=True,
                                    text=True, check=True, timeout=30).stdout)[0]
    addrs = [f"{a['local']}/{a['prefixlen']}" for a in doc.get("addr_info", []) if a.get("family") == "inet"]
    return doc["address"], addrs, doc.get("master", "")


@pytest.mark.parametrize("address", ["10.250.7.9/24", ""])
def test_eth0_handed_over_and_restored_with_ioctls(name: str, address: str) -> None:
    """The hand-over to the VM and its inverse before CNI DEL, both with
    interface ioctls: eth0 leaves the pod-side bridge with its MAC and its
    one IPv4 address (with prefix) back, as CNI ADD left it."""
    from agent.adapters.network import links
    from agent.domain.network.wiring import LinkNames

    netns.create(name)
    names = LinkNames.for_sandbox(secrets.token_hex(32), "eth0")
    mac = "02:42:0a:fa:07:09"
    for cmd in (["link", "add", "eth0", "address", mac, "type", "veth", "peer", "name", "pvt-peer"],
                ["link", "add", names.inner_bridge, "type", "bridge"],
                ["link", "set", "eth0", "up"], ["link", "set", names.inner_bridge, "up"]):
        subprocess.run(["ip", "-n", name, *cmd], check=True, timeout=30)
    if address:
        subprocess.run(["ip", "-n", name, "addr", "add", address, "dev", "eth0"], check=True, timeout=30)
    netns.run_in(name, lambda: links.hand_over("eth0", names, 1500, netns_name=name, what="test"))
    handed = _eth0(name)
    assert handed[0] != mac and handed[1] == [] and handed[2] == names.inner_bridge
    restored = links.restore("eth0", names, mac, (address,) if address else (), netns_name=name)
    assert restored is bool(address)
    assert _eth0(name) == (mac, [address] if address else [], "")
    # Twice is fine (a retried teardown), and a missing eth0 is no error.
    assert links.restore("eth0", names, mac, (address,) if address else (), netns_name=name) is bool(address)
    subprocess.run(["ip", "-n", name, "link", "del", "eth0"], check=True, timeout=30)
    assert links.restore("eth0", names, mac, (), netns_name=name) is False
