"""Tests for the domain XML builder (agent.render.domain_xml).

Whole domains are compared with golden files in ``golden/domain/`` (regenerate
with ``UPDATE_GOLDEN=1``); each configurator has its own table test. The cases
are also defined in real libvirt by tests/integration/test_domain_xml_libvirt.py,
which imports ``CASES`` and ``case_spec`` from here.
"""

from __future__ import annotations

import dataclasses
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.domain.vm import METADATA_NAMESPACE, DiskSpec, DomainSpec, InterfaceSpec
from agent.render import domain_xml
from agent.render.domain_xml import parse_metadata, render

GOLDEN_DIR = Path(__file__).parent / "golden" / "domain"
UPDATE_GOLDEN = os.environ.get("UPDATE_GOLDEN") == "1"

MIB = 1 << 20
GIB = 1 << 30
OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"
GOLDEN_ROOT = "/var/lib/podvisor/containers/c0ffee"
NS = f"{{{METADATA_NAMESPACE}}}"


# --- cases: one DomainSpec per situation that matters; paths hang off `root` --------------------


def _base(root: str, **changes: object) -> DomainSpec:
    spec = DomainSpec(
        name="podvisor-c0ffee",
        uuid="5f0c2a4e-1b7d-4c3e-9a61-0d2f8e4b7c10",
        virt_type="qemu",
        vcpus=1,
        max_vcpus=1,
        memory_bytes=512 * MIB,
        max_memory_bytes=512 * MIB,
        disks=(DiskSpec(source=f"{root}/overlay.qcow2", format="qcow2", target="vda", bus="virtio",
                        boot_order=1),),
        serial_socket=f"{root}/serial.sock",
        console_log=f"{root}/console.log",
        sandbox_id="sb-4d2a",
        container_id="c0ffee",
        pod_name="web-0",
        pod_namespace="default",
        container_name="vm",
        interfaces=(InterfaceSpec(bridge="pv-4d2a", mac="0a:58:0a:f4:00:05"),),
    )
    return dataclasses.replace(spec, **changes)  # type: ignore[arg-type]


def _seed(root: str, target: str = "vdb", bus: str = "virtio", device: str = "disk") -> DiskSpec:
    return DiskSpec(source=f"{root}/seed.iso", format="raw", target=target, bus=bus, device=device,
                    readonly=True, serial="cidata")


CASES: dict[str, Callable[[str], DomainSpec]] = {
    "minimal-tcg-bios-virtio": lambda root: _base(root),
    "kvm-host-passthrough": lambda root: _base(root, virt_type="kvm"),
    "sizes": lambda root: _base(root, vcpus=2, max_vcpus=4, memory_bytes=1 * GIB, max_memory_bytes=2 * GIB,
                                cpu_shares=2048),
    "disk-buses": lambda root: _base(root, disks=(
        DiskSpec(source=f"{root}/overlay.qcow2", format="qcow2", target="sda", bus="scsi", boot_order=1),
        DiskSpec(source=f"{root}/data.raw", format="raw", target="sdb", bus="sata", serial="data-1"),
        DiskSpec(source=f"{root}/extra.qcow2", format="qcow2", target="vdc", bus="virtio"),
        _seed(root, target="sdc", bus="sata", device="cdrom"),
    )),
    "seed-readonly-raw": lambda root: _base(root, disks=(
        DiskSpec(source=f"{root}/overlay.qcow2", format="qcow2", target="vda", bus="virtio", boot_order=1),
        _seed(root),
    )),
    "uefi": lambda root: _base(root, firmware="uefi", uefi_loader=OVMF_CODE, uefi_vars_template=OVMF_VARS,
                               uefi_nvram=f"{root}/nvram.fd"),
    "two-interfaces": lambda root: _base(root, interfaces=(
        InterfaceSpec(bridge="pv-4d2a", mac="0a:58:0a:f4:00:05"),
        InterfaceSpec(bridge="pv-extra", mac="52:54:00:12:34:56", model="e1000e"),
    )),
    "guest-agent": lambda root: _base(root, guest_agent_socket=f"{root}/qga.sock"),
    # A container with a command: the port its exit code comes back on.
    "workload-exit": lambda root: _base(root, workload_exit=f"{root}/workload.exit"),
    "no-nic": lambda root: _base(root, interfaces=()),
    # kubelet's systemd driver: the pod's slice as a libvirt resource partition.
    "pod-slice-partition": lambda root: _base(root, partition="/kubepods/burstable/pod5f0c2a4e_1b7d"),
    # CRI devices: host block devices after the VM's own disks, found by serial; one read-only.
    "block-devices": lambda root: _base(root, disks=(
        DiskSpec(source=f"{root}/overlay.qcow2", format="qcow2", target="vda", bus="virtio", boot_order=1),
        _seed(root),
        DiskSpec(source="/dev/loop7", format="raw", target="vdc", bus="virtio", serial="pv-3f0d4f5fa2a0b3a7c",
                 kind="block"),
        DiskSpec(source="/dev/sdb", format="raw", target="vdd", bus="virtio", readonly=True,
                 serial="pv-0b1e6a7d8c9f0e1d2", kind="block"),
    )),
    # Pod volumes: the agent's virtiofsd socket, shared memfd memory, the mount report port.
    "virtiofs-volumes": lambda root: _base(root, virtiofs_socket=f"{root}/volumes.sock",
                                           volumes_status=f"{root}/volumes.status"),
}


