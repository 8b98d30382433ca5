"""VMBuilder (agent/services/vm_build.py) on fakes: the request, the pod
network it joins, the seed and the domain XML of a VM."""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path

import pycdlib
import pytest
import yaml

from agent.domain.errors import InvalidArgument
from agent.domain.host import HostCapacity
from agent.domain.sandbox import DNSConfig, NetworkMode, Sandbox
from agent.domain.vm import Container, ContainerPaths, ContainerState, ExecCredentials, GuestAccess, VMRequest
from agent.domain.vmrequest import VMDefaults
from agent.services.vm_build import VMBuilder
from tests.services.container_fakes import (
    OTHER_SANDBOX_ID,
    REQUEST,
    SANDBOX_ID,
    STATE_ROOT,
    FakeFiles,
    MiB,
    cspec,
    record,
    sandbox,
)
from tests.services.service_fakes import Journal, RecordingFiles

CONTAINER_ID = "9" * 64


@dataclass(frozen=True)
class Route:
    dst: str
    gw: str


@dataclass(frozen=True)
class Wiring:
    host_bridge: str = "pv-br0"
    vm_mac: str = "52:54:00:12:34:56"
    ip: str = "10.88.0.7"
    prefix: int = 16
    gateway: str = "10.88.0.1"
    routes: tuple[Route, ...] = (Route("0.0.0.0/0", "10.88.0.1"),)
    dns_servers: tuple[str, ...] = ("10.96.0.10",)
    dns_searches: tuple[str, ...] = ("default.svc.cluster.local",)
    mtu: int = 1450


@dataclass(frozen=True)
class Status:
    wiring: Wiring


