"""The operator's metrics: Prometheus text format over HTTP (prometheus-client).

One ``PrometheusMetrics`` per agent, with a registry of its own (never the
library's global one, so several agents, or tests, never share series). It
implements the services' ``Metrics`` port (what happens: RPCs, VM starts and
stops, pulls), the CNI observer of the pod network adapter and the libvirt
connection listener; what is counted rather than observed (sandboxes and VMs
by state, the image store's size) is read from the agent's own state when a
scrape comes, through the sources the daemon hands to ``watch``. The HTTP
server runs on its own thread. docs/debugging.md lists every series.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = structlog.get_logger(__name__)

# Seconds: quick RPCs sit in the first buckets, pulls and hard stops in the last.
_RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_VM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_PULL_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
_CNI_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass(frozen=True)
class StateSources:
    """What a scrape reads: state → count for sandboxes and for VM containers,
    and the image store's (bytes, inodes)."""

    sandboxes: Callable[[], Mapping[str, int]]
    containers: Callable[[], Mapping[str, int]]
    image_store: Callable[[], tuple[int, int]]


class _StateCollector(Collector):
    """Gauges computed at scrape time from the agent's state."""

    def __init__(self, sources: StateSources) -> None:
        self._sources = sources

    def collect(self) -> Iterable[GaugeMetricFamily]:
        for name, doc, read in (
            ("podvisor_sandboxes", "Pod sandboxes by state.", self._sources.sandboxes),
            ("podvisor_containers", "VM containers by state.", self._sources.containers),
        ):
            family = GaugeMetricFamily(name, doc, labels=["state"])
            for state, count in sorted(read().items()):
                family.add_metric([state], count)
            yield family
        used, inodes = self._sources.image_store()
        yield GaugeMetricFamily("podvisor_image_store_bytes",
                                "Bytes allocated on disk under the image store (<state_dir>/images).", value=used)
        yield GaugeMetricFamily("podvisor_image_store_inodes", "Inodes used under the image store.", value=inodes)


class PrometheusMetrics:
    """Every podvisor_* series, in a registry of this agent's own."""

    def __init__(self, version: str = "") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._rpcs = Counter("podvisor_grpc_requests", "gRPC calls finished, by service, method and status code.",
                             ["service", "method", "code"], registry=r)
        self._rpc_seconds = Histogram("podvisor_grpc_request_duration_seconds",
                                      "gRPC call duration, by service, method and status code.",
                                      ["service", "method", "code"], buckets=_RPC_BUCKETS, registry=r)
        self._vm_start = Histogram("podvisor_vm_start_duration_seconds",
                                   "StartContainer of a VM, from the call to the RUNNING state.",
                                   buckets=_VM_BUCKETS, registry=r)
        self._vm_stop = Histogram("podvisor_vm_stop_duration_seconds",
                                  "StopContainer of a running VM, from the call to the EXITED state.",
                                  buckets=_VM_BUCKETS, registry=r)
        self._pull_seconds = Histogram("podvisor_image_pull_duration_seconds", "PullImage duration, by result.",
                                       ["result"], buckets=_PULL_BUCKETS, registry=r)
        self._pulled_bytes = Counter("podvisor_image_pull_bytes",
                                     "Bytes of the images pulled (config and layers, as the registry counts them).",
                                     registry=r)
        self._libvirt_up = Gauge("podvisor_libvirt_connected", "1 while the connection to libvirtd is open.",
                                 registry=r)
        self._libvirt_reconnects = Counter("podvisor_libvirt_reconnects",
                                           "Connections to libvirtd re-opened after one was lost.", registry=r)
        self._cni_seconds = Histogram("podvisor_cni_duration_seconds", "CNI ADD and DEL duration, by command.",
                                      ["command"], buckets=_CNI_BUCKETS, registry=r)
        self._cni_failures = Counter("podvisor_cni_failures", "CNI ADD and DEL calls that failed, by command.",
                                     ["command"], registry=r)
        build = Gauge("podvisor_build_info", "Always 1; the agent's version as a label.", ["version"], registry=r)
        build.labels(version).set(1)
        for command in ("ADD", "DEL"):
            self._cni_failures.labels(command)
        # Resident memory, open descriptors, CPU time: process_* as every exporter names them.
        ProcessCollector(registry=r)
        self._rpc_series: dict[tuple[str, str, str], tuple[Counter, Histogram]] = {}
        self._ever_up = False
        self._lock = threading.Lock()
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    # What happens (the services' Metrics port) -----------------------------------

    def rpc_done(self, service: str, method: str, code: str, seconds: float) -> None:
        key = (service, method, code)
        series = self._rpc_series.get(key)
        if series is None:  # the first call of its kind; then a dict lookup, not two labels() calls
            series = self._rpc_series.setdefault(key, (self._rpcs.labels(*key), self._rpc_seconds.labels(*key)))
        series[0].inc()
        series[1].observe(seconds)

    def vm_started(self, seconds: float) -> None:
        self._vm_start.observe(seconds)

    def vm_stopped(self, seconds: float) -> None:
        self._vm_stop.observe(seconds)

    def image_pulled(self, seconds: float, size_bytes: int, ok: bool) -> None:
        self._pull_seconds.labels("success" if ok else "failure").observe(seconds)
        if ok:
            self._pulled_bytes.inc(size_bytes)

    def cni_done(self, command: str, seconds: float, ok: bool) -> None:
        """A CNI ADD or DEL ran (the pod network adapter's observer)."""
        self._cni_seconds.labels(command).observe(seconds)
        if not ok:
            self._cni_failures.labels(command).inc()

    def libvirt_connection(self, up: bool) -> None:
        """The libvirt adapter's connection listener."""
        self._libvirt_up.set(1 if up else 0)
        with self._lock:
            if up and self._ever_up:
                self._libvirt_reconnects.inc()
            self._ever_up = self._ever_up or up

    # What is counted at scrape time ------------------------------------------------

    def watch(self, sources: StateSources) -> None:
        self.registry.register(_StateCollector(sources))

    # The HTTP endpoint ---------------------------------------------------------------

    def serve(self, address: str, port: int) -> int:
        """Serve /metrics on its own thread; the port bound (``port`` 0: an ephemeral one)."""
        self._server, self._thread = start_http_server(port, addr=address, registry=self.registry)
        bound: int = self._server.server_port
        log.info("metrics serving", address=address, port=bound, path="/metrics")
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