def case_spec(case: str, root: str = GOLDEN_ROOT) -> DomainSpec:
    """The DomainSpec of a named case with its paths under ``root``."""
    return CASES[case](root)


def _tree(spec: DomainSpec) -> ET.Element:
    return ET.fromstring(render(spec))


def _apply(configure: domain_xml.Configurator, spec: DomainSpec) -> ET.Element:
    domain = ET.Element("domain")
    configure(domain, spec)
    return domain


def _xml(el: ET.Element) -> str:
    return ET.tostring(el, encoding="unicode")


# --- whole domains ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_domain_matches_golden_file(case: str) -> None:
    text = render(case_spec(case))
    golden = GOLDEN_DIR / f"{case}.xml"
    if UPDATE_GOLDEN:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), f"no golden file {golden}; run with UPDATE_GOLDEN=1"
    assert text == golden.read_text(), f"{golden} differs; inspect, then regenerate with UPDATE_GOLDEN=1"


def test_no_golden_file_without_a_case() -> None:
    assert {p.stem for p in GOLDEN_DIR.glob("*.xml")} == set(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_render_is_deterministic(case: str) -> None:
    assert render(case_spec(case)) == render(case_spec(case))


@pytest.mark.parametrize("case", sorted(CASES))
def test_metadata_round_trips(case: str) -> None:
    spec = case_spec(case)
    assert parse_metadata(render(spec)) == {
        "sandbox_id": spec.sandbox_id,
        "container_id": spec.container_id,
        "pod_name": spec.pod_name,
        "pod_namespace": spec.pod_namespace,
        "container_name": spec.container_name,
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_tcg_never_gets_host_passthrough(case: str) -> None:
    spec = dataclasses.replace(case_spec(case), virt_type="qemu")
    root = _tree(spec)
    assert root.get("type") == "qemu"
    assert root.find("cpu") is None
    assert "host-passthrough" not in render(spec)


def test_kvm_gets_host_passthrough() -> None:
    cpu = _tree(case_spec("kvm-host-passthrough")).find("cpu")
    assert cpu is not None and cpu.attrib == {"mode": "host-passthrough", "check": "none", "migratable": "on"}


# --- configurators, one table each ------------------------------------------------------------------


def test_identity_sets_name_uuid_and_namespaced_metadata() -> None:
    spec = _base(GOLDEN_ROOT)
    domain = _apply(domain_xml.configure_identity, spec)
    assert domain.findtext("name") == spec.name
    assert domain.findtext("uuid") == spec.uuid
    ours = domain.find(f"metadata/{NS}container")
    assert ours is not None
    assert [(child.tag, child.text) for child in ours] == [
        (f"{NS}sandbox-id", "sb-4d2a"),
        (f"{NS}container-id", "c0ffee"),
        (f"{NS}pod-name", "web-0"),
        (f"{NS}pod-namespace", "default"),
        (f"{NS}container-name", "vm"),
    ]
    assert 'xmlns:podvisor="https://podvisor.io/xmlns/domain/1"' in render(spec)


@pytest.mark.parametrize(
    ("memory", "max_memory", "expected"),
    [
        pytest.param(512 * MIB, 512 * MIB, ("524288", "524288"), id="equal"),
        pytest.param(1 * GIB, 4 * GIB, ("4194304", "1048576"), id="balloon-below-max"),
        pytest.param(1000, 1025, ("2", "1"), id="rounds-up-to-kib"),
    ],
)
def test_memory(memory: int, max_memory: int, expected: tuple[str, str]) -> None:
    domain = _apply(domain_xml.configure_memory,
                    _base(GOLDEN_ROOT, memory_bytes=memory, max_memory_bytes=max_memory))
    assert [(el.tag, el.get("unit"), el.text) for el in domain] == [
        ("memory", "KiB", expected[0]),
        ("currentMemory", "KiB", expected[1]),
    ]
    assert domain.find("maxMemory") is None


@pytest.mark.parametrize(
    ("vcpus", "max_vcpus", "shares", "expected"),
    [
        pytest.param(1, 1, None, '<domain><vcpu placement="static">1</vcpu></domain>', id="one"),
        pytest.param(2, 2, None, '<domain><vcpu placement="static">2</vcpu></domain>', id="current-omitted-when-max"),
        pytest.param(1, 4, None, '<domain><vcpu placement="static" current="1">4</vcpu></domain>',
                     id="current-below-max"),
        pytest.param(2, 2, 512,
                     '<domain><vcpu placement="static">2</vcpu><cputune><shares>512</shares></cputune></domain>',
                     id="shares"),
    ],
)
def test_vcpus(vcpus: int, max_vcpus: int, shares: int | None, expected: str) -> None:
    spec = _base(GOLDEN_ROOT, vcpus=vcpus, max_vcpus=max_vcpus, cpu_shares=shares)
    assert _xml(_apply(domain_xml.configure_vcpus, spec)) == expected


@pytest.mark.parametrize(
    ("virt_type", "expected"),
    [
        pytest.param("kvm", '<domain><cpu mode="host-passthrough" check="none" migratable="on" /></domain>',
                     id="kvm"),
        pytest.param("qemu", "<domain />", id="tcg-leaves-the-model-to-qemu"),
    ],
)
def test_cpu(virt_type: str, expected: str) -> None:
    assert _xml(_apply(domain_xml.configure_cpu, _base(GOLDEN_ROOT, virt_type=virt_type))) == expected


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        pytest.param({}, '<domain><os><type arch="x86_64" machine="q35">hvm</type></os></domain>', id="bios"),
        pytest.param({"machine": "pc-i440fx-7.2"},
                     '<domain><os><type arch="x86_64" machine="pc-i440fx-7.2">hvm</type></os></domain>',
                     id="machine"),
        pytest.param(
            {"firmware": "uefi", "uefi_loader": OVMF_CODE, "uefi_vars_template": OVMF_VARS,
             "uefi_nvram": "/n/nvram.fd"},
            '<domain><os><type arch="x86_64" machine="q35">hvm</type>'
            f'<loader readonly="yes" type="pflash">{OVMF_CODE}</loader>'
            f'<nvram template="{OVMF_VARS}">/n/nvram.fd</nvram></os></domain>',
            id="uefi"),
        pytest.param(
            {"firmware": "uefi", "uefi_loader": OVMF_CODE, "uefi_nvram": "/n/nvram.fd"},
            '<domain><os><type arch="x86_64" machine="q35">hvm</type>'
            f'<loader readonly="yes" type="pflash">{OVMF_CODE}</loader>'
            '<nvram>/n/nvram.fd</nvram></os></domain>',
            id="uefi-without-template"),
    ],
)
def test_os(changes: dict[str, str], expected: str) -> None:
    assert _xml(_apply(domain_xml.configure_os, _base(GOLDEN_ROOT, **changes))) == expected