class FakeNetwork:
    """VMNetwork: the wiring of the sandboxes that have one."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.wired: dict[str, Wiring] = {SANDBOX_ID: Wiring()}

    def status(self, sandbox_id: str, workdir: Path) -> Status | None:
        self.journal.record("network.status", sandbox_id, str(workdir))
        w = self.wired.get(sandbox_id)
        return Status(w) if w is not None else None

    def ensure_dhcp(self, sandbox_id: str, workdir: Path) -> bool:
        self.journal.record("network.ensure_dhcp", sandbox_id, str(workdir))
        return True


class FakeHost:
    """HostSize: a 4-CPU host with 8 GiB."""

    def __init__(self, cpus: int = 4, memory_bytes: int = 8192 * MiB) -> None:
        self.cpus = cpus
        self.memory_bytes = memory_bytes

    def capacity(self) -> HostCapacity:
        return HostCapacity(cpus=self.cpus, memory_bytes=self.memory_bytes)


@dataclass
class Build:
    journal: Journal
    network: FakeNetwork
    builder: VMBuilder


def _build(*, network: bool = True, virt_type: str = "qemu") -> Build:
    journal = Journal()
    net = FakeNetwork(journal)
    builder = VMBuilder(defaults=VMDefaults(vcpus=2, memory_bytes=256 * MiB), virt_type=virt_type,
                        files=FakeFiles(journal), sandbox_files=RecordingFiles(journal, STATE_ROOT),
                        network=net if network else None, host=FakeHost())
    return Build(journal, net, builder)


@pytest.fixture
def build() -> Build:
    return _build()


def _node_sandbox() -> Sandbox:
    sb = sandbox()
    return dataclasses.replace(sb, spec=dataclasses.replace(sb.spec, network_mode=NetworkMode.NODE))


def _container(sandbox_id: str = SANDBOX_ID) -> Container:
    return record(CONTAINER_ID, ContainerState.CREATING, sandbox_id=sandbox_id)


def _paths(build: Build, c: Container) -> ContainerPaths:
    return FakeFiles(build.journal).container_paths(c.sandbox_id, c.id)


# request ----------------------------------------------------------------------------


def test_request_takes_cri_sizes_over_the_defaults(build: Build) -> None:
    req = build.builder.request(cspec(memory_limit_in_bytes=512 * MiB, cpu_quota=300_000, cpu_period=100_000),
                                sandbox())
    assert (req.vcpus, req.memory_bytes) == (3, 512 * MiB)


def test_request_falls_back_to_the_configured_defaults(build: Build) -> None:
    req = build.builder.request(cspec(), sandbox())
    assert (req.vcpus, req.memory_bytes) == (2, 256 * MiB)
    assert req.pod_network


def test_request_reads_the_annotations_and_the_environment(build: Build) -> None:
    req = build.builder.request(cspec(annotations={"podvisor.io/firmware": "uefi"}, env={"A": "1"},
                                      command=("echo",), args=("hi",)), sandbox())
    assert req.firmware == "uefi"
    assert dict(req.cloud_init.env) == {"A": "1"}
    assert req.cloud_init.command == ("echo", "hi")


# domain -----------------------------------------------------------------------------


def test_domain_spec_holds_the_containers_values_and_the_pod_nic(build: Build) -> None:
    c = _container()
    spec = build.builder.domain_spec(c, sandbox(), REQUEST, _paths(build, c))
    assert spec.name == c.domain_name
    assert spec.uuid.replace("-", "") == c.id[:32]
    assert spec.virt_type == "qemu"
    assert (spec.vcpus, spec.max_vcpus, spec.memory_bytes, spec.max_memory_bytes) == (
        1, 4, 256 * MiB, 1024 * MiB)
    assert [(d.source, d.format, d.target, d.readonly, d.serial) for d in spec.disks] == [
        (c.overlay_path, "qcow2", "vda", False, "containerdisk"),
        (c.seed_path, "raw", "vdb", True, "cloudinit"),
    ]
    assert [(i.bridge, i.mac, i.kind) for i in spec.interfaces] == [("pv-br0", "52:54:00:12:34:56", "bridge")]
    assert (spec.sandbox_id, spec.container_id, spec.container_name) == (SANDBOX_ID, c.id, "vm")
    assert (spec.pod_name, spec.pod_namespace) == ("vm-1", "default")
    # The wiring is read from the sandbox's folder.
    assert build.journal.of("network.") == [("network.status", SANDBOX_ID, f"{STATE_ROOT}/{SANDBOX_ID}")]


@pytest.mark.parametrize(("cgroup_parent", "partition"), [
    ("", ""),
    ("/kubepods/burstable/pod12", ""),  # cgroupfs: the container service places QEMU itself
    ("kubepods-burstable-pod12.slice", "/kubepods/burstable/pod12"),
])
def test_the_pods_slice_becomes_the_resource_partition(build: Build, cgroup_parent: str, partition: str) -> None:
    c = _container()
    sb = sandbox(cgroup_parent=cgroup_parent)
    assert build.builder.domain_spec(c, sb, REQUEST, _paths(build, c)).partition == partition


def test_sata_boot_disk_puts_the_seed_on_vda(build: Build) -> None:
    c = _container()
    spec = build.builder.domain_spec(c, sandbox(), dataclasses.replace(REQUEST, disk_bus="sata"),
                                     _paths(build, c))
    assert [(d.target, d.bus) for d in spec.disks] == [("sda", "sata"), ("vda", "virtio")]


def test_host_network_vm_gets_a_user_mode_nic(build: Build) -> None:
    c = _container()
    spec = build.builder.domain_spec(c, _node_sandbox(), REQUEST, _paths(build, c))
    assert [(i.bridge, i.mac, i.kind) for i in spec.interfaces] == [("", "52:54:00:99:99:99", "user")]
    assert build.journal.of("network.") == []


@pytest.mark.parametrize("case", ["no pod network asked", "networking off", "sandbox without wiring"])
def test_no_nic(case: str) -> None:
    build = _build(network=case != "networking off")
    request: VMRequest = REQUEST
    sb = sandbox()
    if case == "no pod network asked":
        request = dataclasses.replace(REQUEST, pod_network=False)
    if case == "sandbox without wiring":
        sb = sandbox(OTHER_SANDBOX_ID)
    c = _container(sb.id)
    spec = build.builder.domain_spec(c, sb, request, _paths(build, c))
    assert spec.interfaces == ()


def test_every_vm_gets_the_guest_agent_channel(build: Build) -> None:
    c = _container()
    paths = _paths(build, c)
    spec = build.builder.domain_spec(c, sandbox(), REQUEST, paths)
    assert spec.guest_agent_socket == paths.guest_agent_socket != ""
    xml = build.builder.domain_xml(c, sandbox(), REQUEST, paths)
    assert 'name="org.qemu.guest_agent.0"' in xml


@pytest.mark.parametrize(("scope", "value", "channel"), [
    ("container", "false", False), ("pod", "false", False), ("container", "true", True),
])
def test_the_guest_agent_annotation_turns_the_channel_off(build: Build, scope: str, value: str,
                                                          channel: bool) -> None:
    annotations = {"podvisor.io/guest-agent": value}
    spec_ = cspec(annotations=annotations) if scope == "container" else cspec()
    sb = sandbox()
    if scope == "pod":
        sb = dataclasses.replace(sb, spec=dataclasses.replace(sb.spec, annotations=annotations))
    req = build.builder.request(spec_, sb)
    assert req.guest_agent is channel
    c = _container()
    assert bool(build.builder.domain_spec(c, sb, req, _paths(build, c)).guest_agent_socket) is channel


def test_a_malformed_guest_agent_annotation_is_refused(build: Build) -> None:
    with pytest.raises(InvalidArgument, match=r"podvisor.io/guest-agent.*\"true\" or \"false\""):
        build.builder.request(cspec(annotations={"podvisor.io/guest-agent": "off"}), sandbox())


def test_domain_xml_is_recognised_as_podvisors() -> None:
    build = _build(virt_type="kvm")
    c = _container()
    xml = build.builder.domain_xml(c, sandbox(), REQUEST, _paths(build, c))
    assert f"<name>{c.domain_name}</name>" in xml
    assert "type=\"kvm\"" in xml or "type='kvm'" in xml
    assert build.builder.is_podvisor_domain(xml)
    assert not build.builder.is_podvisor_domain("<domain type='kvm'><name>someones-vm</name></domain>")


# seed -------------------------------------------------------------------------------


def _seed_files(iso: bytes) -> dict[str, bytes]:
    cd = pycdlib.PyCdlib()
    cd.open_fp(io.BytesIO(iso))
    files = {}
    for child in cd.list_children(rr_path="/"):
        if child.is_dot() or child.is_dotdot():
            continue
        name = child.rock_ridge.name().decode()
        out = io.BytesIO()
        cd.get_file_from_iso_fp(out, rr_path=f"/{name}")
        files[name] = out.getvalue()
    return files


def test_seed_on_a_pod_network_says_what_cni_assigned(build: Build) -> None:
    files = _seed_files(build.builder.seed(REQUEST, _container(), sandbox()))
    assert f'instance-id: "{CONTAINER_ID}"'.encode() in files["meta-data"]
    assert b'local-hostname: "vm-1"' in files["meta-data"]
    net = files["network-config"]
    for expected in (b"10.88.0.7/16", b"52:54:00:12:34:56", b"10.96.0.10", b"default.svc.cluster.local",
                     b"1450"):
        assert expected in net


def test_seed_without_wiring_has_no_network_config(build: Build) -> None:
    node = _seed_files(build.builder.seed(REQUEST, _container(), _node_sandbox()))
    no_nic = _seed_files(build.builder.seed(dataclasses.replace(REQUEST, pod_network=False), _container(),
                                            sandbox()))
    unwired = _seed_files(build.builder.seed(REQUEST, _container(OTHER_SANDBOX_ID), sandbox(OTHER_SANDBOX_ID)))
    for files in (node, no_nic, unwired):
        assert set(files) == {"meta-data", "user-data"}


class FakeKeys:
    """ExecKeyStore: fixed keys, the directories they were made for recorded."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def create(self, directory: str) -> GuestAccess:
        self.journal.record("keys.create", directory)
        return GuestAccess(client_public_key="ssh-ed25519 AAAAclient podvisor-exec",
                           host_public_key="ssh-ed25519 AAAAhost podvisor-guest",
                           host_private_key="-----BEGIN OPENSSH PRIVATE KEY-----\nx\n")

    def load(self, directory: str) -> ExecCredentials:
        raise AssertionError("building a VM never reads keys")


