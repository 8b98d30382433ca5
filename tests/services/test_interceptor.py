"""The API interceptor over a real in-process gRPC server on a unix socket.

The server is assembled by agent.api.server.build (the interceptor and the
descriptor-registered services, as the daemon runs them). The real
RuntimeServicer serves a SandboxService on recording fakes and a
RuntimeInfoService on fake libvirt/CNI/host facts; a switch in the runtime
service makes Version raise any exception, to check the one error → status
mapping and the "rpc" log event.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
from structlog.testing import capture_logs

from agent import __version__
from agent.api import server as api_server
from agent.api.gen.runtime.v1 import api_pb2 as pb
from agent.api.gen.runtime.v1 import api_pb2_grpc
from agent.api.host import HostServicer
from agent.api.images import ImageServicer
from agent.api.runtime_service import RuntimeServicer
from agent.domain import errors
from agent.domain.host import HostFacts
from agent.domain.hypervisor import HypervisorVersions
from agent.domain.network.choice import NetworkChoice
from agent.domain.network.cni import NetworkConfig
from agent.domain.virt import KvmFacts, VirtChoice
from agent.services.containers import ContainerService
from agent.services.images import ImageService
from agent.services.ports import ImagePorts, NoMetrics
from agent.services.runtime import RuntimeInfoService
from agent.services.sandboxes import SandboxService
from agent.services.stats import StatsService
from agent.services.streaming import StreamingService
from tests.services.container_fakes import ContainerFakes
from tests.services.service_fakes import FakePorts

REQUEST_ID = re.compile(r"^[0-9a-f]{16}$")
RUNTIME = "/runtime.v1.RuntimeService/"
TIMEOUT = 10


class FakeLibvirt:
    uri = "qemu:///system"

    def __init__(self) -> None:
        self.up = True

    @property
    def last_error(self) -> str:
        return "" if self.up else "Failed to connect socket to '/run/libvirt/libvirt-sock'"

    def connected(self) -> bool:
        return self.up

    def versions(self) -> HypervisorVersions:
        return HypervisorVersions(library="10.0.0", daemon="10.0.0", hypervisor="8.2.0")


class FixedHost:
    def facts(self) -> HostFacts:
        return HostFacts("hv", "6.1", "cpu", 4, 2**33, 2**32, 2**40, 2**39)

    def node_ip(self) -> str:
        return "192.0.2.10"


class SwitchableRuntime(RuntimeInfoService):
    """The real runtime service whose Version raises ``error`` when set."""

    error: BaseException | None = None

    def version(self) -> dict[str, str]:  # type: ignore[override]
        if self.error is not None:
            raise self.error
        return RuntimeInfoService.version()


class RecordingMetrics(NoMetrics):
    """Records what the interceptor reports for each call."""

    def __init__(self) -> None:
        self.rpcs: list[tuple[str, str, str, float]] = []

    def rpc_done(self, service: str, method: str, code: str, seconds: float) -> None:
        self.rpcs.append((service, method, code, seconds))


@dataclass
class Harness:
    runtime: SwitchableRuntime
    libvirt: FakeLibvirt
    fakes: FakePorts
    sandboxes: SandboxService
    rt: api_pb2_grpc.RuntimeServiceStub
    images: api_pb2_grpc.ImageServiceStub
    metrics: RecordingMetrics


def _no_containers(sandboxes: SandboxService) -> ContainerService:
    """A container service with no VMs over the recording fakes; creating one
    is not exercised here."""
    return ContainerService(dataclasses.replace(ContainerFakes().ports, sandboxes=sandboxes))


class _ZeroClock:
    def now_ns(self) -> int:
        return 0


def _no_image_ports(root: Path) -> ImagePorts:
    """An image service that holds no images; pulling is not exercised here."""
    from agent.adapters.image_files import ImageFiles
    from agent.adapters.layers import DiskExtractor
    from agent.adapters.store import Store

    def unreachable(*_args: object, **_kwargs: object) -> object:
        raise AssertionError("no registry in this test")

    class NoRegistry:
        resolve = fetch_config = fetch_blob = staticmethod(unreachable)

    return ImagePorts(registry=NoRegistry(), store=Store(root / "db"), files=ImageFiles(root),
                      new_extractor=DiskExtractor, inspect_disk=unreachable,  # type: ignore[arg-type]
                      clock=_ZeroClock())


@pytest.fixture(autouse=True)
def _plain_structlog() -> Iterator[None]:
    # Another test may have configured structlog (cached loggers, level filters).
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    # A short directory: unix socket paths are limited to 107 bytes.
    sock = tmp_path_factory.mktemp("grpc") / "podvisor.sock"
    libvirt = FakeLibvirt()
    runtime = SwitchableRuntime(
        libvirt=libvirt,
        cni_lookup=lambda: NetworkChoice(
            "using /etc/cni/net.d/10-podvisor.conflist (network podvisor)",
            NetworkConfig("podvisor", "1.0.0", ("bridge", "portmap")),
            Path("/etc/cni/net.d/10-podvisor.conflist"),
            {"cniVersion": "1.0.0", "name": "podvisor", "plugins": [{"type": "bridge"}, {"type": "portmap"}]},
        ),
        host=FixedHost(),
        virt=VirtChoice("qemu", "no /dev/kvm on this host: using TCG"),
        kvm=KvmFacts(device_present=False, device_usable=False, pvm=False),
        state_dir=Path("/var/lib/podvisor"),
    )
    fakes = FakePorts()
    sandboxes = SandboxService(fakes.ports, fakes.members)
    # The real assembly: ApiInterceptor, services registered from descriptors.
    containers = _no_containers(sandboxes)
    metrics = RecordingMetrics()
    server, _health = api_server.build(
        RuntimeServicer(runtime, sandboxes, "/var/lib/podvisor/sandboxes", containers,
                        StatsService(sandboxes, containers),
                        StreamingService(containers, sandboxes, _NoStreamURLs())),
        ImageServicer(ImageService(_no_image_ports(tmp_path_factory.mktemp("images")),
                                   max_virtual_size=1 << 30), "/var/lib/podvisor/images"),
        HostServicer(runtime),
        workers=4,
        metrics=metrics,
    )
    server.add_insecure_port(f"unix:{sock}")
    server.start()
    channel = grpc.insecure_channel(f"unix:{sock}")
    try:
        yield Harness(runtime, libvirt, fakes, sandboxes,
                      api_pb2_grpc.RuntimeServiceStub(channel),
                      api_pb2_grpc.ImageServiceStub(channel), metrics)
    finally:
        channel.close()
        server.stop(None).wait(5)


def rpc_events(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == "rpc"]


def call_error(fn: Any, request: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as exc_info:
        fn(request, timeout=TIMEOUT)
    return exc_info.value


def run_request(name: str = "vm-1", **labels: str) -> pb.RunPodSandboxRequest:
    return pb.RunPodSandboxRequest(config=pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, namespace="default", uid=f"uid-{name}"),
        hostname=name, labels=labels))


# Domain errors → status codes ---------------------------------------------------------

DOMAIN_ERRORS: list[tuple[errors.PodvisorError, grpc.StatusCode, str]] = [
    (errors.InvalidArgument("config.hostname", "'x_y' is not a valid hostname"),
     grpc.StatusCode.INVALID_ARGUMENT, "config.hostname: 'x_y' is not a valid hostname"),
    (errors.NotFound("pod sandbox 'abc' not found"), grpc.StatusCode.NOT_FOUND,
     "pod sandbox 'abc' not found"),
    (errors.AlreadyExists("sandbox name 'a' is reserved"), grpc.StatusCode.ALREADY_EXISTS,
     "sandbox name 'a' is reserved"),
    (errors.FailedPrecondition("sandbox is not ready"), grpc.StatusCode.FAILED_PRECONDITION,
     "sandbox is not ready"),
    (errors.ResourceExhausted("no space left for the overlay"),
     grpc.StatusCode.RESOURCE_EXHAUSTED, "no space left for the overlay"),
    (errors.Unavailable("libvirt is not reachable"), grpc.StatusCode.UNAVAILABLE,
     "libvirt is not reachable"),
    (errors.Unauthenticated("registry refused the credentials"),
     grpc.StatusCode.UNAUTHENTICATED, "registry refused the credentials"),
    (errors.DeadlineExceeded("guest did not shut down in 30s"),
     grpc.StatusCode.DEADLINE_EXCEEDED, "guest did not shut down in 30s"),
    (errors.Unimplemented("not yet"), grpc.StatusCode.UNIMPLEMENTED, "not yet"),
    (errors.GuestNotReady("SSH on 10.0.0.5:22 does not answer"), grpc.StatusCode.UNAVAILABLE,
     "SSH on 10.0.0.5:22 does not answer"),
    (errors.GuestAgentNotReady("QEMU guest agent is not connected"), grpc.StatusCode.UNAVAILABLE,
     "QEMU guest agent is not connected"),
    (errors.GuestAgentRefused("Failed to execute child process"), grpc.StatusCode.FAILED_PRECONDITION,
     "Failed to execute child process"),
    (errors.Internal("state database is newer than this agent"), grpc.StatusCode.INTERNAL,
     "state database is newer than this agent"),
    (errors.PodvisorError("generic podvisor error"), grpc.StatusCode.INTERNAL,
     "generic podvisor error"),
]


@pytest.mark.parametrize(("error", "code", "details"), DOMAIN_ERRORS,
                         ids=[type(e).__name__ for e, _, _ in DOMAIN_ERRORS])
def test_each_domain_error_maps_to_its_code(harness: Harness, error: errors.PodvisorError,
                                            code: grpc.StatusCode, details: str) -> None:
    harness.runtime.error = error
    with capture_logs() as logs:
        err = call_error(harness.rt.Version, pb.VersionRequest())
    assert err.code() == code
    assert err.details() == details
    [event] = rpc_events(logs)
    assert event["method"] == RUNTIME + "Version"
    assert event["code"] == code.name
    assert event["error"] == details
    assert REQUEST_ID.match(event["request_id"])
    # Domain errors are expected outcomes: no traceback is logged for them.
    assert not [e for e in logs if "exc_info" in e]


def test_every_domain_error_class_is_covered() -> None:
    covered = {type(e) for e, _, _ in DOMAIN_ERRORS}
    defined = {c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, errors.PodvisorError)}
    assert defined == covered


@pytest.mark.parametrize(
    ("error", "level"),
    [
        (errors.InvalidArgument("f", "bad"), "info"),
        (errors.NotFound("gone"), "info"),
        (errors.FailedPrecondition("state"), "info"),
        (errors.Unavailable("down"), "warning"),
        (errors.ResourceExhausted("full"), "warning"),
        (errors.Internal("bug"), "warning"),
    ],
)
def test_client_errors_log_at_info_server_errors_at_warning(
    harness: Harness, error: errors.PodvisorError, level: str
) -> None:
    harness.runtime.error = error
    with capture_logs() as logs:
        call_error(harness.rt.Version, pb.VersionRequest())
    [event] = rpc_events(logs)
    assert event["log_level"] == level


# Unexpected exceptions ------------------------------------------------------------------


def test_unexpected_exception_is_internal_without_traceback(harness: Harness) -> None:
    harness.runtime.error = ZeroDivisionError("secret-detail-42")
    with capture_logs() as logs:
        err = call_error(harness.rt.Version, pb.VersionRequest())
    assert err.code() == grpc.StatusCode.INTERNAL
    details = err.details()
    match = re.fullmatch(r"internal error in podvisor \(request id ([0-9a-f]{16})\)", details)
    assert match, details
    for leak in ("Traceback", "ZeroDivisionError", "secret-detail-42", ".py", "line "):
        assert leak not in details
    request_id = match.group(1)

    # The log has the traceback, under the same request id.
    [crash] = [e for e in logs if e["event"] == "rpc raised an unexpected exception"]
    assert crash["request_id"] == request_id
    assert crash["method"] == RUNTIME + "Version"
    assert isinstance(crash["exc_info"], ZeroDivisionError)
    assert crash["log_level"] == "error"
    [event] = rpc_events(logs)
    assert event["request_id"] == request_id
    assert event["code"] == "INTERNAL"
    assert event["log_level"] == "warning"


def test_server_keeps_serving_after_an_unexpected_exception(harness: Harness) -> None:
    harness.runtime.error = KeyError("boom")
    assert call_error(harness.rt.Version, pb.VersionRequest()).code() == (
        grpc.StatusCode.INTERNAL)
    harness.runtime.error = None
    assert harness.rt.Version(pb.VersionRequest(), timeout=TIMEOUT).runtime_name == "podvisor"


class _NoStreamURLs:
    def url_for(self, request: object) -> str:
        raise AssertionError("no streaming URL is issued in these tests")


# Unimplemented calls ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "request_type", "why"),
    [
        ("ListMetricDescriptors", pb.ListMetricDescriptorsRequest,
         "CRI-provided metrics are not offered; kubelet uses the stats calls"),
        ("UpdatePodSandboxResources", pb.UpdatePodSandboxResourcesRequest,
         "this call is not supported by the VM runtime yet"),
        ("CheckpointContainer", pb.CheckpointContainerRequest,
         "checkpointing VMs is not supported"),
    ],
)
def test_unimplemented_runtime_calls_say_so(harness: Harness, method: str,
                                            request_type: Any, why: str) -> None:
    with capture_logs() as logs:
        err = call_error(getattr(harness.rt, method), request_type())
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED
    assert err.details() == (
        f"runtime.v1.RuntimeService/{method} is not implemented in Podvisor {__version__}: {why}")
    [event] = rpc_events(logs)
    assert event["method"] == RUNTIME + method
    assert event["code"] == "UNIMPLEMENTED"


def test_unimplemented_image_call_says_so(harness: Harness) -> None:
    err = call_error(lambda req, timeout: list(harness.images.StreamImages(req, timeout=timeout)),
                     pb.StreamImagesRequest())
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED
    assert err.details().startswith(
        f"runtime.v1.ImageService/StreamImages is not implemented in Podvisor {__version__}: ")


def test_image_status_of_an_absent_image_is_empty(harness: Harness) -> None:
    resp = harness.images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image="quay.io/x/y:1")),
                                      timeout=5)
    assert not resp.HasField("image")


def test_unimplemented_server_streaming_call(harness: Harness) -> None:
    with capture_logs() as logs:
        stream = harness.images.StreamImages(pb.StreamImagesRequest(), timeout=TIMEOUT)
        with pytest.raises(grpc.RpcError) as exc_info:
            next(iter(stream))
    assert exc_info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert exc_info.value.details().startswith(
        "runtime.v1.ImageService/StreamImages is not implemented in Podvisor")
    [event] = rpc_events(logs)
    assert event["method"] == "/runtime.v1.ImageService/StreamImages"
    assert event["code"] == "UNIMPLEMENTED"


def test_container_events_stream_ends_when_the_client_leaves(harness: Harness) -> None:
    stream = harness.rt.GetContainerEvents(pb.GetEventsRequest(), timeout=1)
    with pytest.raises(grpc.RpcError) as exc_info:
        next(iter(stream))
    assert exc_info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


# The "rpc" log event -----------------------------------------------------------------------


def test_successful_call_logs_one_rpc_event(harness: Harness) -> None:
    with capture_logs() as logs:
        resp = harness.rt.RunPodSandbox(run_request(), timeout=TIMEOUT)
    [event] = rpc_events(logs)
    assert event["method"] == RUNTIME + "RunPodSandbox"
    assert event["code"] == "OK"
    assert REQUEST_ID.match(event["request_id"])
    assert isinstance(event["duration_ms"], float)
    assert 0 <= event["duration_ms"] < TIMEOUT * 1000
    assert event["log_level"] == "info"
    assert "error" not in event
    assert resp.pod_sandbox_id


def test_polled_calls_log_at_debug(harness: Harness) -> None:
    with capture_logs() as logs:
        harness.rt.Version(pb.VersionRequest(), timeout=TIMEOUT)
        harness.rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=TIMEOUT)
    assert [(e["method"], e["log_level"]) for e in rpc_events(logs)] == [
        (RUNTIME + "Version", "debug"), (RUNTIME + "ListPodSandbox", "debug")]


def test_request_ids_are_unique_and_bound_to_handler_logs(harness: Harness) -> None:
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        harness.rt.RunPodSandbox(run_request("a"), timeout=TIMEOUT)
        harness.rt.RunPodSandbox(run_request("b"), timeout=TIMEOUT)
    events = rpc_events(logs)
    assert len({e["request_id"] for e in events}) == 2
    ready = [e for e in logs if e["event"] == "sandbox ready"]
    assert [e["request_id"] for e in ready] == [e["request_id"] for e in events]


# The real servicer through the interceptor -------------------------------------------------


def test_sandbox_lifecycle_over_grpc(harness: Harness) -> None:
    rt = harness.rt
    sid = rt.RunPodSandbox(run_request("web", app="web"), timeout=TIMEOUT).pod_sandbox_id
    other = rt.RunPodSandbox(run_request("db", app="db"), timeout=TIMEOUT).pod_sandbox_id

    status = rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid[:13]),
                                 timeout=TIMEOUT)
    assert status.status.id == sid
    assert status.status.state == pb.SANDBOX_READY
    assert status.status.metadata.name == "web"
    assert status.timestamp > 0
    assert dict(status.info) == {}

    verbose = rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid, verbose=True),
                                  timeout=TIMEOUT)
    assert f'"stateDir": "/var/lib/podvisor/sandboxes/{sid}"' in verbose.info["info"]

    listed = rt.ListPodSandbox(pb.ListPodSandboxRequest(filter=pb.PodSandboxFilter(
        label_selector={"app": "db"})), timeout=TIMEOUT)
    assert [s.id for s in listed.items] == [other]

    rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=TIMEOUT)
    notready = rt.ListPodSandbox(pb.ListPodSandboxRequest(filter=pb.PodSandboxFilter(
        state=pb.PodSandboxStateValue(state=pb.SANDBOX_NOTREADY))), timeout=TIMEOUT)
    assert [s.id for s in notready.items] == [sid]

    rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=TIMEOUT)
    # CRI: stopping or removing what is gone succeeds.
    rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=TIMEOUT)
    rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=TIMEOUT)
    err = call_error(rt.PodSandboxStatus, pb.PodSandboxStatusRequest(pod_sandbox_id=sid))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert sid in err.details()
    assert [s.id for s in rt.ListPodSandbox(pb.ListPodSandboxRequest(),
                                            timeout=TIMEOUT).items] == [other]


def test_stats_calls_over_grpc(harness: Harness) -> None:
    # Sandboxes without VMs: the stats handlers, their filters and their errors end to end.
    rt = harness.rt
    web = rt.RunPodSandbox(run_request("web", app="web"), timeout=TIMEOUT).pod_sandbox_id
    db = rt.RunPodSandbox(run_request("db", app="db"), timeout=TIMEOUT).pod_sandbox_id

    one = rt.PodSandboxStats(pb.PodSandboxStatsRequest(pod_sandbox_id=web[:10]), timeout=TIMEOUT).stats
    assert one.attributes.id == web
    assert dict(one.attributes.labels) == {"app": "web"}
    assert one.linux.cpu.usage_core_nano_seconds.value == 0
    assert one.linux.memory.rss_bytes.value == 0
    assert list(one.linux.containers) == []

    def listed(**flt: Any) -> list[str]:
        req = pb.ListPodSandboxStatsRequest(filter=pb.PodSandboxStatsFilter(**flt)) if flt else \
            pb.ListPodSandboxStatsRequest()
        return sorted(s.attributes.id for s in rt.ListPodSandboxStats(req, timeout=TIMEOUT).stats)

    assert listed() == sorted([web, db])
    assert listed(label_selector={"app": "db"}) == [db]
    assert listed(id=web[:6]) == [web]
    assert listed(id=web, label_selector={"app": "db"}) == []

    assert list(rt.ListContainerStats(pb.ListContainerStatsRequest(), timeout=TIMEOUT).stats) == []
    err = call_error(rt.PodSandboxStats, pb.PodSandboxStatsRequest(pod_sandbox_id="0" * 64))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = call_error(rt.ContainerStats, pb.ContainerStatsRequest(container_id="0" * 64))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = call_error(rt.UpdateContainerResources, pb.UpdateContainerResourcesRequest(
        container_id="0" * 64, linux=pb.LinuxContainerResources(cpu_quota=200_000)))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_bad_requests_over_grpc(harness: Harness) -> None:
    rt = harness.rt
    err = call_error(rt.RunPodSandbox, pb.RunPodSandboxRequest())
    assert (err.code(), err.details()) == (grpc.StatusCode.INVALID_ARGUMENT,
                                           "config: is required")
    err = call_error(rt.RunPodSandbox, run_request(""))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("config.metadata.name: ")
    err = call_error(rt.StopPodSandbox, pb.StopPodSandboxRequest())
    assert (err.code(), err.details()) == (grpc.StatusCode.INVALID_ARGUMENT,
                                           "pod_sandbox_id: is required")

    first = rt.RunPodSandbox(run_request("dup"), timeout=TIMEOUT).pod_sandbox_id
    err = call_error(rt.RunPodSandbox, run_request("dup"))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert first in err.details()


def test_version_and_status_over_grpc(harness: Harness) -> None:
    version = harness.rt.Version(pb.VersionRequest(), timeout=TIMEOUT)
    assert (version.version, version.runtime_name, version.runtime_version,
            version.runtime_api_version) == ("0.1.0", "podvisor", __version__, "v1")

    harness.libvirt.up = False
    status = harness.rt.Status(pb.StatusRequest(verbose=True), timeout=TIMEOUT)
    conds = {c.type: (c.status, c.reason) for c in status.status.conditions}
    assert conds == {"RuntimeReady": (False, "LibvirtUnavailable"), "NetworkReady": (True, "")}
    assert status.info["virtType"] == "qemu"
    assert [h.name for h in status.runtime_handlers] == ["", "podvisor"]


# Metrics ---------------------------------------------------------------------------------


def test_every_call_is_reported_with_its_service_method_and_code(harness: Harness) -> None:
    harness.rt.Version(pb.VersionRequest(), timeout=TIMEOUT)
    call_error(harness.rt.PodSandboxStatus, pb.PodSandboxStatusRequest(pod_sandbox_id="nope"))
    harness.runtime.error = RuntimeError("boom")
    call_error(harness.rt.Version, pb.VersionRequest())
    got = [(service, method, code) for service, method, code, _ in harness.metrics.rpcs]
    assert got == [("runtime.v1.RuntimeService", "Version", "OK"),
                   ("runtime.v1.RuntimeService", "PodSandboxStatus", "NOT_FOUND"),
                   ("runtime.v1.RuntimeService", "Version", "INTERNAL")]
    assert all(seconds >= 0 for *_, seconds in harness.metrics.rpcs)
