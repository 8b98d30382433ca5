"""Facts about the host machine: CPUs, memory, disk, kernel."""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass(frozen=True)
class HostFacts:
    hostname: str
    kernel_release: str
    cpu_model: str
    cpus: int
    memory_total_bytes: int
    memory_available_bytes: int
    disk_total_bytes: int
    disk_free_bytes: int


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