def test_seed_carries_execs_keys_made_in_the_containers_directory() -> None:
    journal = Journal()
    builder = VMBuilder(defaults=VMDefaults(), virt_type="qemu", files=FakeFiles(journal),
                        sandbox_files=RecordingFiles(journal, STATE_ROOT), network=None, host=FakeHost(),
                        keys=FakeKeys(journal))
    c = _container()
    files = _seed_files(builder.seed(REQUEST, c, sandbox()))
    assert journal.of("keys.") == [("keys.create", c.directory)]
    assert yaml.safe_load(files["meta-data"])["public-keys"] == ["ssh-ed25519 AAAAclient podvisor-exec"]
    vendor = yaml.safe_load(files["vendor-data"])
    assert vendor["disable_root"] is False
    assert vendor["ssh_keys"]["ed25519_public"] == "ssh-ed25519 AAAAhost podvisor-guest"
    # The user-data is what it is without Exec's keys.
    plain = VMBuilder(defaults=VMDefaults(), virt_type="qemu", files=FakeFiles(journal),
                      sandbox_files=RecordingFiles(journal, STATE_ROOT), network=None, host=FakeHost())
    assert files["user-data"] == _seed_files(plain.seed(REQUEST, c, sandbox()))["user-data"]


# DHCP -------------------------------------------------------------------------------


