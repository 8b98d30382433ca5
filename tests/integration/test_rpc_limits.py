"""Long-held calls cannot starve kubelet's (#10 item 12), on a real agent process.

GetContainerEvents streams and StopContainer calls each hold a server thread
for as long as they run. With every stream the agent allows held open, or
StopContainer calls waiting for a guest that ignores ACPI, Version and
ListPodSandbox must still be answered, and the calls beyond the budgets are
refused at once with RESOURCE_EXHAUSTED. The 5 s deadlines below only bound a
call that would otherwise hang: the assertion is that it is answered at all.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import grpc

from agent.api.gen.runtime.v1 import api_pb2 as pb
from tests.integration.agentproc import AgentProcess
from tests.integration.registry_fixture import RunningRegistry
from tests.integration.vmpod import create_pod, purge_domain, push_empty_disk_image, remove_pod

MAX_EVENT_STREAMS = 16  # [server] max_event_streams, default
MAX_CONCURRENT_STOPS = 16  # [server] max_concurrent_stops, default
HUGE = 10**12  # seconds: about 31,700 years


def _wait_done(calls: list[Any], count: int, guard: float = 60) -> list[Any]:
    """The calls that finished, once ``count`` have (a liveness guard, not a timing target)."""
    deadline = time.monotonic() + guard
    while time.monotonic() < deadline:
        done = [c for c in calls if c.done()]
        if len(done) >= count:
            return done
        time.sleep(0.05)
    raise AssertionError(f"only {sum(c.done() for c in calls)} of {len(calls)} calls finished, expected {count}")


def _wait_log(agent: AgentProcess, ready: Any, guard: float = 60) -> None:
    deadline = time.monotonic() + guard
    while time.monotonic() < deadline:
        if ready(agent.log_path.read_text(errors="replace")):
            return
        time.sleep(0.1)
    raise AssertionError(f"the agent's log never showed it:\n{agent.log()}")


def _quick_calls_answer(agent: AgentProcess) -> None:
    assert agent.runtime.Version(pb.VersionRequest(), timeout=5).runtime_name == "podvisor"
    agent.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=5)
    agent.runtime.Status(pb.StatusRequest(), timeout=5)


def test_event_streams_beyond_the_limit_are_refused_and_kubelet_is_answered(running_agent: AgentProcess) -> None:
    # The case: 40 streams. 16 are held, the other 24 refused at once.
    streams = [running_agent.runtime.GetContainerEvents(pb.GetEventsRequest()) for _ in range(40)]
    try:
        refused = _wait_done(streams, 40 - MAX_EVENT_STREAMS)
        for call in refused:
            assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, call.details()
            assert "max_event_streams" in call.details()
        _quick_calls_answer(running_agent)
        # Still held, still full: one more is refused at once.
        one_more = running_agent.runtime.GetContainerEvents(pb.GetEventsRequest())
        assert _wait_done([one_more], 1) == [one_more]
        assert one_more.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert sum(not c.done() for c in streams) == MAX_EVENT_STREAMS
    finally:
        for call in streams:
            call.cancel()
    # The budget comes back as the streams end (each logs its "rpc" line after
    # giving its slot back): the next 16 are held again, the 17th refused.
    _wait_log(running_agent, lambda log: sum(
        'GetContainerEvents"' in line and '"rpc"' in line and "RESOURCE_EXHAUSTED" not in line
        for line in log.splitlines()) >= MAX_EVENT_STREAMS)
    again = [running_agent.runtime.GetContainerEvents(pb.GetEventsRequest()) for _ in range(MAX_EVENT_STREAMS + 1)]
    try:
        refused = _wait_done(again, 1)
        assert [c.code() for c in refused] == [grpc.StatusCode.RESOURCE_EXHAUSTED]
        _quick_calls_answer(running_agent)
        assert sum(not c.done() for c in again) == MAX_EVENT_STREAMS
    finally:
        for call in again:
            call.cancel()


def test_stops_with_a_huge_timeout_do_not_block_version(agent_factory: Any, registry: RunningRegistry,
                                                        tmp_path: Path) -> None:
    agent: AgentProcess = agent_factory().start()
    image = push_empty_disk_image(registry, tmp_path)
    pod = create_pod(agent, image, tmp_path / "logs")
    stops: list[Any] = []
    try:
        agent.runtime.StartContainer(pb.StartContainerRequest(container_id=pod.container_id), timeout=120)
        # The firmware finds nothing to boot and ignores the ACPI button: every
        # stop waits, the first in its grace period, the others for the first.
        request = pb.StopContainerRequest(container_id=pod.container_id, timeout=HUGE)
        stops = [agent.runtime.StopContainer.future(request) for _ in range(40)]
        refused = _wait_done(stops, 40 - MAX_CONCURRENT_STOPS)
        for call in refused:
            assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, call.details()
            assert "max_concurrent_stops" in call.details()
        _quick_calls_answer(agent)
        # The stop is capped, not for ever; end it now: the VM goes down under
        # the waiting stops, which all return.
        subprocess.run(["virsh", "-c", "qemu:///system", "destroy", pod.domain], check=True,
                       capture_output=True, timeout=60)
        _wait_done(stops, 40, guard=120)
        assert all(c.code() in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED) for c in stops)
        assert sum(c.code() == grpc.StatusCode.OK for c in stops) == MAX_CONCURRENT_STOPS
        status = agent.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=pod.container_id),
                                               timeout=10).status
        assert status.state == pb.CONTAINER_EXITED
        assert "stop timeout capped" in agent.log()
        remove_pod(agent, pod)
    finally:
        for call in stops:
            call.cancel()
        purge_domain(pod)
