"""The command's exit-code path with a real guest kernel: the virtio-serial
port ``io.podvisor.exit.0`` in the domain, the guest writing to it, libvirt
putting what it wrote into ``workload.exit``, and the agent's reader.

The tiny guest runs ``#!`` user-data but no ``#cloud-config`` (so not the
workload wrapper: the stock-cloud-init test of the whole path needs the Debian
guest); its script here does what the wrapper does at the end: find the port
(no udev in the tiny guest, so through /sys), write a code, power off. The
domain is defined straight from the renderer, as CreateContainer defines it,
under a unique name, and removed at the end.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.adapters.vm_files import VMFiles
from agent.domain.vm import WORKLOAD_EXIT_CHANNEL, CloudInit, DiskSpec, WorkloadExit
from agent.render.cloudinit import seed_files
from agent.render.domain_xml import render
from agent.render.nocloud import build_seed_iso
from tests.e2e.conftest import virsh
from tests.render.test_domain_xml import case_spec

MiB = 1 << 20
SCRIPT = f"""#!/bin/sh
for d in /sys/class/virtio-ports/*; do
    [ "$(cat "$d/name")" = {WORKLOAD_EXIT_CHANNEL} ] && port=/dev/$(basename "$d")
done
echo "exit port: $port"
printf 'noise from the guest\\n' > "$port"
printf '42\\n' > "$port"
sync
poweroff
"""


@pytest.fixture
def vm_dir() -> Iterator[Path]:
    """A container-like folder libvirt-qemu can traverse, removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="podvisor-exitport-"))
    try:
        root.chmod(0o711)
        directory = root / "sandboxes" / ("a" * 64) / "containers" / ("b" * 64)
        directory.mkdir(parents=True)
        for p in (root / "sandboxes", directory.parent.parent, directory.parent, directory):
            p.chmod(0o711)
        yield directory
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_the_guests_exit_code_reaches_the_agent_through_the_port(tiny_disk: Path, vm_dir: Path) -> None:
    (vm_dir.parents[3] / "run" / "vm").mkdir(parents=True)  # the serial socket's (short) directory
    overlay = vm_dir / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(tiny_disk), str(overlay)],
                   check=True, timeout=60)
    files = seed_files(instance_id="exitport", hostname="exitport", cloud_init=CloudInit(user_data=SCRIPT.encode()))
    seed = vm_dir / "cloudinit.iso"
    seed.write_bytes(build_seed_iso(files["meta-data"], files["user-data"]))
    reader = VMFiles(vm_dir.parents[2], vm_dir.parents[3] / "run")
    paths = reader.container_paths("a" * 64, "b" * 64)
    assert paths.directory == str(vm_dir)
    name = f"podvisor-test-exitport-{uuid.uuid4().hex[:8]}"
    spec = dataclasses.replace(
        case_spec("workload-exit", str(vm_dir)), name=name, uuid=str(uuid.uuid4()), interfaces=(),
        memory_bytes=128 * MiB, max_memory_bytes=128 * MiB, workload_exit=paths.workload_exit,
        serial_socket=paths.serial_socket, console_log=str(vm_dir / "console.raw"),
        disks=(DiskSpec(source=str(overlay), format="qcow2", target="vda", bus="virtio", boot_order=1),
               DiskSpec(source=str(seed), format="raw", target="vdb", bus="virtio", readonly=True,
                        serial="cloudinit")))
    xml = vm_dir / "domain.xml"
    xml.write_text(render(spec))
    try:
        assert virsh("define", str(xml)).returncode == 0
        assert reader.workload_exit(str(vm_dir)) is None  # not started: no file, as for a VM without a command
        assert virsh("start", name).returncode == 0
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if virsh("domstate", name).stdout.strip() == "shut off":
                break
            time.sleep(0.5)
        console = (vm_dir / "console.raw").read_text(errors="replace")
        assert virsh("domstate", name).stdout.strip() == "shut off", console[-2000:]
        assert "exit port: /dev/vport" in console
        assert reader.workload_exit(str(vm_dir)) == WorkloadExit(code=42)
    finally:
        virsh("destroy", name)
        virsh("undefine", name)
