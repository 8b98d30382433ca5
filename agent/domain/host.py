"""Facts about the host machine (values only; agent.adapters.host gathers them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HostCapacity:
    """How large a VM this host could hold at all: its CPU count and memory."""

    cpus: int
    memory_bytes: int


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
