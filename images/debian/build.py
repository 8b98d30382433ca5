#!/usr/bin/env python3
"""Build the Podvisor stock Debian 12 guest disk (debian.qcow2) from Debian packages.

    python3 images/debian/build.py [OUTDIR]    (default /var/cache/podvisor/images/debian)

``mmdebstrap`` installs a bookworm system (PACKAGES) into a directory: the
files of ``rootfs/`` go in before any package (initramfs settings, cloud-init's
datasource list, fstab), ``customize.sh`` runs last (serial getty, no host keys,
empty machine-id, no apt lists). The disk is then assembled in a plain file,
with no loop device and no mount:

* an MBR: syslinux's ``mbr.bin`` and a partition table written here;
* partition 1, FAT32 (mtools), active, with syslinux installed at its offset
  (``syslinux --offset``), holding the kernel and the initramfs that
  initramfs-tools made inside the root;
* partition 2, ext4 labelled ``podvisor-root``, written at its offset by
  ``mkfs.ext4 -d ROOTDIR -E offset=…``; it is last, so cloud-init's growpart
  can grow it on a bigger disk.

A build is keyed by the recipe files and the versions ``apt-cache`` gives for
the listed packages; when OUTDIR holds a build with that key nothing is done.
Standard library only, so it runs with the system python3 as well as the venv.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE_DIR = Path(__file__).resolve().parent
ROOTFS_DIR = RECIPE_DIR / "rootfs"
CUSTOMIZE = RECIPE_DIR / "customize.sh"
SYSLINUX_CFG = RECIPE_DIR / "syslinux.cfg"
DEFAULT_OUTDIR = Path("/var/cache/podvisor/images/debian")

SUITE = "bookworm"
MIRROR = os.environ.get("PODVISOR_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SECURITY_MIRROR = os.environ.get("PODVISOR_DEBIAN_SECURITY_MIRROR", "http://deb.debian.org/debian-security")
# The same suites as a stock bookworm host, so that the versions apt-cache
# shows on the build host are the ones installed.
SOURCES = (
    f"deb {MIRROR} {SUITE} main",
    f"deb {MIRROR} {SUITE}-updates main",
    f"deb {SECURITY_MIRROR} {SUITE}-security main",
)
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
# On top of Essential and apt (mmdebstrap --variant=apt). ifupdown is the
# network stack cloud-init 22.4 renders for first (its "eni" renderer);
# resolvconf applies the dns-nameservers/dns-search lines it writes.
PACKAGES = (
    KERNEL_META_PACKAGE,
    "initramfs-tools",
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "kmod",
    "cloud-init",
    "cloud-guest-utils",
    "qemu-guest-agent",
    "openssh-server",
    "python3",
    "ifupdown",
    "isc-dhcp-client",
    "resolvconf",
    "iproute2",
    "net-tools",  # cloud-init's eni renderer adds routes with route(8)
    "iputils-ping",
    "netbase",
    "sudo",
    "curl",
    "ca-certificates",
    "procps",
    "less",
    "e2fsprogs",
)
# Leave documentation out of the guest (copyright files stay).
DPKG_OPTIONS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
)

ROOT_LABEL = "podvisor-root"
BOOT_LABEL = "PVBOOT"
MIB = 1 << 20
DISK_BYTES = 3 << 30  # virtual size; the qcow2 stores only what is written
BOOT_OFFSET = 1 * MIB
SECTOR = 512
SYSLINUX_MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")
DISK_SIGNATURE = 0x50564442  # "PVDB"
BOOT_VOLUME_ID = "50D1DEB1"
ROOT_UUID = "8d0c7f6e-5f0a-4bd2-9a33-6f9e0c1d2e3a"

QCOW2_NAME = "debian.qcow2"
INFO_NAME = "debian.build.json"
# Bump to force a rebuild when the output layout changes without a recipe change.
FORMAT_VERSION = 1

REQUIRED_TOOLS = {
    "apt-cache": "apt",
    "mmdebstrap": "mmdebstrap",
    "mkfs.ext4": "e2fsprogs",
    "mformat": "mtools",
    "mcopy": "mtools",
    "syslinux": "syslinux (and syslinux-common)",
    "qemu-img": "qemu-utils",
}


def log(message: str) -> None:
    print(f"debian: {message}", file=sys.stderr, flush=True)


def run(args: list[str], cwd: Path | None = None, timeout: float = 600) -> str:
    """Run a command, return its stdout; on failure show its output and stop."""
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"debian: command failed ({proc.returncode}): {' '.join(args)}\n"
                         f"{proc.stdout[-8000:]}{proc.stderr[-8000:]}")
    return proc.stdout


# --- build key -------------------------------------------------------------------


def apt_versions(packages: tuple[str, ...]) -> dict[str, str]:
    """Candidate version of each package (and of the kernel behind the meta package)."""
    text = run(["apt-cache", "show", "--no-all-versions", *packages])
    found: dict[str, dict[str, str]] = {}
    for paragraph in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in paragraph.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, value = line.split(":", 1)
                fields[key] = value.strip()
        if "Package" in fields and "Version" in fields:
            found.setdefault(fields["Package"], fields)
    missing = [package for package in packages if package not in found]
    if missing:
        raise SystemExit(f"debian: apt-cache knows no version of {', '.join(missing)}; run apt-get update")
    versions = {name: fields["Version"] for name, fields in found.items() if name in packages}
    if KERNEL_META_PACKAGE not in packages:
        return versions
    # e.g. "linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)"
    depends = found[KERNEL_META_PACKAGE].get("Depends", "")
    match = re.match(r"\s*(linux-image-[^\s(,|]+)", depends)
    if match is None:
        raise SystemExit(f"debian: cannot find the kernel package in {KERNEL_META_PACKAGE}: {depends}")
    if match.group(1) not in versions:
        versions.update(apt_versions((match.group(1),)))
    return versions


def recipe_files() -> list[Path]:
    """Files whose content defines the image (documentation excluded)."""
    return sorted(
        p
        for p in RECIPE_DIR.rglob("*")
        if p.is_file() and p.suffix not in {".md", ".pyc", ".inc"} and "__pycache__" not in p.parts
    )


def build_key(versions: dict[str, str]) -> str:
    digest = hashlib.sha256()
    digest.update(f"format {FORMAT_VERSION}\n".encode())
    digest.update(json.dumps({"sources": SOURCES, "versions": versions}, sort_keys=True).encode())
    for path in recipe_files():
        rel = path.relative_to(RECIPE_DIR).as_posix()
        mode = "x" if os.access(path, os.X_OK) else "-"
        digest.update(f"\0{rel}\0{mode}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def current_build(outdir: Path, key: str) -> bool:
    try:
        info = json.loads((outdir / INFO_NAME).read_text())
    except (OSError, ValueError):
        return False
    return bool(info.get("key") == key and (outdir / QCOW2_NAME).is_file())


# --- root file system ---------------------------------------------------------------


def bootstrap(root: Path) -> None:
    """mmdebstrap the guest's root into ``root`` (an empty directory)."""
    args = [
        "mmdebstrap", "--mode=root", "--variant=apt", "--format=directory",
        # customize.sh cleans apt's lists and cache inside the root. mmdebstrap's
        # own clean-up runs the host's apt-get with a config file in TMPDIR;
        # were that file gone, it would empty the host's lists instead.
        "--skip=cleanup/apt",
        "--include=" + ",".join(PACKAGES),
        *(f"--dpkgopt={opt}" for opt in DPKG_OPTIONS),
        f"--setup-hook=sync-in {ROOTFS_DIR} /",
        f"--customize-hook={CUSTOMIZE}",
        SUITE, str(root), *SOURCES,
    ]  # fmt: skip
    log(f"mmdebstrap {SUITE} into {root} (several minutes)")
    started = time.monotonic()
    tmp = root.parent / "tmp"
    tmp.mkdir(mode=0o700)
    proc = subprocess.run(args, capture_output=True, text=True, check=False, timeout=3600,
                          env={**os.environ, "TMPDIR": str(tmp)})
    if proc.returncode != 0:
        raise SystemExit(f"debian: mmdebstrap failed ({proc.returncode}):\n{proc.stdout[-8000:]}{proc.stderr[-8000:]}")
    log(f"mmdebstrap done in {time.monotonic() - started:.0f} s")


