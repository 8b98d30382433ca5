"""Ports: what the services need from the outside world, as Protocols.

Services receive them in one bundle (``Ports``), so service tests can hand in
recording fakes while integration tests run the real adapters.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent.domain.network.choice import NetworkChoice
from agent.domain.network.wiring import PodNetworkStatus
from agent.domain.sandbox import DNSConfig, PortMapping, Sandbox


class Clock(Protocol):
    def now_ns(self) -> int: ...


class SystemClock:
    def now_ns(self) -> int:
        return time.time_ns()


class SandboxStore(Protocol):
    def insert_sandbox(self, sandbox: Sandbox) -> None: ...
    def update_sandbox(self, sandbox: Sandbox) -> None: ...
    def delete_sandbox(self, sandbox_id: str) -> None: ...
    def load_sandboxes(self) -> list[Sandbox]: ...


class SandboxNetwork(Protocol):
    """Pod networking: a sandbox's network namespace, CNI attachment and VM
    wiring (agent.adapters.network.pod_network.PodNetworkManager)."""

    def add(self, sandbox_id: str, name: str, namespace: str, uid: str, port_mappings: Sequence[PortMapping],
            dns: DNSConfig, hostname: str, workdir: Path) -> PodNetworkStatus: ...
    def remove(self, sandbox_id: str, workdir: Path) -> None: ...
    def status(self, sandbox_id: str, workdir: Path) -> PodNetworkStatus | None: ...
    def ensure_dhcp(self, sandbox_id: str, workdir: Path) -> bool: ...
    def recover(self, sandbox_id: str, workdir: Path) -> None: ...
    def cached_sandbox_ids(self) -> list[str]: ...
    def readiness(self) -> NetworkChoice: ...


class SandboxFiles(Protocol):
    def sandbox_dir(self, sandbox_id: str) -> Path: ...
    def create_sandbox_dir(self, sandbox_id: str) -> Path: ...
    def remove_sandbox_dir(self, sandbox_id: str) -> None: ...
    def list_sandbox_dirs(self) -> list[str]: ...
    def ensure_log_directory(self, path: str) -> None: ...


@dataclass(frozen=True)
class Ports:
    store: SandboxStore
    files: SandboxFiles
    clock: Clock
    # None: no pod networking (disabled in the config, or in service tests).
    network: SandboxNetwork | None = None
    # The node's address, reported as the IP of hostNetwork (NODE) sandboxes.
    node_ip: Callable[[], str] = lambda: ""