def test_os_never_has_boot_dev() -> None:
    # Per-device <boot order> and <os><boot dev> are mutually exclusive in libvirt.
    for case in CASES:
        assert _tree(case_spec(case)).find("os/boot") is None


@pytest.mark.parametrize(
    ("configure", "expected"),
    [
        pytest.param(domain_xml.configure_features, "<domain><features><acpi /><apic /></features></domain>",
                     id="features"),
        pytest.param(domain_xml.configure_clock,
                     '<domain><clock offset="utc"><timer name="rtc" tickpolicy="catchup" />'
                     '<timer name="pit" tickpolicy="delay" /><timer name="hpet" present="no" /></clock></domain>',
                     id="clock"),
        pytest.param(domain_xml.configure_lifecycle,
                     "<domain><on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot>"
                     "<on_crash>destroy</on_crash></domain>",
                     id="lifecycle"),
        pytest.param(domain_xml.configure_rng,
                     '<domain><devices><rng model="virtio"><backend model="random">/dev/urandom</backend>'
                     "</rng></devices></domain>",
                     id="rng"),
        pytest.param(domain_xml.configure_memballoon,
                     '<domain><devices><memballoon model="virtio"><stats period="5" /></memballoon>'
                     "</devices></domain>",
                     id="memballoon"),
        pytest.param(domain_xml.configure_emulator, "<domain />", id="emulator-left-to-libvirt"),
    ],
)
def test_fixed_configurators(configure: domain_xml.Configurator, expected: str) -> None:
    assert _xml(_apply(configure, _base(GOLDEN_ROOT))) == expected


