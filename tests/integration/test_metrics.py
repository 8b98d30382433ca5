"""The Prometheus endpoint of a real agent, scraped over HTTP and parsed with
the Prometheus parser: values follow the calls made; the off switch; and
grpc.health.v1 NOT_SERVING while libvirtd cannot be reached (through a relay
socket the test owns: the machine's libvirtd keeps running)."""

from __future__ import annotations

import socket
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from agent.api.gen.runtime.v1 import api_pb2 as pb
from tests.integration.agentproc import AgentProcess
from tests.integration.libvirt_relay import LibvirtRelay
from tests.integration.metrics_scrape import metrics_port, scrape, value
from tests.integration.test_sandbox_lifecycle import run, sandbox_config

RUNTIME = "runtime.v1.RuntimeService"
SERVICES = ("", "runtime.v1.RuntimeService", "runtime.v1.ImageService")


def test_rpc_counts_and_latencies_follow_the_calls(running_agent: AgentProcess) -> None:
    before = scrape(running_agent)
    n = 7
    for _ in range(n):
        running_agent.runtime.Version(pb.VersionRequest(), timeout=10)
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as err:
            running_agent.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id="f" * 64), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    after = scrape(running_agent)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("podvisor_grpc_requests_total", service=RUNTIME, method="Version", code="OK") == n
    assert delta("podvisor_grpc_request_duration_seconds_count", service=RUNTIME, method="Version", code="OK") == n
    assert delta("podvisor_grpc_request_duration_seconds_sum", service=RUNTIME, method="Version", code="OK") > 0
    assert value(after, "podvisor_grpc_request_duration_seconds_bucket", service=RUNTIME, method="Version",
                 code="OK", le="+Inf") == value(after, "podvisor_grpc_requests_total", service=RUNTIME,
                                                method="Version", code="OK")
    assert delta("podvisor_grpc_requests_total", service=RUNTIME, method="PodSandboxStatus", code="NOT_FOUND") == 2
    assert delta("podvisor_grpc_requests_total", service=RUNTIME, method="PodSandboxStatus", code="OK") == 0
    # The agent itself, and what it knows.
    assert value(after, "process_resident_memory_bytes") > 10 * 1024 * 1024
    assert value(after, "process_open_fds") > 3
    assert value(after, "podvisor_libvirt_connected") == 1
    assert value(after, "podvisor_libvirt_reconnects_total") == 0
    assert value(after, "podvisor_image_store_bytes") > 0
    assert value(after, "podvisor_build_info") == 1


def test_sandboxes_by_state(running_agent: AgentProcess) -> None:
    samples = scrape(running_agent)
    assert value(samples, "podvisor_sandboxes", state="ready") == 0
    ids = [run(running_agent, sandbox_config(f"metrics-{i}")) for i in range(3)]
    samples = scrape(running_agent)
    assert value(samples, "podvisor_sandboxes", state="ready") == 3
    assert value(samples, "podvisor_sandboxes", state="notready") == 0
    running_agent.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=ids[0]), timeout=30)
    samples = scrape(running_agent)
    assert value(samples, "podvisor_sandboxes", state="ready") == 2
    assert value(samples, "podvisor_sandboxes", state="notready") == 1
    running_agent.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=ids[0]), timeout=30)
    samples = scrape(running_agent)
    assert value(samples, "podvisor_sandboxes", state="notready") == 0
    assert value(samples, "podvisor_grpc_requests_total", service=RUNTIME, method="RunPodSandbox", code="OK") == 3
    # No VM was made: every container state reads 0, and each is there.
    states = {s.labels["state"]: s.value for s in samples if s.name == "podvisor_containers"}
    assert states == dict.fromkeys(("creating", "created", "running", "exited", "unknown", "removing"), 0.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_metrics_off_switch(agent_factory: Any) -> None:
    port = _free_port()
    agent: AgentProcess = agent_factory(extra_config=f"[metrics]\nenabled = false\nport = {port}\n").start()
    agent.runtime.Version(pb.VersionRequest(), timeout=10)
    assert '"metrics serving"' not in agent.log()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_a_metrics_port_in_use_stops_the_start_with_a_clear_error(agent_factory: Any) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        agent: AgentProcess = agent_factory(extra_config=f"[metrics]\nport = {port}\n")
        agent.start(wait=False)
        assert agent.wait(60) != 0
    assert f"[metrics]: cannot serve on 127.0.0.1:{port}" in agent.log()


def _health(agent: AgentProcess) -> dict[str, int]:
    return {name: agent.health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
            for name in SERVICES}


def _wait_health(agent: AgentProcess, status: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    seen: dict[str, int] = {}
    while time.monotonic() < deadline:
        seen = _health(agent)
        if set(seen.values()) == {status}:
            return
        time.sleep(0.1)
    raise AssertionError(f"health never became {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}: "
                         f"{seen}\n{agent.log()[-4000:]}")


def test_health_is_not_serving_while_libvirt_is_unreachable(agent_factory: Any) -> None:
    relay = LibvirtRelay(Path(tempfile.mkdtemp(prefix="pv-relay-", dir="/tmp")) / "libvirt-sock")
    relay.open()
    try:
        agent: AgentProcess = agent_factory(extra_config="")
        agent.config_path.write_text(agent.config_path.read_text().replace(
            "[libvirt]\n", f'[libvirt]\nuri = "{relay.uri}"\nvirt_type = "qemu"\n'))
        agent.start()
        _wait_health(agent, health_pb2.HealthCheckResponse.SERVING)
        assert value(scrape(agent), "podvisor_libvirt_connected") == 1

        relay.close()  # libvirtd is gone, as far as this agent can tell
        _wait_health(agent, health_pb2.HealthCheckResponse.NOT_SERVING)
        samples = scrape(agent)
        assert value(samples, "podvisor_libvirt_connected") == 0
        assert value(samples, "podvisor_libvirt_reconnects_total") == 0
        # Still answering: reads work, the runtime says why it is not ready.
        status = agent.runtime.Status(pb.StatusRequest(), timeout=10).status
        assert {c.type: c.status for c in status.conditions}["RuntimeReady"] is False

        relay.open()
        _wait_health(agent, health_pb2.HealthCheckResponse.SERVING)
        samples = scrape(agent)
        assert value(samples, "podvisor_libvirt_connected") == 1
        assert value(samples, "podvisor_libvirt_reconnects_total") == 1
    finally:
        relay.close()
        relay.path.parent.rmdir()


def test_an_agent_started_while_libvirt_is_unreachable_is_not_serving(agent_factory: Any) -> None:
    relay = LibvirtRelay(Path(tempfile.mkdtemp(prefix="pv-relay-", dir="/tmp")) / "libvirt-sock")
    try:
        agent: AgentProcess = agent_factory()
        agent.config_path.write_text(agent.config_path.read_text().replace(
            "[libvirt]\n", f'[libvirt]\nuri = "{relay.uri}"\nvirt_type = "qemu"\n'))
        agent.start()
        _wait_health(agent, health_pb2.HealthCheckResponse.NOT_SERVING)
        assert metrics_port(agent) > 0
        assert value(scrape(agent), "podvisor_libvirt_connected") == 0
        relay.open()
        _wait_health(agent, health_pb2.HealthCheckResponse.SERVING)
        # The first connection is not a re-connection.
        assert value(scrape(agent), "podvisor_libvirt_reconnects_total") == 0
    finally:
        relay.close()
        relay.path.parent.rmdir()
