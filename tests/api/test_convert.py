"""Pure protobuf ↔ model conversions (agent.api.convert): sandboxes, runtime info, host, wire."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent import __version__
from agent.api.convert import host, runtime_info, sandboxes, wire
from agent.api.gen.runtime.v1 import api_pb2 as pb
from agent.domain.errors import InvalidArgument
from agent.domain.host import HostFacts
from agent.domain.sandbox import (
    DNSConfig,
    Metadata,
    NetworkMode,
    PortMapping,
    Sandbox,
    SandboxFilter,
    SandboxSpec,
    SandboxState,
)
from agent.domain.virt import KvmFacts, VirtChoice
from agent.services.runtime import Condition, HostInfo, RuntimeInfoService, RuntimeStatus


def run_request(**config_fields: object) -> pb.RunPodSandboxRequest:
    config = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name="vm-1", namespace="default", uid="u-1", attempt=3),
        **config_fields,
    )
    return pb.RunPodSandboxRequest(config=config, runtime_handler="podvisor")


# sandbox_spec_from_pb ------------------------------------------------------------


def test_full_request_converts() -> None:
    req = run_request(
        hostname="vm-1",
        log_directory="/var/log/pods/default_vm-1_u-1",
        dns_config=pb.DNSConfig(servers=["10.96.0.10"], searches=["svc.cluster.local"],
                                options=["ndots:5"]),
        port_mappings=[
            pb.PortMapping(protocol=pb.TCP, container_port=80, host_port=8080,
                           host_ip="127.0.0.1"),
            pb.PortMapping(protocol=pb.UDP, container_port=53, host_port=5353),
            pb.PortMapping(protocol=pb.SCTP, container_port=9, host_port=0),
        ],
        labels={"app": "web"},
        annotations={"podvisor.io/vcpus": "2"},
        linux=pb.LinuxPodSandboxConfig(cgroup_parent="/kubepods/pod-u-1"),
    )
    spec = sandboxes.sandbox_spec_from_pb(req)
    assert spec == SandboxSpec(
        metadata=Metadata("vm-1", "default", "u-1", 3),
        hostname="vm-1",
        log_directory="/var/log/pods/default_vm-1_u-1",
        dns=DNSConfig(("10.96.0.10",), ("svc.cluster.local",), ("ndots:5",)),
        port_mappings=(
            PortMapping("tcp", 80, 8080, "127.0.0.1"),
            PortMapping("udp", 53, 5353, ""),
            PortMapping("sctp", 9, 0, ""),
        ),
        labels={"app": "web"},
        annotations={"podvisor.io/vcpus": "2"},
        runtime_handler="podvisor",
        network_mode=NetworkMode.POD,
        cgroup_parent="/kubepods/pod-u-1",
    )
    # Plain Python containers, not protobuf views.
    assert type(spec.labels) is dict
    assert type(spec.annotations) is dict


def test_minimal_request_converts_to_defaults() -> None:
    spec = sandboxes.sandbox_spec_from_pb(run_request())
    assert spec.metadata == Metadata("vm-1", "default", "u-1", 3)
    assert spec.hostname == ""
    assert spec.dns == DNSConfig()
    assert spec.port_mappings == ()
    assert spec.network_mode is NetworkMode.POD


def test_missing_config_is_invalid() -> None:
    with pytest.raises(InvalidArgument) as exc_info:
        sandboxes.sandbox_spec_from_pb(pb.RunPodSandboxRequest())
    assert exc_info.value.field == "config"
    assert exc_info.value.message == "config: is required"


def test_missing_metadata_is_invalid() -> None:
    req = pb.RunPodSandboxRequest(config=pb.PodSandboxConfig(hostname="x"))
    with pytest.raises(InvalidArgument) as exc_info:
        sandboxes.sandbox_spec_from_pb(req)
    assert exc_info.value.field == "config.metadata"


def _with_network(mode: int) -> pb.RunPodSandboxRequest:
    return run_request(linux=pb.LinuxPodSandboxConfig(
        security_context=pb.LinuxSandboxSecurityContext(
            namespace_options=pb.NamespaceOption(network=mode))))


def test_node_network_mode() -> None:
    assert sandboxes.sandbox_spec_from_pb(_with_network(pb.NODE)).network_mode is NetworkMode.NODE
    assert sandboxes.sandbox_spec_from_pb(_with_network(pb.POD)).network_mode is NetworkMode.POD


@pytest.mark.parametrize("mode", [pb.CONTAINER, pb.TARGET])
def test_other_network_modes_are_invalid(mode: int) -> None:
    with pytest.raises(InvalidArgument) as exc_info:
        sandboxes.sandbox_spec_from_pb(_with_network(mode))
    assert exc_info.value.field == "config.linux.security_context.namespace_options.network"


@pytest.mark.parametrize(("protocol", "name"), [(pb.TCP, "tcp"), (pb.UDP, "udp"),
                                                (pb.SCTP, "sctp")])
def test_port_mapping_protocols(protocol: int, name: str) -> None:
    req = run_request(port_mappings=[pb.PortMapping(protocol=protocol, container_port=1)])
    assert sandboxes.sandbox_spec_from_pb(req).port_mappings[0].protocol == name


def test_unknown_port_protocol_is_invalid() -> None:
    req = run_request(port_mappings=[
        pb.PortMapping(protocol=pb.TCP, container_port=80),
        pb.PortMapping(protocol=7, container_port=81),
    ])
    with pytest.raises(InvalidArgument) as exc_info:
        sandboxes.sandbox_spec_from_pb(req)
    assert exc_info.value.field == "config.port_mappings[1].protocol"
    assert "7" in exc_info.value.message


# Sandbox → protobuf ------------------------------------------------------------------


def make_sandbox(state: SandboxState = SandboxState.READY,
                 mode: NetworkMode = NetworkMode.POD) -> Sandbox:
    spec = SandboxSpec(
        metadata=Metadata("vm-1", "default", "u-1", 2),
        hostname="vm-1",
        log_directory="/var/log/pods/x",
        dns=DNSConfig(("10.96.0.10",), ("cluster.local",), ("ndots:2",)),
        port_mappings=(PortMapping("udp", 53, 5353, "127.0.0.1"),),
        labels={"app": "web"},
        annotations={"note": "x"},
        runtime_handler="podvisor",
        network_mode=mode,
        cgroup_parent="/kubepods",
    )
    return Sandbox(id="c" * 64, spec=spec, state=state, created_at_ns=1_700_000_000_000_000_001,
                   stopped_at_ns=42, ip="10.88.0.5", additional_ips=("fd00::5",))


def test_sandbox_to_pb() -> None:
    msg = sandboxes.sandbox_to_pb(make_sandbox())
    assert msg.id == "c" * 64
    assert msg.metadata == pb.PodSandboxMetadata(name="vm-1", namespace="default", uid="u-1",
                                                 attempt=2)
    assert msg.state == pb.SANDBOX_READY
    assert msg.created_at == 1_700_000_000_000_000_001
    assert dict(msg.labels) == {"app": "web"}
    assert dict(msg.annotations) == {"note": "x"}
    assert msg.runtime_handler == "podvisor"


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (SandboxState.READY, pb.SANDBOX_READY),
        (SandboxState.NOTREADY, pb.SANDBOX_NOTREADY),
        (SandboxState.REMOVING, pb.SANDBOX_NOTREADY),
        (SandboxState.CREATING, pb.SANDBOX_NOTREADY),
    ],
)
def test_states_map_to_cri(state: SandboxState, expected: int) -> None:
    sb = make_sandbox(state)
    assert sandboxes.sandbox_to_pb(sb).state == expected
    assert sandboxes.sandbox_status_to_pb(sb).state == expected


def test_sandbox_status_to_pb() -> None:
    st = sandboxes.sandbox_status_to_pb(make_sandbox(SandboxState.NOTREADY))
    assert st.id == "c" * 64
    assert st.metadata.name == "vm-1"
    assert st.metadata.attempt == 2
    assert st.state == pb.SANDBOX_NOTREADY
    assert st.created_at == 1_700_000_000_000_000_001
    assert st.network.ip == "10.88.0.5"
    assert [ip.ip for ip in st.network.additional_ips] == ["fd00::5"]
    assert st.linux.namespaces.options.network == pb.POD
    assert dict(st.labels) == {"app": "web"}
    assert dict(st.annotations) == {"note": "x"}
    assert st.runtime_handler == "podvisor"


def test_sandbox_status_node_network() -> None:
    st = sandboxes.sandbox_status_to_pb(make_sandbox(mode=NetworkMode.NODE))
    assert st.linux.namespaces.options.network == pb.NODE


def test_sandbox_verbose_info_is_one_json_document() -> None:
    info = sandboxes.sandbox_verbose_info(make_sandbox(), "/var/lib/podvisor/sandboxes/ccc")
    assert list(info) == ["info"]
    doc = json.loads(info["info"])
    assert doc == {
        "id": "c" * 64,
        "state": "ready",
        "createdAt": 1_700_000_000_000_000_001,
        "stoppedAt": 42,
        "stateDir": "/var/lib/podvisor/sandboxes/ccc",
        "hostname": "vm-1",
        "logDirectory": "/var/log/pods/x",
        "networkMode": "pod",
        "dnsConfig": {"servers": ["10.96.0.10"], "searches": ["cluster.local"],
                      "options": ["ndots:2"]},
        "portMappings": [{"protocol": "udp", "containerPort": 53, "hostPort": 5353,
                          "hostIp": "127.0.0.1"}],
        "cgroupParent": "/kubepods",
        "sysctls": {},
        "vm": None,
    }


# Filters -------------------------------------------------------------------------------


def test_no_filter() -> None:
    assert sandboxes.sandbox_filter_from_pb(pb.ListPodSandboxRequest()) is None


def test_empty_filter_matches_everything() -> None:
    req = pb.ListPodSandboxRequest(filter=pb.PodSandboxFilter())
    assert sandboxes.sandbox_filter_from_pb(req) == SandboxFilter(id="", ready=None,
                                                                label_selector={})


@pytest.mark.parametrize(("state", "ready"), [(pb.SANDBOX_READY, True),
                                              (pb.SANDBOX_NOTREADY, False)])
def test_state_filter(state: int, ready: bool) -> None:
    req = pb.ListPodSandboxRequest(filter=pb.PodSandboxFilter(
        state=pb.PodSandboxStateValue(state=state)))
    flt = sandboxes.sandbox_filter_from_pb(req)
    assert flt is not None
    assert flt.ready is ready


def test_id_and_label_filter() -> None:
    req = pb.ListPodSandboxRequest(filter=pb.PodSandboxFilter(
        id="abc", label_selector={"app": "web", "tier": "front"}))
    flt = sandboxes.sandbox_filter_from_pb(req)
    assert flt == SandboxFilter(id="abc", ready=None,
                                label_selector={"app": "web", "tier": "front"})
    assert flt is not None and type(flt.label_selector) is dict


# Runtime ----------------------------------------------------------------------------------


def test_version_to_pb() -> None:
    resp = runtime_info.version_to_pb(RuntimeInfoService.version())
    assert resp == pb.VersionResponse(version="0.1.0", runtime_name="podvisor",
                                      runtime_version=__version__, runtime_api_version="v1")


STATUS = RuntimeStatus(
    conditions=(
        Condition("RuntimeReady", True),
        Condition("NetworkReady", False, "NetworkPluginNotReady", "no valid CNI config"),
    ),
    info={"virtType": "qemu",
          "libvirt": {"uri": "qemu:///system", "connected": True, "qemu": "8.2.0"},
          "cni": {"config": "", "message": "no valid CNI config"}},
)


def test_status_to_pb_conditions_and_handlers() -> None:
    resp = runtime_info.status_to_pb(STATUS, False, ("", "podvisor"))
    conds = [(c.type, c.status, c.reason, c.message) for c in resp.status.conditions]
    assert conds == [
        ("RuntimeReady", True, "", ""),
        ("NetworkReady", False, "NetworkPluginNotReady", "no valid CNI config"),
    ]
    assert [h.name for h in resp.runtime_handlers] == ["", "podvisor"]
    for h in resp.runtime_handlers:
        assert h.HasField("features")
    assert resp.HasField("features")
    assert dict(resp.info) == {}  # not verbose


def test_status_to_pb_verbose_info() -> None:
    resp = runtime_info.status_to_pb(STATUS, True, ("",))
    assert set(resp.info) == {"virtType", "libvirt", "cni"}
    assert resp.info["virtType"] == "qemu"  # strings are not JSON-quoted
    assert json.loads(resp.info["libvirt"]) == {"uri": "qemu:///system", "connected": True,
                                                "qemu": "8.2.0"}
    assert json.loads(resp.info["cni"]) == {"config": "", "message": "no valid CNI config"}


def test_host_info_to_pb() -> None:
    info = HostInfo(
        virt=VirtChoice("qemu", "no /dev/kvm on this host: using TCG"),
        kvm=KvmFacts(device_present=True, device_usable=True, pvm=True),
        libvirt_uri="qemu:///system",
        libvirt_connected=True,
        libvirt_library="10.0.0",
        libvirt_daemon="10.0.1",
        qemu="8.2.0",
        host=HostFacts(hostname="hv1", kernel_release="6.1.0", cpu_model="EPYC", cpus=64,
                       memory_total_bytes=2**40, memory_available_bytes=2**39,
                       disk_total_bytes=10**13, disk_free_bytes=10**12),
        state_dir=Path("/var/lib/podvisor"),
        agent_version=__version__,
    )
    msg = host.host_info_to_pb(info)
    assert msg.virt_type == "qemu"
    assert msg.virt_type_reason == "no /dev/kvm on this host: using TCG"
    assert msg.libvirt_version == "10.0.0"
    assert msg.libvirtd_version == "10.0.1"
    assert msg.qemu_version == "8.2.0"
    assert msg.libvirt_uri == "qemu:///system"
    assert msg.libvirt_connected is True
    assert msg.hostname == "hv1"
    assert msg.kernel_release == "6.1.0"
    assert msg.cpu_model == "EPYC"
    assert msg.cpus == 64
    assert msg.memory_total_bytes == 2**40
    assert msg.memory_available_bytes == 2**39
    assert msg.state_dir == "/var/lib/podvisor"
    assert msg.state_disk_total_bytes == 10**13
    assert msg.state_disk_free_bytes == 10**12
    assert msg.agent_version == __version__
    assert msg.kvm_device_present is True
    assert msg.kvm_pvm is True


def test_message_to_json_keeps_proto_field_names() -> None:
    doc = json.loads(wire.message_to_json(pb.RunPodSandboxResponse(pod_sandbox_id="x")))
    assert doc == {"pod_sandbox_id": "x"}