def test_prepare_network_starts_the_pods_dhcp_server(build: Build) -> None:
    build.builder.prepare_network(sandbox())
    assert build.journal.of("network.") == [("network.ensure_dhcp", SANDBOX_ID, f"{STATE_ROOT}/{SANDBOX_ID}")]


def test_prepare_network_does_nothing_without_a_pod_network() -> None:
    build = _build()
    build.builder.prepare_network(_node_sandbox())
    _build(network=False).builder.prepare_network(sandbox())
    assert build.journal.of("network.") == []


# the pod's resolver, sysctls and command ------------------------------------------------


def _pod(**changes: object) -> Sandbox:
    sb = sandbox()
    return dataclasses.replace(sb, spec=dataclasses.replace(sb.spec, **changes))


def test_request_carries_the_pods_dns_config_and_sysctls(build: Build) -> None:
    dns = DNSConfig(("10.96.0.10",), ("ns.svc.cluster.local",), ("ndots:5",))
    req = build.builder.request(cspec(), _pod(dns=dns, sysctls={"net.ipv4.ip_forward": "1"}))
    assert req.cloud_init.dns == dns
    assert dict(req.cloud_init.sysctls) == {"net.ipv4.ip_forward": "1"}


def test_seed_writes_the_pods_resolver_and_sysctls(build: Build) -> None:
    pod = _pod(dns=DNSConfig(("10.96.0.10",), ("ns.svc.cluster.local",), ("ndots:5",)),
               sysctls={"kernel.shm_rmid_forced": "1"})
    req = build.builder.request(cspec(), pod)
    user_data = yaml.safe_load(_seed_files(build.builder.seed(req, _container(), pod))["user-data"])
    resolv, sysctl = user_data["bootcmd"]
    assert resolv[-3:] == ["nameserver 10.96.0.10", "search ns.svc.cluster.local", "options ndots:5"]
    assert sysctl[-2:] == ["/proc/sys/kernel/shm_rmid_forced", "1"]


def test_a_vm_with_a_command_gets_the_exit_port_and_one_without_does_not(build: Build) -> None:
    c = _container()
    paths = _paths(build, c)
    with_command = build.builder.request(cspec(command=("/bin/true",)), sandbox())
    without = build.builder.request(cspec(), sandbox())
    assert build.builder.domain_spec(c, sandbox(), with_command, paths).workload_exit == paths.workload_exit
    assert paths.workload_exit.endswith("/workload.exit")
    assert build.builder.domain_spec(c, sandbox(), without, paths).workload_exit == ""
    xml = build.builder.domain_xml(c, sandbox(), with_command, paths)
    assert f'<channel type="file"><source path="{paths.workload_exit}" />' in xml.replace("\n", "").replace(
        "  ", "")
