"""Every converter pair of agent/api/convert/, in and out, against golden files.

As in Virtlet's conversion tests, each case feeds one full input through one
converter and compares the rendering of input and output with
``golden/<resource>/<case>.txt``: protobuf messages in text format, model
values pretty-printed, errors as their class and message. Any change of a
converter's output fails here; inspect the diff, then regenerate with
``UPDATE_GOLDEN=1``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import text_format
from google.protobuf.message import Message

from agent.api.convert import containers, host, images, runtime_info, sandboxes
from agent.api.gen.runtime.v1 import api_pb2 as pb
from agent.domain.errors import PodvisorError
from agent.domain.host import HostFacts
from agent.domain.image import BaseDisk, Image
from agent.domain.sandbox import DNSConfig, Metadata, NetworkMode, PortMapping, Sandbox, SandboxSpec, SandboxState
from agent.domain.virt import KvmFacts, VirtChoice
from agent.domain.vm import Container, ContainerState
from agent.domain.volumes import Mount, Propagation, Share
from agent.services.containers import ContainerEvent, ContainerStats
from agent.services.runtime import Condition, HostInfo, RuntimeStatus
from agent.services.stats import SandboxStats

GOLDEN_DIR = Path(__file__).parent / "golden"
UPDATE_GOLDEN = os.environ.get("UPDATE_GOLDEN") == "1"

SANDBOX_ID = "5b" * 32
CONTAINER_ID = "c0" * 32
IMAGE_ID = "sha256:" + "1d" * 32


# Values ------------------------------------------------------------------------------


def _sandbox(state: SandboxState = SandboxState.READY, mode: NetworkMode = NetworkMode.POD) -> Sandbox:
    spec = SandboxSpec(
        metadata=Metadata("web-0", "shop", "uid-7", 2),
        hostname="web-0",
        log_directory="/var/log/pods/shop_web-0_uid-7",
        dns=DNSConfig(("10.96.0.10",), ("shop.svc.cluster.local", "cluster.local"), ("ndots:5",)),
        port_mappings=(PortMapping("tcp", 80, 8080, "127.0.0.1"), PortMapping("udp", 53, 5353)),
        labels={"app": "web", "tier": "front"},
        annotations={"podvisor.io/vcpus": "2", "note": "x"},
        runtime_handler="podvisor",
        network_mode=mode,
        cgroup_parent="/kubepods/burstable/poduid-7",
    )
    return Sandbox(id=SANDBOX_ID, spec=spec, state=state, created_at_ns=1_700_000_000_000_000_001,
                   stopped_at_ns=1_700_000_100_000_000_000 if state is SandboxState.NOTREADY else 0,
                   ip="10.88.0.5", additional_ips=("fd00::5",))


def _container(state: ContainerState = ContainerState.RUNNING) -> Container:
    d = f"/var/lib/podvisor/sandboxes/{SANDBOX_ID}/containers/{CONTAINER_ID}"
    exited = state is ContainerState.EXITED
    return Container(
        id=CONTAINER_ID, sandbox_id=SANDBOX_ID, name="vm", attempt=1, image="registry.example/vm/cirros:0.6",
        image_id=IMAGE_ID, state=state, created_at_ns=1_700_000_000_100_000_000,
        domain_name=f"podvisor-{CONTAINER_ID}", directory=d, overlay_path=f"{d}/disk.qcow2",
        seed_path=f"{d}/cloudinit.iso", console_log=f"{d}/console.log",
        serial_socket=f"/run/podvisor/{CONTAINER_ID[:12]}.serial",
        log_path="/var/log/pods/shop_web-0_uid-7/vm/1.log", vcpus=3, max_vcpus=8,
        memory_bytes=1 << 30, max_memory_bytes=4 << 30, cpu_shares=512, firmware="uefi",
        started_at_ns=1_700_000_000_200_000_000,
        finished_at_ns=1_700_000_000_900_000_000 if exited else 0,
        exit_code=137 if exited else 0, reason="Killed" if exited else "",
        message="the VM was destroyed" if exited else "",
        labels={"io.kubernetes.container.name": "vm"}, annotations={"podvisor.io/firmware": "uefi"},
    )


def _container_stats() -> ContainerStats:
    return ContainerStats(_container(), at_ns=1_700_000_001_000_000_000, cpu_time_ns=42_000_000_000,
                          rss_bytes=700 << 20, balloon_bytes=1 << 30, guest_available_bytes=300 << 20,
                          writable_bytes=96 << 20)


def _image(user: str = "1000:1000") -> Image:
    return Image(
        id=IMAGE_ID, manifest_digest="sha256:" + "4d" * 32,
        repo_tags=("registry.example/vm/cirros:0.6",),
        repo_digests=("registry.example/vm/cirros@sha256:" + "4d" * 32,),
        size=21_000_000, layers=("sha256:" + "1a" * 32, "sha256:" + "2a" * 32),
        config_media_type="application/vnd.oci.image.config.v1+json", user=user,
        disks=(BaseDisk("/disk/cirros.qcow2", "cirros.qcow2", "qcow2", 117_440_512, 21_000_000),),
        created_at_ns=1_690_000_000_000_000_000,
    )


STATUS = RuntimeStatus(
    conditions=(Condition("RuntimeReady", True),
                Condition("NetworkReady", False, "NetworkPluginNotReady", "no valid CNI config")),
    info={"virtType": "kvm", "libvirt": {"uri": "qemu:///system", "connected": True, "qemu": "8.2.0"},
          "cni": {"config": "", "message": "no valid CNI config"}},
)

HOST = HostInfo(
    virt=VirtChoice("kvm", "/dev/kvm is usable"),
    kvm=KvmFacts(device_present=True, device_usable=True, pvm=False),
    libvirt_uri="qemu:///system", libvirt_connected=True, libvirt_library="10.0.0",
    libvirt_daemon="10.0.1", qemu="8.2.0",
    host=HostFacts(hostname="hv1", kernel_release="6.1.0-18-amd64", cpu_model="AMD EPYC 9654", cpus=192,
                   memory_total_bytes=2**40, memory_available_bytes=2**39, disk_total_bytes=10**13,
                   disk_free_bytes=10**12),
    state_dir=Path("/var/lib/podvisor"), agent_version="0.0.0-golden",
)


def _run_request() -> pb.RunPodSandboxRequest:
    return pb.RunPodSandboxRequest(runtime_handler="podvisor", config=pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name="web-0", namespace="shop", uid="uid-7", attempt=2),
        hostname="web-0",
        log_directory="/var/log/pods/shop_web-0_uid-7",
        dns_config=pb.DNSConfig(servers=["10.96.0.10"], searches=["shop.svc.cluster.local", "cluster.local"],
                                options=["ndots:5"]),
        port_mappings=[pb.PortMapping(protocol=pb.TCP, container_port=80, host_port=8080, host_ip="127.0.0.1"),
                       pb.PortMapping(protocol=pb.UDP, container_port=53, host_port=5353),
                       pb.PortMapping(protocol=pb.SCTP, container_port=9)],
        labels={"app": "web", "tier": "front"},
        annotations={"podvisor.io/vcpus": "2", "note": "x"},
        linux=pb.LinuxPodSandboxConfig(
            cgroup_parent="/kubepods/burstable/poduid-7",
            sysctls={"net.ipv4.ip_unprivileged_port_start": "0", "kernel.shm_rmid_forced": "1"},
            security_context=pb.LinuxSandboxSecurityContext(
                namespace_options=pb.NamespaceOption(network=pb.POD, pid=pb.CONTAINER, ipc=pb.POD))),
    ))


def _volume_request(mounts: list[pb.Mount] | None = None,
                    devices: list[pb.Device] | None = None) -> pb.CreateContainerRequest:
    return pb.CreateContainerRequest(pod_sandbox_id="5b", config=pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name="vm"), mounts=mounts or [], devices=devices or []))


def _create_request() -> pb.CreateContainerRequest:
    return pb.CreateContainerRequest(
        pod_sandbox_id=SANDBOX_ID,
        config=pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name="vm", attempt=1),
            image=pb.ImageSpec(image="registry.example/vm/cirros:0.6"),
            command=["/bin/sh", "-c"], args=["echo hello"],
            envs=[pb.KeyValue(key="GREETING", value="grüß dich".encode()), pb.KeyValue(key="EMPTY", value=b"")],
            labels={"io.kubernetes.container.name": "vm"},
            annotations={"podvisor.io/firmware": "uefi"},
            log_path="vm/1.log",
            mounts=[pb.Mount(container_path="/dev/termination-log", host_path="/var/lib/kubelet/x"),
                    pb.Mount(container_path="/etc/config/", host_path="/var/lib/kubelet/cm", readonly=True,
                             propagation=pb.PROPAGATION_HOST_TO_CONTAINER)],
            devices=[pb.Device(container_path="/dev/xvda", host_path="/dev/loop7", permissions="r")],
            linux=pb.LinuxContainerConfig(resources=pb.LinuxContainerResources(
                memory_limit_in_bytes=1 << 30, cpu_quota=250_000, cpu_period=100_000, cpu_shares=512)),
        ),
        sandbox_config=_run_request().config,
    )


# Cases --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    resource: str
    name: str
    convert: Callable[..., Any]
    inputs: tuple[Any, ...]

    @property
    def golden(self) -> Path:
        return GOLDEN_DIR / self.resource / f"{self.name}.txt"


def _bad_env_request() -> pb.CreateContainerRequest:
    req = _create_request()
    req.config.envs.add(key="", value=b"x")
    return req


def _non_utf8_env_request() -> pb.CreateContainerRequest:
    req = _create_request()
    req.config.envs.add(key="BINARY", value=b"\xff")
    return req


def _bad_protocol_request() -> pb.RunPodSandboxRequest:
    req = _run_request()
    req.config.port_mappings.add(protocol=7, container_port=81)
    return req


_EVENT = ContainerEvent(CONTAINER_ID, SANDBOX_ID, "started", 1_700_000_000_200_000_001)

CASES = (
    # sandboxes
    Case("sandboxes", "spec_from_full_request", sandboxes.sandbox_spec_from_pb, (_run_request(),)),
    Case("sandboxes", "spec_from_minimal_request", sandboxes.sandbox_spec_from_pb, (pb.RunPodSandboxRequest(
        config=pb.PodSandboxConfig(metadata=pb.PodSandboxMetadata(name="a", namespace="b", uid="c"))),)),
    Case("sandboxes", "spec_host_network", sandboxes.sandbox_spec_from_pb, (pb.RunPodSandboxRequest(
        config=pb.PodSandboxConfig(metadata=pb.PodSandboxMetadata(name="a", namespace="b", uid="c"),
                                   linux=pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(
                                       namespace_options=pb.NamespaceOption(network=pb.NODE))))),)),
    Case("sandboxes", "spec_without_config", sandboxes.sandbox_spec_from_pb, (pb.RunPodSandboxRequest(),)),
    Case("sandboxes", "spec_unknown_protocol", sandboxes.sandbox_spec_from_pb, (_bad_protocol_request(),)),
    Case("sandboxes", "filter_absent", sandboxes.sandbox_filter_from_pb, (pb.ListPodSandboxRequest(),)),
    Case("sandboxes", "filter_full", sandboxes.sandbox_filter_from_pb, (pb.ListPodSandboxRequest(
        filter=pb.PodSandboxFilter(id="5b5b", state=pb.PodSandboxStateValue(state=pb.SANDBOX_NOTREADY),
                                   label_selector={"app": "web", "tier": "front"})),)),
    Case("sandboxes", "stats_filter", sandboxes.sandbox_stats_filter_from_pb, (pb.ListPodSandboxStatsRequest(
        filter=pb.PodSandboxStatsFilter(id="5b", label_selector={"app": "web"})),)),
    Case("sandboxes", "stats_filter_absent", sandboxes.sandbox_stats_filter_from_pb,
         (pb.ListPodSandboxStatsRequest(),)),
    Case("sandboxes", "sandbox", sandboxes.sandbox_to_pb, (_sandbox(),)),
    Case("sandboxes", "status_ready", sandboxes.sandbox_status_to_pb, (_sandbox(),)),
    Case("sandboxes", "status_notready_host_network", sandboxes.sandbox_status_to_pb,
         (_sandbox(SandboxState.NOTREADY, NetworkMode.NODE),)),
    Case("sandboxes", "verbose_info", sandboxes.sandbox_verbose_info,
         (_sandbox(), f"/var/lib/podvisor/sandboxes/{SANDBOX_ID}")),
    Case("sandboxes", "stats", sandboxes.sandbox_stats_to_pb, (SandboxStats(
        _sandbox(), at_ns=1_700_000_002_000_000_000, cpu_time_ns=42_000_000_000, rss_bytes=700 << 20,
        containers=(_container_stats(),)),)),
    Case("sandboxes", "stats_no_vm", sandboxes.sandbox_stats_to_pb, (SandboxStats(
        _sandbox(), at_ns=1_700_000_002_000_000_000, cpu_time_ns=0, rss_bytes=0, containers=()),)),
    # containers
    Case("containers", "spec_from_config", containers.container_spec_from_pb, (_create_request(),)),
    Case("containers", "spec_env_without_key", containers.container_spec_from_pb, (_bad_env_request(),)),
    Case("containers", "spec_env_not_utf8", containers.container_spec_from_pb, (_non_utf8_env_request(),)),
    Case("containers", "spec_mount_relative", containers.container_spec_from_pb, (_volume_request(
        mounts=[pb.Mount(container_path="data", host_path="/srv/data")]),)),
    Case("containers", "spec_mount_dotdot", containers.container_spec_from_pb, (_volume_request(
        mounts=[pb.Mount(container_path="/a/../etc", host_path="/srv/data")]),)),
    Case("containers", "spec_mount_no_host_path", containers.container_spec_from_pb, (_volume_request(
        mounts=[pb.Mount(container_path="/data")]),)),
    Case("containers", "spec_mount_twice", containers.container_spec_from_pb, (_volume_request(
        mounts=[pb.Mount(container_path="/data", host_path="/srv/a"),
                pb.Mount(container_path="/data/", host_path="/srv/b")]),)),
    Case("containers", "spec_device_bad_permissions", containers.container_spec_from_pb, (_volume_request(
        devices=[pb.Device(container_path="/dev/xvdb", host_path="/dev/loop3", permissions="rx")]),)),
    Case("containers", "spec_without_sandbox", containers.container_spec_from_pb,
         (pb.CreateContainerRequest(config=pb.ContainerConfig()),)),
    Case("containers", "filter_absent", containers.container_filter_from_pb, (pb.ListContainersRequest(),)),
    Case("containers", "filter_full", containers.container_filter_from_pb, (pb.ListContainersRequest(
        filter=pb.ContainerFilter(id="c0c0", pod_sandbox_id="5b", label_selector={"app": "web"},
                                  state=pb.ContainerStateValue(state=pb.CONTAINER_RUNNING))),)),
    Case("containers", "stats_filter", containers.container_stats_filter_from_pb, (pb.ListContainerStatsRequest(
        filter=pb.ContainerStatsFilter(id="c0", pod_sandbox_id="5b", label_selector={"app": "web"})),)),
    Case("containers", "resources", containers.resources_from_pb, (pb.UpdateContainerResourcesRequest(
        container_id=CONTAINER_ID, linux=pb.LinuxContainerResources(
            memory_limit_in_bytes=2 << 30, cpu_quota=150_000, cpu_period=50_000)),)),
    Case("containers", "resources_default_period", containers.resources_from_pb,
         (pb.UpdateContainerResourcesRequest(linux=pb.LinuxContainerResources(cpu_quota=150_000)),)),
    Case("containers", "resources_unlimited", containers.resources_from_pb,
         (pb.UpdateContainerResourcesRequest(linux=pb.LinuxContainerResources(cpu_quota=-1)),)),
    Case("containers", "container", containers.container_to_pb, (_container(),)),
    Case("containers", "status_running", containers.container_status_to_pb, (_container(),)),
    Case("containers", "status_exited", containers.container_status_to_pb, (_container(ContainerState.EXITED),)),
    Case("containers", "status_with_mounts", containers.container_status_to_pb, (dataclasses.replace(
        _container(), shares=(
            Share(Mount("/etc/config", "/var/lib/kubelet/pods/u/volumes/kubernetes.io~configmap/cfg", readonly=True,
                        propagation=Propagation.HOST_TO_CONTAINER), "0", True),
            Share(Mount("/dev/termination-log", "/var/lib/kubelet/pods/u/containers/vm/abc"), "1", False))),)),
    Case("containers", "status_creating", containers.container_status_to_pb,
         (_container(ContainerState.CREATING),)),
    Case("containers", "verbose_info", containers.container_verbose_info, (_container(), "<domain/>")),
    Case("containers", "stats", containers.container_stats_to_pb, (_container_stats(),)),
    Case("containers", "cpu_usage", containers.cpu_usage_to_pb, (1_700_000_001_000_000_000, 42_000_000_000)),
    Case("containers", "memory_usage", containers.memory_usage_to_pb, (1_700_000_001_000_000_000, 700 << 20)),
    Case("containers", "memory_usage_available", containers.memory_usage_to_pb,
         (1_700_000_001_000_000_000, 700 << 20, 0)),
    Case("containers", "event", containers.container_event_to_pb,
         (_EVENT, sandboxes.sandbox_status_to_pb(_sandbox()), containers.container_status_to_pb(_container()))),
    Case("containers", "event_deleted", containers.container_event_to_pb,
         (ContainerEvent(CONTAINER_ID, SANDBOX_ID, "deleted", 7), None, None)),
    # images
    Case("images", "filter", images.image_filter_from_pb, (pb.ListImagesRequest(
        filter=pb.ImageFilter(image=pb.ImageSpec(image="registry.example/vm/cirros:0.6"))),)),
    Case("images", "filter_absent", images.image_filter_from_pb, (pb.ListImagesRequest(),)),
    Case("images", "image_numeric_user", images.image_to_pb, (_image(),)),
    Case("images", "image_named_user", images.image_to_pb, (_image("nobody:nogroup"),)),
    Case("images", "image_no_user", images.image_to_pb, (_image(""),)),
    Case("images", "verbose_info", images.image_verbose_info,
         (_image(), {"cirros.qcow2": f"/var/lib/podvisor/images/disks/{IMAGE_ID[7:]}/cirros.qcow2"})),
    Case("images", "registry_auth", images.registry_auth_from_pb, (pb.AuthConfig(
        username="puller", password="golden-password", auth="cHVsbGVyOmdvbGRlbi1wYXNzd29yZA==",
        server_address="registry.example", identity_token="id-token", registry_token="reg-token"),)),
    Case("images", "registry_auth_empty", images.registry_auth_from_pb, (pb.AuthConfig(),)),
    Case("images", "fs_usage", images.image_fs_usage_to_pb,
         ("/var/lib/podvisor/images", 21_000_000, 12, 1_700_000_003_000_000_000)),
    # runtime info
    Case("runtime_info", "version", runtime_info.version_to_pb, ({
        "version": "0.1.0", "runtime_name": "podvisor", "runtime_version": "0.0.0-golden",
        "runtime_api_version": "v1"},)),
    Case("runtime_info", "status", runtime_info.status_to_pb, (STATUS, False, ("", "podvisor"))),
    Case("runtime_info", "status_verbose", runtime_info.status_to_pb, (STATUS, True, ("", "podvisor"))),
    # podvisor.v1
    Case("host", "host_info", host.host_info_to_pb, (HOST,)),
)


# Rendering ------------------------------------------------------------------------------


def render(value: Any) -> str:
    """One value as stable text: messages in protobuf text format, the rest pretty-printed."""
    if isinstance(value, Message):
        return f"{value.DESCRIPTOR.full_name} {{\n{text_format.MessageToString(value, as_utf8=True, indent=2)}}}"
    if isinstance(value, str):
        return value
    return _python(value, "")


def _python(value: Any, indent: str) -> str:
    """Model values one field a line, mappings sorted by key (repr alone keeps insertion order)."""
    inner = indent + "  "
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = [f"{inner}{f.name}={_python(getattr(value, f.name), inner)}," for f in dataclasses.fields(value)]
        return "\n".join([f"{type(value).__name__}(", *fields, f"{indent})"])
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k!r}: {_python(v, inner)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, tuple) and value:
        return "(\n" + "".join(f"{inner}{_python(v, inner)},\n" for v in value) + f"{indent})"
    return repr(value)


def render_case(case: Case) -> str:
    parts = [f"# {case.convert.__module__}.{case.convert.__name__}"]
    for i, value in enumerate(case.inputs):
        parts.append(f"# input {i}\n{render(value)}")
    try:
        out = render(case.convert(*case.inputs))
    except PodvisorError as exc:
        out = f"raises {type(exc).__name__}: {exc.message}"
    parts.append(f"# output\n{out}")
    return "\n".join(parts) + "\n"


@pytest.mark.parametrize("case", CASES, ids=[f"{c.resource}/{c.name}" for c in CASES])
def test_converter_matches_golden_file(case: Case) -> None:
    text = render_case(case)
    if UPDATE_GOLDEN:
        case.golden.parent.mkdir(parents=True, exist_ok=True)
        case.golden.write_text(text)
    assert case.golden.exists(), f"no golden file {case.golden}; run with UPDATE_GOLDEN=1"
    assert text == case.golden.read_text(), f"{case.golden} differs; inspect, then regenerate with UPDATE_GOLDEN=1"


def test_no_golden_file_without_a_case() -> None:
    known = {c.golden for c in CASES}
    assert len(known) == len(CASES), "two cases share a golden file"
    stale = sorted(str(p) for p in GOLDEN_DIR.rglob("*.txt") if p not in known)
    assert not stale, f"golden files without a case: {stale}"


def test_every_converter_has_a_golden_case() -> None:
    covered = {c.convert for c in CASES}
    for module in (containers, host, images, runtime_info, sandboxes):
        public = {getattr(module, n) for n in dir(module)
                  if n.endswith(("_to_pb", "_from_pb", "_verbose_info")) and not n.startswith("_")
                  and getattr(module, n).__module__ == module.__name__}
        missing = sorted(f.__name__ for f in public - covered)
        assert not missing, f"{module.__name__}: no golden case for {missing}"
