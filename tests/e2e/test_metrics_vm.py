"""Metrics of a real VM pod on a private CNI network (the tiny guest, TCG):
the pull, CNI ADD and DEL, the VM's start and stop, and the state gauges,
scraped over HTTP and parsed with the Prometheus parser."""

from __future__ import annotations

from pathlib import Path

from agent.api.gen.runtime.v1 import api_pb2 as pb
from tests.e2e.conftest import pod_network_agent
from tests.integration.metrics_scrape import scrape, value


def test_a_vm_pods_life_in_the_metrics(tiny_image: str, tmp_path: Path) -> None:
    with pod_network_agent(tmp_path, tiny_image) as (vma, _net):
        agent = vma.agent
        before = scrape(agent)
        assert value(before, "podvisor_cni_duration_seconds_count", command="ADD") == 0
        assert value(before, "podvisor_vm_start_duration_seconds_count") == 0

        vm = vma.create("metrics-vm")  # PullImage, RunPodSandbox (CNI ADD), CreateContainer
        samples = scrape(agent)
        size = agent.images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=tiny_image)),
                                        timeout=30).image.size
        assert value(samples, "podvisor_image_pull_duration_seconds_count", result="success") == 1
        assert value(samples, "podvisor_image_pull_bytes_total") == size > 0
        assert value(samples, "podvisor_cni_duration_seconds_count", command="ADD") == 1
        assert value(samples, "podvisor_cni_duration_seconds_sum", command="ADD") > 0
        assert value(samples, "podvisor_cni_failures_total", command="ADD") == 0
        assert value(samples, "podvisor_sandboxes", state="ready") == 1
        assert value(samples, "podvisor_containers", state="created") == 1

        vma.start(vm)
        samples = scrape(agent)
        assert value(samples, "podvisor_vm_start_duration_seconds_count") == 1
        assert value(samples, "podvisor_vm_start_duration_seconds_sum") > 0
        assert value(samples, "podvisor_containers", state="running") == 1
        assert value(samples, "podvisor_containers", state="created") == 0

        agent.runtime.StopContainer(pb.StopContainerRequest(container_id=vm.container_id, timeout=0), timeout=120)
        samples = scrape(agent)
        assert value(samples, "podvisor_vm_stop_duration_seconds_count") == 1
        assert value(samples, "podvisor_containers", state="exited") == 1

        vma.remove_pod(vm)  # StopPodSandbox, RemovePodSandbox (CNI DEL)
        samples = scrape(agent)
        assert value(samples, "podvisor_cni_duration_seconds_count", command="DEL") >= 1
        assert value(samples, "podvisor_cni_failures_total", command="DEL") == 0
        assert all(s.value == 0 for s in samples if s.name in ("podvisor_sandboxes", "podvisor_containers"))
        assert value(samples, "podvisor_grpc_requests_total", service="runtime.v1.RuntimeService",
                     method="StartContainer", code="OK") == 1
