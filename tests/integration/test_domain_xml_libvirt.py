"""The rendered domain XML against the real libvirt (qemu:///system, TCG).

Every golden case is defined (never started), read back with ``virsh dumpxml``
and checked: libvirt kept our metadata and the settings we care about. One
minimal domain is also started, to prove that the serial socket + virtlogd
``<log>`` wiring works with this libvirt: the console log file appears.

virsh runs through subprocess on purpose: libvirt-python belongs to the one
libvirt adapter module.

Paths: libvirt's QEMU runs as ``libvirt-qemu`` and opens disk images and the
UEFI NVRAM itself, so every directory above them must be traversable by that
user. pytest's ``/tmp/pytest-of-root`` is 0700, so the files live in a
``mkdtemp`` directory chmod'ed 0711 instead. Sockets (created by libvirtd) and
the console log (written by virtlogd) need nothing: both run as root.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.domain.vm import DomainSpec
from agent.render.domain_xml import BLOCK_CACHE, DISK_CACHE, parse_metadata, render
from tests.render.test_domain_xml import CASES, OVMF_CODE, OVMF_VARS, case_spec

URI = "qemu:///system"
VIRSH_TIMEOUT_S = 60


def _virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True,
                          timeout=VIRSH_TIMEOUT_S, check=check)


def _libvirt_problem() -> str | None:
    if shutil.which("virsh") is None:
        return "virsh not installed"
    if os.geteuid() != 0:
        return "needs root for qemu:///system"
    try:
        probe = _virsh("version", check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"virsh does not answer: {exc}"
    return None if probe.returncode == 0 else f"libvirt unreachable: {probe.stderr.strip()}"


_problem = _libvirt_problem()
pytestmark = pytest.mark.skipif(_problem is not None, reason=_problem or "")


@pytest.fixture
def qemu_dir() -> Iterator[Path]:
    """A scratch directory libvirt-qemu can traverse (0711), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="podvisor-domxml-"))
    try:
        path.chmod(0o711)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _prepare(case: str, root: Path) -> DomainSpec:
    """The case's spec under ``root`` with a unique name/uuid, TCG, and its disk files created."""
    suffix = uuid.uuid4().hex[:12]
    spec = dataclasses.replace(case_spec(case, str(root)), name=f"podvisor-test-{suffix}",
                               uuid=str(uuid.uuid4()), virt_type="qemu")
    for disk in spec.disks:
        # Block devices need not exist to define (test_block_devices_libvirt.py starts one).
        if disk.kind == "block" or Path(disk.source).exists():
            continue
        if disk.format == "qcow2":
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", disk.source, "64M"], check=True,
                           timeout=VIRSH_TIMEOUT_S)
        else:
            with open(disk.source, "wb") as f:
                f.truncate(1 << 20)
    return spec


def _define(spec: DomainSpec, root: Path) -> None:
    xml_file = root / "domain.xml"
    xml_file.write_text(render(spec))
    _virsh("define", str(xml_file))


def _undefine(name: str) -> None:
    # --nvram also deletes a UEFI domain's NVRAM copy; harmless for BIOS domains.
    _virsh("undefine", "--nvram", name, check=False)


def _expected_metadata(spec: DomainSpec) -> dict[str, str]:
    return {"sandbox_id": spec.sandbox_id, "container_id": spec.container_id, "pod_name": spec.pod_name,
            "pod_namespace": spec.pod_namespace, "container_name": spec.container_name}