@pytest.mark.parametrize(("partition", "expected"), [
    ("", "<domain />"),
    ("/kubepods/besteffort/pod12", "<domain><resource><partition>/kubepods/besteffort/pod12</partition>"
                                   "</resource></domain>"),
])
def test_resource_partition(partition: str, expected: str) -> None:
    assert _xml(_apply(domain_xml.configure_resource, _base(GOLDEN_ROOT, partition=partition))) == expected


def test_a_relative_partition_is_refused() -> None:
    with pytest.raises(ValueError, match="partition"):
        render(_base(GOLDEN_ROOT, partition="kubepods"))


def test_emulator_when_named() -> None:
    domain = _apply(domain_xml.configure_emulator, _base(GOLDEN_ROOT, emulator="/usr/bin/qemu-system-x86_64"))
    assert _xml(domain) == "<domain><devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices></domain>"


@pytest.mark.parametrize(
    ("disk", "expected"),
    [
        pytest.param(
            DiskSpec(source="/d/o.qcow2", format="qcow2", target="vda", bus="virtio", boot_order=1),
            '<disk type="file" device="disk">'
            '<driver name="qemu" type="qcow2" cache="writeback" discard="unmap" />'
            '<source file="/d/o.qcow2" /><target dev="vda" bus="virtio" /><boot order="1" /></disk>',
            id="boot-overlay"),
        pytest.param(
            DiskSpec(source="/d/seed.iso", format="raw", target="vdb", bus="virtio", readonly=True,
                     serial="cidata"),
            '<disk type="file" device="disk"><driver name="qemu" type="raw" cache="writeback" />'
            '<source file="/d/seed.iso" /><target dev="vdb" bus="virtio" /><readonly />'
            "<serial>cidata</serial></disk>",
            id="readonly-raw-no-discard"),
        pytest.param(
            DiskSpec(source="/d/seed.iso", format="raw", target="sdc", bus="sata", device="cdrom", readonly=True),
            '<disk type="file" device="cdrom"><driver name="qemu" type="raw" cache="writeback" />'
            '<source file="/d/seed.iso" /><target dev="sdc" bus="sata" /><readonly /></disk>',
            id="sata-cdrom"),
        pytest.param(
            DiskSpec(source="/d/d.raw", format="raw", target="sda", bus="scsi", boot_order=2),
            '<disk type="file" device="disk">'
            '<driver name="qemu" type="raw" cache="writeback" discard="unmap" />'
            '<source file="/d/d.raw" /><target dev="sda" bus="scsi" /><boot order="2" /></disk>',
            id="scsi"),
        pytest.param(
            DiskSpec(source="/dev/sdb", format="raw", target="vdc", bus="virtio", serial="pv-1", kind="block"),
            '<disk type="block" device="disk">'
            '<driver name="qemu" type="raw" cache="none" io="native" discard="unmap" />'
            '<source dev="/dev/sdb" /><target dev="vdc" bus="virtio" /><serial>pv-1</serial></disk>',
            id="block-device"),
        pytest.param(
            DiskSpec(source="/dev/loop3", format="raw", target="vdd", bus="virtio", readonly=True, serial="pv-2",
                     kind="block"),
            '<disk type="block" device="disk"><driver name="qemu" type="raw" cache="none" io="native" />'
            '<source dev="/dev/loop3" /><target dev="vdd" bus="virtio" /><readonly />'
            "<serial>pv-2</serial></disk>",
            id="read-only-block-device"),
    ],
)
def test_disk(disk: DiskSpec, expected: str) -> None:
    domain = _apply(domain_xml.configure_disks, _base(GOLDEN_ROOT, disks=(disk,)))
    assert _xml(domain) == f"<domain><devices>{expected}</devices></domain>"


