"""The stock Debian 12 guest disk (images/debian), inspected without booting it:
the partition table, the boot partition syslinux boots from, and what the
root file system must and must not hold (no SSH host keys, no machine ID, no
apt lists, NoCloud first). Reads the built disk with mtools and debugfs at
the partitions' offsets: nothing is mounted. Booting it is in
tests/e2e/test_debian_guest.py.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "images" / "debian" / "build.py"
IMAGE_DIR = Path(os.environ.get("PODVISOR_DEBIAN_IMAGE_DIR", "/var/cache/podvisor/images/debian"))
SECTOR = 512


@dataclass
class Disk:
    raw: Path
    info: dict[str, object]

    @property
    def root(self) -> str:
        return f"{self.raw}?offset={self.info['root_offset']}"

    def debugfs(self, request: str) -> str:
        out = subprocess.run(["debugfs", "-R", request, self.root], capture_output=True, text=True,
                             timeout=60, check=True)
        return out.stdout

    def names(self, directory: str) -> list[str]:
        """Entries of a directory (debugfs ``ls -p``: /inode/mode/uid/gid/name/size/)."""
        lines = [line for line in self.debugfs(f"ls -p {directory}").splitlines() if line.startswith("/")]
        return sorted(name for line in lines if (name := line.split("/")[5]) not in {".", ".."})

    def cat(self, path: str) -> str:
        return self.debugfs(f"cat {path}")

    def exists(self, path: str) -> bool:
        out = subprocess.run(["debugfs", "-R", f"stat {path}", self.root], capture_output=True, text=True,
                             timeout=60, check=True)
        return "File not found" not in out.stderr


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Disk]:
    for tool in ("debugfs", "mdir", "mtype", "qemu-img"):
        assert shutil.which(tool), f"{tool} is missing (e2fsprogs, mtools, qemu-utils)"
    subprocess.run([sys.executable, str(BUILD_SCRIPT), str(IMAGE_DIR)], check=True, timeout=3600)
    raw = tmp_path_factory.mktemp("debian-disk") / "debian.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(IMAGE_DIR / "debian.qcow2"), str(raw)],
                   check=True, timeout=600)
    try:
        yield Disk(raw, json.loads((IMAGE_DIR / "debian.build.json").read_text()))
    finally:
        raw.unlink(missing_ok=True)


def test_mbr_boots_the_active_fat_partition_then_ext4_to_the_end(disk: Disk) -> None:
    mbr = disk.raw.read_bytes()[:SECTOR]
    assert mbr[510:] == b"\x55\xaa"
    code = Path("/usr/lib/syslinux/mbr/mbr.bin").read_bytes()
    assert mbr[: len(code)] == code
    entries = [struct.unpack_from("<B3sB3sII", mbr, 446 + 16 * i) for i in range(4)]
    (boot_flag, _, boot_type, _, boot_start, boot_len), (root_flag, _, root_type, _, root_start, root_len) = entries[:2]
    assert entries[2][2] == entries[3][2] == 0  # unused
    assert (boot_flag, boot_type, root_flag, root_type) == (0x80, 0x0C, 0, 0x83)
    assert boot_start * SECTOR == disk.info["boot_offset"] == 1 << 20
    assert root_start == boot_start + boot_len
    assert root_start * SECTOR == disk.info["root_offset"]
    assert (root_start + root_len) * SECTOR == disk.raw.stat().st_size == disk.info["disk_bytes"]


def test_boot_partition_holds_syslinux_the_kernel_and_the_initramfs(disk: Disk) -> None:
    fat = f"{disk.raw}@@{disk.info['boot_offset']}"
    listing = subprocess.run(["mdir", "-a", "-b", "-i", fat, "::"], capture_output=True, text=True, check=True,
                             timeout=60).stdout.split()
    assert {"::/ldlinux.sys", "::/ldlinux.c32", "::/syslinux.cfg", "::/vmlinuz", "::/initrd.img"} <= set(listing)
    cfg = subprocess.run(["mtype", "-i", fat, "::syslinux.cfg"], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    assert "root=LABEL=podvisor-root" in cfg and "console=ttyS0" in cfg


def test_root_is_ext4_labelled_for_the_kernel_command_line(disk: Disk) -> None:
    with disk.raw.open("rb") as f:
        f.seek(int(str(disk.info["root_offset"])) + 1024)
        superblock = f.read(1024)
    assert superblock[56:58] == b"\x53\xef"  # ext2/3/4 magic
    assert superblock[120:136].rstrip(b"\0") == b"podvisor-root"
    assert "LABEL=podvisor-root" in disk.cat("/etc/fstab")


def test_no_per_instance_identity_is_baked_in(disk: Disk) -> None:
    assert not [n for n in disk.names("/etc/ssh") if n.startswith("ssh_host_")]
    assert disk.cat("/etc/machine-id") == ""
    assert not disk.exists("/var/lib/dbus/machine-id")
    assert disk.names("/var/lib/apt/lists") == ["partial"]
    assert disk.names("/var/lib/apt/lists/partial") == []
    assert not [n for n in disk.names("/var/cache/apt/archives") if n.endswith(".deb")]
    assert not disk.exists("/etc/resolvconf/resolv.conf.d/original")  # the build host's resolver


def test_stock_cloud_init_reads_nocloud_and_the_console_has_a_getty(disk: Disk) -> None:
    assert "datasource_list: [NoCloud, None]" in disk.cat("/etc/cloud/cloud.cfg.d/99_podvisor.cfg")
    assert "serial-getty@ttyS0.service" in disk.names("/etc/systemd/system/getty.target.wants")
    installed = disk.info["installed"]
    assert isinstance(installed, dict)
    for package in ("cloud-init", "qemu-guest-agent", "openssh-server", "python3", "systemd-sysv",
                    "ifupdown", "isc-dhcp-client", "linux-image-cloud-amd64", "sudo"):
        assert package in installed, package
    # The renderer cloud-init 22.4 picks first (eni) needs these, and the image has them.
    for path in ("/usr/sbin/ifup", "/usr/sbin/ifquery", "/etc/network/interfaces", "/usr/sbin/route"):
        assert disk.exists(path), path