def _assert_libvirt_kept_our_settings(spec: DomainSpec, dumped: str) -> None:
    root = ET.fromstring(dumped)
    assert root.get("type") == "qemu"
    assert root.findtext("uuid") == spec.uuid
    assert root.findtext("memory") == str(spec.max_memory_bytes // 1024)
    assert root.findtext("currentMemory") == str(spec.memory_bytes // 1024)
    vcpu = root.find("vcpu")
    assert vcpu is not None and vcpu.text == str(spec.max_vcpus)
    assert vcpu.get("current", vcpu.text) == str(spec.vcpus)
    if spec.cpu_shares is not None:
        assert root.findtext("cputune/shares") == str(spec.cpu_shares)
    # TCG: libvirt spells out QEMU's default model; never host-passthrough.
    cpu = root.find("cpu")
    assert cpu is None or cpu.get("mode") != "host-passthrough"

    disks = {d.find("target").get("dev"): d for d in root.findall("devices/disk")}  # type: ignore[union-attr]
    assert set(disks) == {d.target for d in spec.disks}
    for want in spec.disks:
        got = disks[want.target]
        assert got.get("device") == want.device
        assert got.get("type") == want.kind
        source_attr = "dev" if want.kind == "block" else "file"
        assert got.find("source").get(source_attr) == want.source  # type: ignore[union-attr]
        assert got.find("target").get("bus") == want.bus  # type: ignore[union-attr]
        driver = got.find("driver")
        cache = BLOCK_CACHE if want.kind == "block" else DISK_CACHE
        assert driver is not None and driver.get("type") == want.format and driver.get("cache") == cache
        assert (got.find("readonly") is not None) == want.readonly
        assert (got.findtext("serial") or "") == want.serial
        boot = got.find("boot")
        assert (boot.get("order") if boot is not None else None) == (
            str(want.boot_order) if want.boot_order is not None else None)
    if any(d.bus == "scsi" for d in spec.disks):
        assert root.find("devices/controller[@type='scsi'][@model='virtio-scsi']") is not None
    assert root.find("devices/controller[@type='usb'][@model='none']") is not None

    ifaces = root.findall("devices/interface")
    assert [(i.find("mac").get("address"), i.find("source").get("bridge"),  # type: ignore[union-attr]
             i.find("model").get("type")) for i in ifaces] == [  # type: ignore[union-attr]
        (i.mac, i.bridge, i.model) for i in spec.interfaces]

    serial = root.find("devices/serial")
    assert serial is not None and serial.get("type") == "unix"
    assert serial.find("source").attrib["path"] == spec.serial_socket  # type: ignore[union-attr]
    assert serial.find("log").attrib == {"file": spec.console_log, "append": "on"}  # type: ignore[union-attr]
    assert root.find("devices/console/target").get("type") == "serial"  # type: ignore[union-attr]

    channels = root.findall("devices/channel")
    expected_channels = []
    if spec.guest_agent_socket:
        expected_channels.append(("unix", spec.guest_agent_socket, "org.qemu.guest_agent.0"))
    if spec.workload_exit:
        expected_channels.append(("file", spec.workload_exit, "io.podvisor.exit.0"))
    if spec.volumes_status:
        expected_channels.append(("file", spec.volumes_status, "io.podvisor.volumes.0"))
    assert [(c.get("type"), c.find("source").get("path"), c.find("target").get("name"))  # type: ignore[union-attr]
            for c in channels] == expected_channels

    filesystems = root.findall("devices/filesystem")
    if spec.virtiofs_socket:
        assert root.find("memoryBacking/source").get("type") == "memfd"  # type: ignore[union-attr]
        assert root.find("memoryBacking/access").get("mode") == "shared"  # type: ignore[union-attr]
        assert [(f.find("driver").get("type"), f.find("source").get("socket"),  # type: ignore[union-attr]
                 f.find("target").get("dir")) for f in filesystems] == [  # type: ignore[union-attr]
            ("virtiofs", spec.virtiofs_socket, "podvisor-volumes")]
    else:
        assert filesystems == [] and root.find("memoryBacking") is None
    if spec.firmware == "uefi":
        assert root.findtext("os/loader") == OVMF_CODE
        nvram = root.find("os/nvram")
        assert nvram is not None and nvram.text == spec.uefi_nvram and nvram.get("template") == OVMF_VARS
    assert root.find("devices/rng/backend").text == "/dev/urandom"  # type: ignore[union-attr]
    assert root.find("devices/memballoon/stats").get("period") == "5"  # type: ignore[union-attr]
    assert root.findall("devices/graphics") == []


@pytest.mark.parametrize("case", sorted(CASES))
def test_libvirt_defines_case_and_keeps_metadata(case: str, qemu_dir: Path) -> None:
    if case == "uefi" and not Path(OVMF_CODE).exists():
        pytest.skip(f"{OVMF_CODE} missing (Debian package ovmf)")
    spec = _prepare(case, qemu_dir)
    try:
        _define(spec, qemu_dir)
        dumped = _virsh("dumpxml", spec.name).stdout
        assert 'xmlns:podvisor="https://podvisor.io/xmlns/domain/1"' in dumped
        assert "<podvisor:container>" in dumped
        assert parse_metadata(dumped) == _expected_metadata(spec)
        _assert_libvirt_kept_our_settings(spec, dumped)
    finally:
        _undefine(spec.name)
    assert _virsh("domstate", spec.name, check=False).returncode != 0, "domain still defined"


def test_libvirt_keeps_xml_special_characters(qemu_dir: Path) -> None:
    spec = _prepare("no-nic", qemu_dir)
    nasty = "x<&>'\"]]>"
    spec = dataclasses.replace(spec, name=f"{spec.name}-{nasty}", sandbox_id=nasty, container_id=nasty,
                               pod_name=nasty, serial_socket=f"{qemu_dir}/s{nasty}.sock",
                               console_log=f"{qemu_dir}/c{nasty}.log")
    try:
        _define(spec, qemu_dir)
        dumped = _virsh("dumpxml", spec.uuid).stdout
        assert parse_metadata(dumped) == _expected_metadata(spec)
        root = ET.fromstring(dumped)
        assert root.findtext("name") == spec.name
        assert root.find("devices/serial/source").get("path") == spec.serial_socket  # type: ignore[union-attr]
    finally:
        _virsh("undefine", spec.uuid, check=False)


def test_minimal_domain_starts_and_virtlogd_writes_the_console_log(qemu_dir: Path) -> None:
    spec = _prepare("no-nic", qemu_dir)
    console_log = Path(spec.console_log)
    try:
        _define(spec, qemu_dir)
        _virsh("start", spec.name)
        assert _virsh("domstate", spec.name).stdout.strip() == "running"
        deadline = time.monotonic() + 10
        while not console_log.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert console_log.exists(), "virtlogd did not create the console log"
        assert Path(spec.serial_socket).is_socket()
        assert parse_metadata(_virsh("dumpxml", spec.name).stdout) == _expected_metadata(spec)
    finally:
        _virsh("destroy", spec.name, check=False)
        _undefine(spec.name)
    assert _virsh("domstate", spec.name, check=False).returncode != 0, "domain still defined"


def test_the_workload_exit_file_appears_when_the_domain_starts(qemu_dir: Path) -> None:
    # The agent reads the command's exit code from this file; libvirt (virtlogd,
    # under the default stdio_handler) creates it as the VM starts.
    spec = dataclasses.replace(_prepare("workload-exit", qemu_dir), interfaces=())  # no bridge here
    exit_file = Path(spec.workload_exit)
    try:
        _define(spec, qemu_dir)
        assert not exit_file.exists()
        _virsh("start", spec.name)
        deadline = time.monotonic() + 10
        while not exit_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert exit_file.is_file(), "libvirt did not create the workload exit file"
        assert exit_file.read_bytes() == b""
    finally:
        _virsh("destroy", spec.name, check=False)
        _undefine(spec.name)
    assert _virsh("domstate", spec.name, check=False).returncode != 0, "domain still defined"