@pytest.mark.parametrize(
    ("buses", "expected"),
    [
        pytest.param((), '<controller type="usb" model="none" />', id="no-disks"),
        pytest.param(("virtio", "sata"), '<controller type="usb" model="none" />', id="no-scsi"),
        pytest.param(("virtio", "scsi", "scsi"),
                     '<controller type="scsi" index="0" model="virtio-scsi" /><controller type="usb" model="none" />',
                     id="one-virtio-scsi-controller"),
    ],
)
def test_controllers(buses: tuple[str, ...], expected: str) -> None:
    disks = tuple(DiskSpec(source=f"/d/{i}", format="raw", target=f"x{i}", bus=bus) for i, bus in enumerate(buses))
    domain = _apply(domain_xml.configure_controllers, _base(GOLDEN_ROOT, disks=disks))
    assert _xml(domain) == f"<domain><devices>{expected}</devices></domain>"


@pytest.mark.parametrize(
    ("interfaces", "expected"),
    [
        pytest.param((), "<domain />", id="none"),
        pytest.param(
            (InterfaceSpec(bridge="br0", mac="0a:58:0a:f4:00:05"),
             InterfaceSpec(bridge="br1", mac="52:54:00:00:00:01", model="e1000e")),
            '<domain><devices><interface type="bridge"><mac address="0a:58:0a:f4:00:05" />'
            '<source bridge="br0" /><model type="virtio" /><rom enabled="no" /></interface>'
            '<interface type="bridge"><mac address="52:54:00:00:00:01" /><source bridge="br1" />'
            '<model type="e1000e" /><rom enabled="no" /></interface></devices></domain>',
            id="two"),
    ],
)
def test_interfaces(interfaces: tuple[InterfaceSpec, ...], expected: str) -> None:
    domain = _apply(domain_xml.configure_interfaces, _base(GOLDEN_ROOT, interfaces=interfaces))
    assert _xml(domain) == expected


