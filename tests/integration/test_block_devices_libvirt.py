"""CRI devices against the real node and libvirt (qemu:///system, TCG): loop
devices over files this test writes stand for raw block volumes.

* The BlockDevices adapter finds a loop device, directly and through a
  symlink (as kubelet hands a volumeDevices map), to be a block device.
* A domain rendered with them (``<disk type='block'>``) is defined and
  started: QEMU holds each device open, O_DIRECT (cache='none'), read-write
  or read-only as the spec says, and the host's device nodes keep their
  owner and mode before, during and after (libvirt chowns a private copy in
  the domain's mount namespace; the agent needs to do nothing).

Every loop device is detached (``losetup -d``) and every domain undefined,
even when a test fails.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.adapters.block_devices import BlockDevices
from agent.domain.vm import DiskSpec
from agent.domain.volumes import HostPathKind, device_serial
from tests.integration.test_domain_xml_libvirt import _define, _prepare, _undefine, _virsh

LOOP_BYTES = 4 << 20


def _losetup_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root for losetup and qemu:///system"
    if shutil.which("losetup") is None:
        return "losetup not installed (util-linux)"
    return None


_problem = _losetup_problem()
pytestmark = pytest.mark.skipif(_problem is not None, reason=_problem or "")


@pytest.fixture
def qemu_dir() -> Iterator[Path]:
    """A scratch directory libvirt-qemu can traverse (0711), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="podvisor-blk-"))
    try:
        path.chmod(0o711)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def loops(qemu_dir: Path) -> Iterator[list[str]]:
    """Two loop devices over files in ``qemu_dir``, detached at the end."""
    made: list[str] = []
    try:
        for name in ("rw.img", "ro.img"):
            with open(qemu_dir / name, "wb") as f:
                f.truncate(LOOP_BYTES)
            out = subprocess.run(["losetup", "-f", "--show", str(qemu_dir / name)], capture_output=True,
                                 text=True, timeout=30, check=True)
            made.append(out.stdout.strip())
        yield made
    finally:
        for device in made:
            subprocess.run(["losetup", "-d", device], capture_output=True, timeout=30)


def test_the_adapter_finds_a_loop_device_directly_and_through_a_symlink(loops: list[str], qemu_dir: Path) -> None:
    link = qemu_dir / "volumeDevices-pv"
    link.symlink_to(loops[0])
    for path in (loops[0], str(link)):
        found = BlockDevices().lookup(path)
        assert (found.kind, found.real_path) == (HostPathKind.BLOCK, os.path.realpath(loops[0]))


def _owner(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_uid, st.st_gid, st.st_mode


def _open_flags(pid: int, device: str) -> int:
    """The flags QEMU (``pid``) holds ``device`` open with."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target == device:
            for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
                if line.startswith("flags:"):
                    return int(line.split()[1], 8)
    raise AssertionError(f"QEMU (pid {pid}) does not hold {device} open")


def test_a_domain_with_block_devices_starts_and_qemu_opens_them_as_asked(loops: list[str], qemu_dir: Path) -> None:
    rw, ro = loops
    spec = _prepare("block-devices", qemu_dir)
    own = [d for d in spec.disks if d.kind == "file"]
    spec = dataclasses.replace(spec, interfaces=(), disks=(
        *own,
        DiskSpec(source=rw, format="raw", target="vdc", bus="virtio", serial=device_serial("/dev/xvda"),
                 kind="block"),
        DiskSpec(source=ro, format="raw", target="vdd", bus="virtio", readonly=True,
                 serial=device_serial("/dev/xvdb"), kind="block"),
    ))
    before = {d: _owner(d) for d in loops}
    try:
        _define(spec, qemu_dir)
        _virsh("start", spec.name)
        assert _virsh("domstate", spec.name).stdout.strip() == "running"
        pid = int(Path(f"/run/libvirt/qemu/{spec.name}.pid").read_text().strip())
        rw_flags, ro_flags = _open_flags(pid, rw), _open_flags(pid, ro)
        assert rw_flags & os.O_ACCMODE == os.O_RDWR
        assert ro_flags & os.O_ACCMODE == os.O_RDONLY
        assert rw_flags & os.O_DIRECT and ro_flags & os.O_DIRECT  # cache='none'
        assert {d: _owner(d) for d in loops} == before, "libvirt changed the host's device nodes"
        live = ET.fromstring(_virsh("dumpxml", spec.name).stdout)
        got = {d.findtext("serial"): (d.get("type"), d.find("source").get("dev"),  # type: ignore[union-attr]
                                      d.find("readonly") is not None)
               for d in live.findall("devices/disk")}
        assert got[device_serial("/dev/xvda")] == ("block", rw, False)
        assert got[device_serial("/dev/xvdb")] == ("block", ro, True)
    finally:
        _virsh("destroy", spec.name, check=False)
        _undefine(spec.name)
    assert _virsh("domstate", spec.name, check=False).returncode != 0, "domain still defined"
    # QEMU is gone and the nodes are as they were; nothing holds the loop devices.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
        time.sleep(0.1)
    assert {d: _owner(d) for d in loops} == before
