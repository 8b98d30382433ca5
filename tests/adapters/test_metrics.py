"""The Prometheus adapter on its own: a registry per agent, conventional
names, reconnects counted after the first connection, state read at scrape."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.adapters.metrics import PrometheusMetrics, StateSources
from agent.services.ports import Metrics


def samples(m: PrometheusMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(m.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_it_is_the_services_metrics_port() -> None:
    port: Metrics = PrometheusMetrics()
    port.rpc_done("runtime.v1.RuntimeService", "Version", "OK", 0.001)


def test_two_agents_never_share_series() -> None:
    a, b = PrometheusMetrics(), PrometheusMetrics()
    a.rpc_done("s", "M", "OK", 0.5)
    assert samples(a)[("podvisor_grpc_requests_total", (("code", "OK"), ("method", "M"), ("service", "s")))] == 1
    assert ("podvisor_grpc_requests_total", (("code", "OK"), ("method", "M"), ("service", "s"))) not in samples(b)


def test_reports_land_in_their_series() -> None:
    m = PrometheusMetrics("9.9.9")
    m.vm_started(3.0)
    m.vm_stopped(1.5)
    m.image_pulled(2.0, 1000, ok=True)
    m.image_pulled(0.5, 0, ok=False)
    m.cni_done("ADD", 0.2, True)
    m.cni_done("DEL", 0.1, False)
    got = samples(m)
    assert got[("podvisor_vm_start_duration_seconds_count", ())] == 1
    assert got[("podvisor_vm_start_duration_seconds_sum", ())] == 3.0
    assert got[("podvisor_vm_stop_duration_seconds_sum", ())] == 1.5
    assert got[("podvisor_image_pull_duration_seconds_count", (("result", "success"),))] == 1
    assert got[("podvisor_image_pull_duration_seconds_count", (("result", "failure"),))] == 1
    assert got[("podvisor_image_pull_bytes_total", ())] == 1000
    assert got[("podvisor_cni_duration_seconds_count", (("command", "ADD"),))] == 1
    assert got[("podvisor_cni_failures_total", (("command", "ADD"),))] == 0
    assert got[("podvisor_cni_failures_total", (("command", "DEL"),))] == 1
    assert got[("podvisor_build_info", (("version", "9.9.9"),))] == 1
    assert got[("process_open_fds", ())] > 0


def test_reconnects_count_only_after_a_first_connection() -> None:
    m = PrometheusMetrics()
    m.libvirt_connection(False)  # unreachable at start
    m.libvirt_connection(True)   # the first connection
    assert samples(m)[("podvisor_libvirt_reconnects_total", ())] == 0
    assert samples(m)[("podvisor_libvirt_connected", ())] == 1
    m.libvirt_connection(False)
    assert samples(m)[("podvisor_libvirt_connected", ())] == 0
    m.libvirt_connection(True)
    assert samples(m)[("podvisor_libvirt_reconnects_total", ())] == 1


def test_state_is_read_at_scrape_time() -> None:
    counts = {"ready": 1, "notready": 0}
    m = PrometheusMetrics()
    m.watch(StateSources(sandboxes=lambda: dict(counts), containers=lambda: {"running": 2},
                         image_store=lambda: (4096, 3)))
    assert samples(m)[("podvisor_sandboxes", (("state", "ready"),))] == 1
    counts["ready"] = 5
    got = samples(m)
    assert got[("podvisor_sandboxes", (("state", "ready"),))] == 5
    assert got[("podvisor_containers", (("state", "running"),))] == 2
    assert got[("podvisor_image_store_bytes", ())] == 4096
    assert got[("podvisor_image_store_inodes", ())] == 3


def test_every_name_is_conventional() -> None:
    m = PrometheusMetrics()
    m.watch(StateSources(lambda: {}, lambda: {}, lambda: (0, 0)))
    for family in text_string_to_metric_families(generate_latest(m.registry).decode()):
        assert family.name.startswith(("podvisor_", "process_")), family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