def test_console_is_a_logged_unix_serial_port() -> None:
    domain = _apply(domain_xml.configure_console, _base("/r"))
    assert _xml(domain) == (
        '<domain><devices><serial type="unix"><source mode="bind" path="/r/serial.sock" />'
        '<log file="/r/console.log" append="on" /><target port="0" /></serial>'
        '<console type="unix"><source mode="bind" path="/r/serial.sock" />'
        '<log file="/r/console.log" append="on" /><target type="serial" port="0" /></console></devices></domain>'
    )


@pytest.mark.parametrize(
    ("socket", "expected"),
    [
        pytest.param("", "<domain />", id="none"),
        pytest.param("/r/qga.sock",
                     '<domain><devices><channel type="unix"><source mode="bind" path="/r/qga.sock" />'
                     '<target type="virtio" name="org.qemu.guest_agent.0" /></channel></devices></domain>',
                     id="channel"),
    ],
)
def test_guest_agent(socket: str, expected: str) -> None:
    domain = _apply(domain_xml.configure_guest_agent, _base("/r", guest_agent_socket=socket))
    assert _xml(domain) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        pytest.param("", "<domain />", id="none"),
        pytest.param("/r/workload.exit",
                     '<domain><devices><channel type="file"><source path="/r/workload.exit" />'
                     '<target type="virtio" name="io.podvisor.exit.0" /></channel></devices></domain>',
                     id="channel"),
    ],
)
def test_workload_exit(path: str, expected: str) -> None:
    domain = _apply(domain_xml.configure_workload_exit, _base("/r", workload_exit=path))
    assert _xml(domain) == expected


def test_no_share_no_memory_backing_nor_filesystem() -> None:
    spec = _base("/r")
    assert _xml(_apply(domain_xml.configure_memory_backing, spec)) == "<domain />"
    assert _xml(_apply(domain_xml.configure_filesystems, spec)) == "<domain />"
    assert _xml(_apply(domain_xml.configure_volumes_status, spec)) == "<domain />"


def test_share_gets_memfd_backing_filesystem_and_report_port() -> None:
    spec = _base("/r", virtiofs_socket="/r/v.sock", volumes_status="/r/v.status")
    assert _xml(_apply(domain_xml.configure_memory_backing, spec)) == (
        '<domain><memoryBacking><source type="memfd" /><access mode="shared" /></memoryBacking></domain>')
    assert _xml(_apply(domain_xml.configure_filesystems, spec)) == (
        '<domain><devices><filesystem type="mount"><driver type="virtiofs" queue="1024" />'
        '<source socket="/r/v.sock" /><target dir="podvisor-volumes" /></filesystem></devices></domain>')
    assert _xml(_apply(domain_xml.configure_volumes_status, spec)) == (
        '<domain><devices><channel type="file"><source path="/r/v.status" />'
        '<target type="virtio" name="io.podvisor.volumes.0" /></channel></devices></domain>')


def test_a_report_port_without_a_share_is_refused() -> None:
    with pytest.raises(ValueError, match="volumes_status needs virtiofs_socket"):
        render(_base("/r", volumes_status="/r/v.status"))


def test_configurators_share_one_devices_element() -> None:
    root = _tree(case_spec("guest-agent"))
    assert len(root.findall("devices")) == 1
    assert [el.tag for el in root.find("devices")] == [  # type: ignore[union-attr]
        "disk", "controller", "interface", "serial", "console", "channel", "rng", "memballoon",
    ]
    assert root.findall("devices/graphics") == root.findall("devices/sound") == []


# --- escaping and validation --------------------------------------------------------------------------

NASTY = "a<b>&c\"d'e]]></name><evil/>"