def installed_versions(root: Path) -> dict[str, str]:
    out = run(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f", "${Package} ${Version}\n"])
    return dict(line.split(" ", 1) for line in out.splitlines() if line)


def kernel_files(root: Path) -> tuple[Path, Path, str]:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise SystemExit(f"debian: expected one kernel in {root}/boot, found {kernels}")
    release = kernels[0].name.removeprefix("vmlinuz-")
    initrd = root / "boot" / f"initrd.img-{release}"
    if not initrd.is_file():
        raise SystemExit(f"debian: initramfs-tools made no {initrd}")
    return kernels[0], initrd, release


# --- disk ------------------------------------------------------------------------


def partition_entry(bootable: bool, kind: int, start: int, sectors: int) -> bytes:
    """One MBR partition entry; CHS fields say "use LBA" (1023/254/63)."""
    chs = b"\xfe\xff\xff"
    return struct.pack("<B3sB3sII", 0x80 if bootable else 0, chs, kind, chs, start, sectors)


def write_mbr(raw: Path, boot: tuple[int, int], root: tuple[int, int]) -> None:
    code = SYSLINUX_MBR.read_bytes()
    if len(code) > 440:
        raise SystemExit(f"debian: {SYSLINUX_MBR} is {len(code)} bytes, more than 440")
    mbr = bytearray(SECTOR)
    mbr[: len(code)] = code
    mbr[440:444] = struct.pack("<I", DISK_SIGNATURE)
    table = partition_entry(True, 0x0C, boot[0] // SECTOR, boot[1] // SECTOR)  # FAT32 (LBA)
    table += partition_entry(False, 0x83, root[0] // SECTOR, root[1] // SECTOR)  # Linux
    mbr[446 : 446 + len(table)] = table
    mbr[510:512] = b"\x55\xaa"
    with raw.open("r+b") as f:
        f.write(mbr)


def build_disk(work: Path, root: Path, kernel: Path, initrd: Path) -> tuple[Path, dict[str, int]]:
    payload = kernel.stat().st_size + initrd.stat().st_size
    boot_bytes = max(64 * MIB, (payload * 2 + 8 * MIB + MIB - 1) // MIB * MIB)
    root_offset = BOOT_OFFSET + boot_bytes
    root_bytes = DISK_BYTES - root_offset
    raw = work / "debian.raw"
    with raw.open("wb") as f:
        f.truncate(DISK_BYTES)
    write_mbr(raw, (BOOT_OFFSET, boot_bytes), (root_offset, root_bytes))

    # Partition 1: FAT32 whose boot sector knows it starts BOOT_OFFSET into the
    # disk (hidden sectors), syslinux installed there, then kernel + initramfs.
    fat = f"{raw}@@{BOOT_OFFSET}"
    run(["mformat", "-i", fat, "-F", "-T", str(boot_bytes // SECTOR), "-h", "64", "-s", "32",
         "-H", str(BOOT_OFFSET // SECTOR), "-v", BOOT_LABEL, "-N", BOOT_VOLUME_ID, "::"])  # fmt: skip
    run(["syslinux", "--offset", str(BOOT_OFFSET), "--install", str(raw)])
    run(["mcopy", "-i", fat, str(SYSLINUX_CFG), "::syslinux.cfg"])
    run(["mcopy", "-i", fat, str(kernel), "::vmlinuz"])
    run(["mcopy", "-i", fat, str(initrd), "::initrd.img"])

    # Partition 2: ext4 made from the root directory, in place in the file.
    proc = subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-L", ROOT_LABEL, "-U", ROOT_UUID, "-d", str(root),
         "-E", f"offset={root_offset}", str(raw), f"{root_bytes // 1024}k"],
        capture_output=True, text=True, check=False, timeout=1800,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"debian: mkfs.ext4 failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    if raw.stat().st_size != DISK_BYTES:
        raise SystemExit(f"debian: mkfs.ext4 changed the disk size to {raw.stat().st_size}")
    with raw.open("rb") as f:
        f.seek(root_offset + 1024 + 56)
        if f.read(2) != b"\x53\xef":
            raise SystemExit("debian: no ext4 superblock at the root partition's offset")
    return raw, {"boot_offset": BOOT_OFFSET, "boot_bytes": boot_bytes,
                 "root_offset": root_offset, "root_bytes": root_bytes}


def du_bytes(root: Path) -> int:
    return int(run(["du", "-sxb", str(root)]).split()[0])


def build(outdir: Path, versions: dict[str, str], key: str) -> None:
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=outdir))
    try:
        root = work / "root"
        bootstrap(root)
        kernel, initrd, release = kernel_files(root)
        modules = run(["chroot", str(root), "lsinitramfs", f"/boot/{initrd.name}"])
        for needed in ("virtio_blk", "virtio_pci"):
            if f"/{needed}.ko" not in modules:
                raise SystemExit(f"debian: {needed} is not in {initrd.name}")
        log(f"kernel {release}; root {du_bytes(root) // MIB} MiB")
        raw, layout = build_disk(work, root, kernel, initrd)
        qcow2 = work / QCOW2_NAME
        log("qemu-img convert -c")
        run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], timeout=1800)
        installed = installed_versions(root)
        info = {
            "key": key,
            "format": FORMAT_VERSION,
            "suite": SUITE,
            "sources": list(SOURCES),
            "kernel_release": release,
            "apt_versions": versions,
            "installed": installed,
            "root_label": ROOT_LABEL,
            **layout,
            "disk_bytes": DISK_BYTES,
            "root_used_bytes": du_bytes(root),
            "qcow2_bytes": qcow2.stat().st_size,
        }
        (outdir / INFO_NAME).unlink(missing_ok=True)
        os.replace(qcow2, outdir / QCOW2_NAME)
        (work / INFO_NAME).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        os.replace(work / INFO_NAME, outdir / INFO_NAME)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", nargs="?", type=Path, default=DEFAULT_OUTDIR)
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    outdir: Path = args.outdir.resolve()

    missing = sorted({pkg for tool, pkg in REQUIRED_TOOLS.items() if shutil.which(tool) is None})
    if not SYSLINUX_MBR.is_file():
        missing.append("syslinux-common")
    if missing:
        raise SystemExit(f"debian: missing host tools; apt-get install {' '.join(missing)}")
    if os.geteuid() != 0:
        raise SystemExit("debian: mmdebstrap --mode=root needs root")

    versions = apt_versions(PACKAGES)
    key = build_key(versions)
    if not args.force and current_build(outdir, key):
        log(f"up to date: {outdir / QCOW2_NAME}")
        return 0

    outdir.mkdir(parents=True, exist_ok=True)
    # One builder per OUTDIR; others wait, then find the build done.
    with (outdir / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not args.force and current_build(outdir, key):
            log(f"up to date: {outdir / QCOW2_NAME}")
            return 0
        log(f"building in {outdir} (key {key[:12]})")
        build(outdir, versions, key)
    log(f"built {outdir / QCOW2_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
