"""StatsService on the container fakes: which VMs are counted, and the sandbox totals."""

from __future__ import annotations

import dataclasses

import pytest

from agent.domain.errors import NotFound
from agent.domain.sandbox import Sandbox, SandboxFilter, matches
from agent.domain.vm import Container, ContainerState
from agent.services.containers import ContainerFilter, ContainerService, ContainerStats
from agent.services.stats import StatsService, sandbox_totals
from tests.services.container_fakes import (
    OTHER_SANDBOX_ID,
    SANDBOX_ID,
    ContainerFakes,
    FakeSandboxes,
    cspec,
    record,
    sandbox,
)

NOW = 1_700_000_000_000_000_000


class FixedClock:
    def now_ns(self) -> int:
        return NOW


class ListingSandboxes(FakeSandboxes):
    """The two SandboxService calls StatsService makes: get and a filtered list."""

    def list(self, flt: SandboxFilter | None = None) -> list[Sandbox]:
        return [s for s in self.by_id.values() if flt is None or matches(s, flt)]


@pytest.fixture
def fakes() -> ContainerFakes:
    f = ContainerFakes()
    f.sandboxes = ListingSandboxes(*f.sandboxes.by_id.values())
    f.ports = dataclasses.replace(f.ports, sandboxes=f.sandboxes)
    return f


@pytest.fixture
def containers(fakes: ContainerFakes) -> ContainerService:
    return ContainerService(fakes.ports)


@pytest.fixture
def stats(fakes: ContainerFakes, containers: ContainerService) -> StatsService:
    return StatsService(fakes.sandboxes, containers, clock=FixedClock())  # type: ignore[arg-type]


def _two_vms(containers: ContainerService) -> tuple[Container, Container]:
    """A running VM in SANDBOX_ID and a created (not started) one in OTHER_SANDBOX_ID."""
    running = containers.create(cspec())
    containers.start(running.id)
    created = containers.create(cspec(sandbox_id=OTHER_SANDBOX_ID, labels={"app": "db"}))
    return containers.get(running.id), created


def test_container_stats_come_from_libvirt(containers: ContainerService, stats: StatsService) -> None:
    running, _ = _two_vms(containers)
    s = stats.container(running.id[:8])
    assert s.container.id == running.id
    assert (s.cpu_time_ns, s.rss_bytes, s.balloon_bytes, s.writable_bytes) == (5, 6, 7, 4096)


def test_container_stats_of_an_unknown_container(stats: StatsService) -> None:
    with pytest.raises(NotFound):
        stats.container("0" * 64)


def test_listed_container_stats_skip_exited_vms(fakes: ContainerFakes, containers: ContainerService,
                                                stats: StatsService) -> None:
    running, created = _two_vms(containers)
    assert [s.container.id for s in stats.list_containers(ContainerFilter())] == [running.id, created.id]
    assert [s.container.id for s in stats.list_containers(ContainerFilter(label_selector={"app": "db"}))] == [
        created.id]
    fakes.libvirt.set_state(running.domain_name, "shutoff", "shutdown")
    assert [s.container.id for s in stats.list_containers(ContainerFilter())] == [created.id]


def test_sandbox_stats_total_its_running_vm(containers: ContainerService, stats: StatsService) -> None:
    running, _ = _two_vms(containers)
    st = stats.sandbox(SANDBOX_ID)
    assert st.sandbox.id == SANDBOX_ID
    assert (st.at_ns, st.cpu_time_ns, st.rss_bytes) == (NOW, 5, 6)
    assert [s.container.id for s in st.containers] == [running.id]
    # A VM that is not running costs nothing yet.
    other = stats.sandbox(OTHER_SANDBOX_ID)
    assert (other.cpu_time_ns, other.rss_bytes, other.containers) == (0, 0, ())


def test_sandbox_stats_of_an_unknown_sandbox(stats: StatsService) -> None:
    with pytest.raises(NotFound):
        stats.sandbox("0" * 64)


def test_listed_sandbox_stats_follow_the_filter(containers: ContainerService, stats: StatsService) -> None:
    _two_vms(containers)
    assert [s.sandbox.id for s in stats.list_sandboxes(SandboxFilter(id=OTHER_SANDBOX_ID[:4]))] == [
        OTHER_SANDBOX_ID]
    assert len(stats.list_sandboxes(SandboxFilter())) == 3
    assert stats.list_sandboxes(SandboxFilter(label_selector={"app": "web"})) == []


def test_sandbox_totals_add_cpu_and_memory() -> None:
    a = ContainerStats(record("1" * 64, ContainerState.RUNNING), NOW, 10, 100, 0, 0, 0)
    b = ContainerStats(record("2" * 64, ContainerState.RUNNING), NOW, 32, 28, 0, 0, 0)
    total = sandbox_totals(sandbox(), (a, b), NOW + 1)
    assert (total.at_ns, total.cpu_time_ns, total.rss_bytes, total.containers) == (NOW + 1, 42, 128, (a, b))
    assert sandbox_totals(sandbox(), (), NOW).cpu_time_ns == 0