def test_special_characters_are_escaped_and_never_add_elements() -> None:
    plain = _base("/r", guest_agent_socket="/r/qga.sock", disks=(
        DiskSpec(source="/r/o.qcow2", format="qcow2", target="vda", bus="virtio"),))
    nasty_root = f"/r/{NASTY}"
    nasty = dataclasses.replace(
        _base(nasty_root, guest_agent_socket=f"{nasty_root}/qga.sock", disks=(
            DiskSpec(source=f"{nasty_root}/o.qcow2", format="qcow2", target="vda", bus="virtio"),)),
        name=NASTY, sandbox_id=NASTY, container_id=NASTY, pod_name=NASTY, pod_namespace=NASTY,
        container_name=NASTY, interfaces=(InterfaceSpec(bridge=NASTY, mac=NASTY, model=NASTY),),
    )
    text = render(nasty)
    assert "<evil" not in text
    plain_tree, nasty_tree = _tree(plain), ET.fromstring(text)
    assert [el.tag for el in nasty_tree.iter()] == [el.tag for el in plain_tree.iter()]
    assert nasty_tree.findtext("name") == NASTY
    assert nasty_tree.find("devices/disk/source").get("file") == f"{nasty_root}/o.qcow2"  # type: ignore[union-attr]
    assert nasty_tree.find("devices/serial/source").get("path") == f"{nasty_root}/serial.sock"  # type: ignore[union-attr]
    assert nasty_tree.find("devices/interface/source").get("bridge") == NASTY  # type: ignore[union-attr]
    assert parse_metadata(text) == dict.fromkeys(
        ("sandbox_id", "container_id", "pod_name", "pod_namespace", "container_name"), NASTY)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        pytest.param({"virt_type": "xen"}, "virt_type", id="virt-type"),
        pytest.param({"firmware": "coreboot"}, "firmware", id="firmware"),
        pytest.param({"firmware": "uefi"}, "uefi_loader", id="uefi-without-paths"),
        pytest.param({"vcpus": 3, "max_vcpus": 2}, "vcpus", id="vcpus-above-max"),
        pytest.param({"vcpus": 0}, "vcpus", id="no-vcpus"),
        pytest.param({"memory_bytes": 2 * GIB, "max_memory_bytes": GIB}, "memory_bytes", id="memory-above-max"),
        pytest.param({"cpu_shares": 0}, "cpu_shares", id="shares"),
        pytest.param({"name": ""}, "name", id="no-name"),
        pytest.param({"name": "bad\x00name"}, "name holds a character", id="nul"),
        pytest.param({"pod_name": "bell\x07"}, "pod_name holds a character", id="control-character"),
        pytest.param({"disks": (DiskSpec(source="/x\x1b", format="raw", target="vda", bus="virtio"),)},
                     r"disks\[0\]\.source holds a character", id="control-character-in-disk"),
        pytest.param({"disks": (DiskSpec(source="/x", format="vmdk", target="vda", bus="virtio"),)},
                     "format", id="format"),
        pytest.param({"disks": (DiskSpec(source="/x", format="raw", target="hda", bus="ide"),)},
                     "bus", id="bus"),
        pytest.param({"disks": (DiskSpec(source="/x", format="raw", target="vda", bus="virtio", device="floppy"),)},
                     "device", id="device"),
        pytest.param({"disks": (DiskSpec(source="/x", format="raw", target="vda", bus="virtio", device="cdrom"),)},
                     "cdrom", id="virtio-cdrom"),
        pytest.param({"disks": (DiskSpec(source="/x", format="raw", target="sda", bus="sata", readonly=True),)},
                     "read-only sata", id="readonly-sata-disk"),
        pytest.param({"disks": (DiskSpec(source="/x", format="raw", target="vda", bus="virtio", serial="a<b"),)},
                     "serial", id="disk-serial"),
        pytest.param({"disks": (DiskSpec(source="/x", format="raw", target="vda", bus="virtio"),
                                DiskSpec(source="/y", format="raw", target="vda", bus="virtio"))},
                     "targets repeat", id="same-target"),
        pytest.param({"disks": (DiskSpec(source="/x", format="raw", target="vda", bus="virtio", boot_order=1),
                                DiskSpec(source="/y", format="raw", target="vdb", bus="virtio", boot_order=1))},
                     "boot orders", id="same-boot-order"),
        pytest.param({"disks": (DiskSpec(source="/x", format="raw", target="vda", bus="virtio", kind="volume"),)},
                     "kind 'volume'", id="disk-kind"),
        pytest.param({"disks": (DiskSpec(source="/dev/sdb", format="qcow2", target="vda", bus="virtio",
                                         kind="block"),)},
                     "block device is attached raw", id="block-not-raw"),
    ],
)
def test_invalid_specs_are_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render(_base(GOLDEN_ROOT, **changes))


