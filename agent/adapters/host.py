"""Facts about the host machine: CPUs, memory, disk, kernel."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import psutil

from agent.domain.host import HostCapacity, HostFacts


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def gather(state_dir: Path) -> HostFacts:
    mem = psutil.virtual_memory()
    try:
        disk = shutil.disk_usage(state_dir)
        total, free = disk.total, disk.free
    except OSError:
        total = free = 0
    return HostFacts(
        hostname=socket.gethostname(),
        kernel_release=os.uname().release,
        cpu_model=_cpu_model(),
        cpus=os.cpu_count() or 0,
        memory_total_bytes=mem.total,
        memory_available_bytes=mem.available,
        disk_total_bytes=total,
        disk_free_bytes=free,
    )


_NOT_NODE_LINKS = ("lo", "pv", "podvisor", "cni", "virbr", "veth", "docker", "ifb")


def node_ipv4() -> str:
    """The node's own IPv4 address (hostNetwork sandboxes report it as theirs).

    The first global address on an interface that is not loopback or a
    bridge/veth made for pods or VMs; "" when there is none.
    """
    for name, addrs in sorted(psutil.net_if_addrs().items()):
        if name.startswith(_NOT_NODE_LINKS):
            continue
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith(("127.", "169.254.")):
                return str(a.address)
    return ""


class Host:
    """The host facts port: live figures for Host/Info, the node's address
    for hostNetwork sandboxes."""

    def __init__(self, state_dir: Path) -> None:
        self._state_dir = state_dir

    def facts(self) -> HostFacts:
        """CPU, memory, kernel and the state directory's disk, read now."""
        return gather(self._state_dir)

    @staticmethod
    def capacity() -> HostCapacity:
        """The host's CPU count and total memory (the default ceiling of a VM's size)."""
        return HostCapacity(cpus=os.cpu_count() or 1, memory_bytes=psutil.virtual_memory().total)

    def node_ip(self) -> str:
        """The node's own IPv4 address ("" when there is none)."""
        return node_ipv4()
