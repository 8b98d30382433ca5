"""Stats of VM containers and of the sandboxes they live in.

A sandbox's figures are the totals of its running VMs (there is no pod-level
overhead outside the QEMU process), so the sum is made here once and the API
only converts it.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.domain.sandbox import Sandbox, SandboxFilter
from agent.domain.vm import ContainerState
from agent.services.containers import ContainerFilter, ContainerService, ContainerStats
from agent.services.ports import Clock, SystemClock
from agent.services.sandboxes import SandboxService


@dataclass(frozen=True)
class SandboxStats:
    """A sandbox's usage: its running containers' stats and their totals."""

    sandbox: Sandbox
    at_ns: int
    cpu_time_ns: int
    rss_bytes: int
    containers: tuple[ContainerStats, ...]


def sandbox_totals(sandbox: Sandbox, containers: tuple[ContainerStats, ...], at_ns: int) -> SandboxStats:
    """Sum the containers' CPU time and resident memory into the sandbox's figures."""
    return SandboxStats(sandbox, at_ns, cpu_time_ns=sum(s.cpu_time_ns for s in containers),
                        rss_bytes=sum(s.rss_bytes for s in containers), containers=containers)


class StatsService:
    """ContainerStats, ListContainerStats, PodSandboxStats and ListPodSandboxStats."""

    def __init__(self, sandboxes: SandboxService, containers: ContainerService,
                 clock: Clock | None = None) -> None:
        self._sandboxes = sandboxes
        self._containers = containers
        self._clock = clock or SystemClock()

    def container(self, container_id: str) -> ContainerStats:
        """One container's stats (NOT_FOUND for an unknown id)."""
        return self._containers.stats(self._containers.get(container_id))

    def list_containers(self, flt: ContainerFilter) -> list[ContainerStats]:
        """Stats of the listed containers that have not exited."""
        return [self._containers.stats(c) for c in self._containers.list(flt)
                if c.state is not ContainerState.EXITED]

    def sandbox(self, sandbox_id: str) -> SandboxStats:
        """One sandbox's stats (NOT_FOUND for an unknown id)."""
        return self._sandbox_stats(self._sandboxes.get(sandbox_id))

    def list_sandboxes(self, flt: SandboxFilter) -> list[SandboxStats]:
        """Stats of every sandbox the filter selects."""
        return [self._sandbox_stats(sb) for sb in self._sandboxes.list(flt)]

    def _sandbox_stats(self, sandbox: Sandbox) -> SandboxStats:
        stats = tuple(self._containers.stats(c) for c in self._containers.in_sandbox(sandbox.id)
                      if c.state is ContainerState.RUNNING)
        return sandbox_totals(sandbox, stats, self._clock.now_ns())