# --- parse_metadata ---------------------------------------------------------------------------------------

# As libvirt 9.0's virDomainGetXMLDesc returns a domain we defined (abridged):
# single quotes, the namespace declared on <metadata>, empty elements collapsed.
LIBVIRT_XMLDESC = """<domain type='qemu' id='3'>
  <name>podvisor-c0ffee</name>
  <uuid>5f0c2a4e-1b7d-4c3e-9a61-0d2f8e4b7c10</uuid>
  <metadata xmlns:podvisor="https://podvisor.io/xmlns/domain/1">
    <podvisor:container>
      <podvisor:sandbox-id>sb&lt;1&gt;</podvisor:sandbox-id>
      <podvisor:container-id>c0ffee</podvisor:container-id>
      <podvisor:pod-name/>
      <podvisor:pod-namespace/>
      <podvisor:container-name>vm</podvisor:container-name>
    </podvisor:container>
  </metadata>
  <memory unit='KiB'>524288</memory>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
</domain>
"""


def test_parse_metadata_reads_libvirt_xmldesc() -> None:
    assert parse_metadata(LIBVIRT_XMLDESC) == {
        "sandbox_id": "sb<1>",
        "container_id": "c0ffee",
        "pod_name": "",
        "pod_namespace": "",
        "container_name": "vm",
    }


def test_parse_metadata_ignores_the_prefix_and_reads_the_namespace() -> None:
    other_prefix = LIBVIRT_XMLDESC.replace("podvisor:", "pv:").replace("xmlns:podvisor", "xmlns:pv")
    assert parse_metadata(other_prefix) == parse_metadata(LIBVIRT_XMLDESC)


def test_parse_metadata_reads_missing_children_as_empty() -> None:
    text = ("<domain><metadata><p:container xmlns:p='https://podvisor.io/xmlns/domain/1'>"
            "<p:sandbox-id>sb</p:sandbox-id></p:container></metadata></domain>")
    assert parse_metadata(text) == {"sandbox_id": "sb", "container_id": "", "pod_name": "",
                                    "pod_namespace": "", "container_name": ""}


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("<domain type='kvm'><name>someone-elses</name></domain>", id="no-metadata"),
        pytest.param("<domain><metadata/></domain>", id="empty-metadata"),
        pytest.param("<domain><metadata><k:kubevirt xmlns:k='http://kubevirt.io'><k:uid>1</k:uid></k:kubevirt>"
                     "</metadata></domain>", id="other-namespace"),
        pytest.param("<domain><metadata><container><sandbox-id>x</sandbox-id></container></metadata></domain>",
                     id="our-names-without-our-namespace"),
        pytest.param("<domain><devices><p:container xmlns:p='https://podvisor.io/xmlns/domain/1'/></devices>"
                     "</domain>", id="our-element-outside-metadata"),
    ],
)
def test_parse_metadata_none_for_foreign_domains(text: str) -> None:
    assert parse_metadata(text) is None


def test_parse_metadata_refuses_non_xml() -> None:
    with pytest.raises(ValueError, match="does not parse"):
        parse_metadata("<domain><name>")
