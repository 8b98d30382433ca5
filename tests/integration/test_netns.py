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
