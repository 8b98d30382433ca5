#!/usr/bin/env python3
"""Build the Podvisor tiny test guest disk (tiny.raw + tiny.qcow2) from Debian packages.

    python3 images/tiny/build.py [OUTDIR]      (default /var/cache/podvisor/images/tiny)

The kernel comes from ``linux-image-cloud-amd64`` and userland from
``busybox-static``; both .debs are fetched with ``apt-get download`` and
unpacked with ``dpkg-deb -x``, never installed. The initramfs is written here
(cpio newc + gzip), the disk is a FAT "superfloppy" made with mtools and made
bootable with ``syslinux --install`` on the image file: no root mounts, no loop
devices. A build is keyed by the recipe files and the package versions; when
OUTDIR already holds a build with the same key nothing is done.

Standard library only, so it runs with the system python3 as well as the venv.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

RECIPE_DIR = Path(__file__).resolve().parent
ROOTFS_DIR = RECIPE_DIR / "rootfs"
DEFAULT_OUTDIR = Path("/var/cache/podvisor/images/tiny")

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"

RAW_NAME = "tiny.raw"
QCOW2_NAME = "tiny.qcow2"
INFO_NAME = "tiny.build.json"
# Also left beside the disk for direct kernel boot (-kernel/-initrd) and debugging.
KERNEL_NAME = "vmlinuz"
INITRD_NAME = "initrd.gz"
# Bump to force a rebuild when the output layout changes without a recipe change.
FORMAT_VERSION = 1

# Modules the guest needs; dependencies are added from each module's .modinfo.
# virtio_*: disk, NIC, console, balloon, RNG and virtio-scsi cdroms; ata_piix,
# sr_mod, sd_mod: IDE cdrom/disk on the i440fx "pc" machine (this kernel has no
# AHCI, so a seed on q35's SATA cdrom cannot be read); isofs: the seed; evdev +
# button: the ACPI power button as an input device for acpid.
WANTED_MODULES = (
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio_scsi",
    "virtio_balloon",
    "virtio_rng",
    "ata_piix",
    "ata_generic",
    "sd_mod",
    "sr_mod",
    "isofs",
    "evdev",
    "button",
)

REQUIRED_TOOLS = {
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg-deb": "dpkg",
    "mformat": "mtools",
    "mcopy": "mtools",
    "syslinux": "syslinux (and syslinux-common)",
    "qemu-img": "qemu-utils",
}


def log(message: str) -> None:
    print(f"tiny: {message}", file=sys.stderr, flush=True)


def run(args: list[str], cwd: Path | None = None) -> str:
    """Run a command, return its stdout; on failure show its output and stop."""
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"tiny: command failed ({proc.returncode}): {' '.join(args)}\n{proc.stdout}{proc.stderr}")
    return proc.stdout


# --- packages ----------------------------------------------------------------


def apt_show(*packages: str) -> dict[str, dict[str, str]]:
    """Fields of each package's candidate version, from the local apt lists (one apt-cache run)."""
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
        raise SystemExit(f"tiny: apt-cache knows no version of {', '.join(missing)}; run apt-get update")
    return found


@dataclass(frozen=True)
class Packages:
    kernel: str
    kernel_version: str
    busybox_version: str

    def as_dict(self) -> dict[str, str]:
        return {
            "kernel_package": self.kernel,
            "kernel_version": self.kernel_version,
            "busybox_package": BUSYBOX_PACKAGE,
            "busybox_version": self.busybox_version,
        }


def resolve_packages() -> Packages:
    """The concrete kernel package behind the meta package, and both versions."""
    shown = apt_show(KERNEL_META_PACKAGE, BUSYBOX_PACKAGE)
    depends = shown[KERNEL_META_PACKAGE].get("Depends", "")
    # e.g. "linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)"
    match = re.match(r"\s*(linux-image-[^\s(,|]+)(?:\s*\(=\s*([^)\s]+)\))?", depends)
    if match is None:
        raise SystemExit(f"tiny: cannot find the kernel package in {KERNEL_META_PACKAGE}: {depends}")
    kernel, kernel_version = match.group(1), match.group(2)
    if kernel_version is None:
        kernel_version = apt_show(kernel)[kernel]["Version"]
    return Packages(
        kernel=kernel,
        kernel_version=kernel_version,
        busybox_version=shown[BUSYBOX_PACKAGE]["Version"],
    )


def fetch_deb(package: str, version: str, cache: Path) -> Path:
    """Path of package_version .deb in the cache, downloading it if missing."""
    cache.mkdir(parents=True, exist_ok=True)
    for deb in sorted(cache.glob(f"{package}_*.deb")):
        fields = run(["dpkg-deb", "-f", str(deb), "Package", "Version"])
        if f"Version: {version}\n" in fields and f"Package: {package}\n" in fields:
            return deb
        deb.unlink()  # an older version: keep the cache small
    log(f"downloading {package}={version}")
    run(["apt-get", "download", f"{package}={version}"], cwd=cache)
    found = sorted(cache.glob(f"{package}_*.deb"))
    if not found:
        raise SystemExit(f"tiny: apt-get download left no {package} .deb in {cache}")
    return found[0]


# --- build key -------------------------------------------------------------------


def recipe_files() -> list[Path]:
    """Files whose content defines the image (documentation excluded)."""
    return sorted(
        p
        for p in RECIPE_DIR.rglob("*")
        if p.is_file() and p.suffix not in {".md", ".pyc", ".inc"} and "__pycache__" not in p.parts
    )


def build_key(packages: Packages) -> str:
    digest = hashlib.sha256()
    digest.update(f"format {FORMAT_VERSION}\n".encode())
    digest.update(json.dumps(packages.as_dict(), sort_keys=True).encode())
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
    outputs = (RAW_NAME, QCOW2_NAME, KERNEL_NAME, INITRD_NAME)
    return info.get("key") == key and all((outdir / name).is_file() for name in outputs)


# --- kernel modules ------------------------------------------------------------


def modinfo_depends(ko: Path) -> list[str]:
    """The ``depends=`` list from the .modinfo section of an ELF64 module."""
    data = ko.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise SystemExit(f"tiny: {ko} is not a little-endian ELF64 module")
    shoff = int.from_bytes(data[0x28:0x30], "little")
    shentsize = int.from_bytes(data[0x3A:0x3C], "little")
    shnum = int.from_bytes(data[0x3C:0x3E], "little")
    shstrndx = int.from_bytes(data[0x3E:0x40], "little")

    def section(index: int) -> tuple[int, int, int]:
        base = shoff + index * shentsize
        name = int.from_bytes(data[base : base + 4], "little")
        offset = int.from_bytes(data[base + 0x18 : base + 0x20], "little")
        size = int.from_bytes(data[base + 0x20 : base + 0x28], "little")
        return name, offset, size

    _, strtab, _ = section(shstrndx)
    for index in range(shnum):
        name, offset, size = section(index)
        end = data.index(b"\0", strtab + name)
        if data[strtab + name : end] == b".modinfo":
            for entry in data[offset : offset + size].split(b"\0"):
                if entry.startswith(b"depends="):
                    value = entry[len(b"depends=") :].decode()
                    return [dep for dep in value.split(",") if dep]
            return []
    return []


def module_name(path: str) -> str:
    return Path(path).name.removesuffix(".ko").replace("-", "_")


def select_modules(moddir: Path) -> list[Path]:
    """WANTED_MODULES that are not built in, with dependencies, dependencies first."""
    builtin = {
        module_name(line.strip()) for line in (moddir / "modules.builtin").read_text().splitlines() if line.strip()
    }
    index = {module_name(ko.name): ko for ko in (moddir / "kernel").rglob("*.ko")}
    ordered: list[Path] = []
    seen: set[str] = set()

    def visit(name: str, wanted_by: str) -> None:
        if name in seen or name in builtin:
            return
        seen.add(name)
        ko = index.get(name)
        if ko is None:
            raise SystemExit(f"tiny: module {name} (for {wanted_by}) is not in {moddir}")
        for dep in modinfo_depends(ko):
            visit(dep, name)
        ordered.append(ko)

    for name in WANTED_MODULES:
        visit(name, "the guest")
    return ordered


# --- initramfs -----------------------------------------------------------------


@dataclass(frozen=True)
class CpioEntry:
    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def cpio_newc(entries: Iterable[CpioEntry]) -> bytes:
    """A cpio archive in the kernel's initramfs format; uid/gid/mtime are 0."""
    out = bytearray()

    def record(ino: int, entry: CpioEntry) -> None:
        name = entry.path.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        fields = (
            ino, entry.mode, 0, 0, nlink, 0, len(entry.data), 0, 0,
            entry.rdev[0], entry.rdev[1], len(name), 0,
        )  # fmt: skip
        out.extend(b"070701" + b"".join(b"%08X" % value for value in fields))
        out.extend(name)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(entry.data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, entry in enumerate(entries, start=1):
        record(ino, entry)
    record(0, CpioEntry("TRAILER!!!", 0))
    return bytes(out)


def initramfs_entries(busybox: Path, modules: list[Path]) -> list[CpioEntry]:
    entries: dict[str, CpioEntry] = {}

    def add(entry: CpioEntry) -> None:
        parent = Path(entry.path).parent
        while str(parent) != ".":
            entries.setdefault(str(parent), CpioEntry(str(parent), stat.S_IFDIR | 0o755))
            parent = parent.parent
        entries[entry.path] = entry

    for directory in ("dev", "proc", "sys", "run", "root", "seed", "www", "var/log", "etc"):
        add(CpioEntry(directory, stat.S_IFDIR | 0o755))
    add(CpioEntry("tmp", stat.S_IFDIR | 0o1777))
    # The kernel opens /dev/console for init before anything is mounted.
    add(CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
    add(CpioEntry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)))

    add(CpioEntry("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes()))
    applets = run([str(busybox), "--list-full"]).split()
    for applet in applets:
        if applet != "bin/busybox":
            add(CpioEntry(applet, stat.S_IFLNK | 0o777, b"/bin/busybox"))
    add(CpioEntry("init", stat.S_IFLNK | 0o777, b"/bin/busybox"))

    for path in sorted(ROOTFS_DIR.rglob("*")):
        rel = path.relative_to(ROOTFS_DIR).as_posix()
        if path.is_dir():
            add(CpioEntry(rel, stat.S_IFDIR | 0o755))
        else:
            mode = 0o755 if os.access(path, os.X_OK) else 0o644
            add(CpioEntry(rel, stat.S_IFREG | mode, path.read_bytes()))

    for ko in modules:
        add(CpioEntry(f"lib/modules/{module_name(ko.name)}.ko", stat.S_IFREG | 0o644, ko.read_bytes()))
    order = "".join(module_name(ko.name) + "\n" for ko in modules)
    add(CpioEntry("lib/modules/load.order", stat.S_IFREG | 0o644, order.encode()))

    # Sorted paths put every directory before its contents.
    return [entries[path] for path in sorted(entries)]


# --- disk ------------------------------------------------------------------------


def build_disk(work: Path, kernel: Path, initrd: Path) -> Path:
    """A bootable FAT superfloppy holding syslinux, the kernel and the initramfs."""
    payload = kernel.stat().st_size + initrd.stat().st_size
    mib = 1 << 20
    size = (payload + 2 * mib + mib - 1) // mib * mib  # FAT overhead + syslinux + slack
    raw = work / RAW_NAME
    with raw.open("wb") as f:
        f.truncate(size)
    # 64 heads x 32 sectors: 1 MiB cylinders, the geometry syslinux expects on disks.
    run(["mformat", "-i", str(raw), "-T", str(size // 512), "-h", "64", "-s", "32",
         "-v", "PODVISOR", "-N", "50D15000", "::"])  # fmt: skip
    run(["syslinux", "--install", str(raw)])
    run(["mcopy", "-i", str(raw), str(RECIPE_DIR / "syslinux.cfg"), "::syslinux.cfg"])
    run(["mcopy", "-i", str(raw), str(kernel), "::vmlinuz"])
    run(["mcopy", "-i", str(raw), str(initrd), "::initrd.gz"])
    return raw


def build(outdir: Path, packages: Packages, key: str) -> None:
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=outdir))
    try:
        debs = outdir / "debs"
        kernel_deb = fetch_deb(packages.kernel, packages.kernel_version, debs)
        busybox_deb = fetch_deb(BUSYBOX_PACKAGE, packages.busybox_version, debs)
        for stale in set(debs.glob("*.deb")) - {kernel_deb, busybox_deb}:
            stale.unlink()  # e.g. the previous kernel ABI's package
        log(f"unpacking {kernel_deb.name} and {busybox_deb.name}")
        run(["dpkg-deb", "-x", str(kernel_deb), str(work / "kernel")])
        run(["dpkg-deb", "-x", str(busybox_deb), str(work / "busybox")])

        moddirs = sorted((work / "kernel/lib/modules").iterdir())
        if len(moddirs) != 1:
            raise SystemExit(f"tiny: expected one kernel in {kernel_deb.name}, found {moddirs}")
        kernel_release = moddirs[0].name
        vmlinuz = work / "kernel/boot" / f"vmlinuz-{kernel_release}"
        modules = select_modules(moddirs[0])
        log(f"kernel {kernel_release}, modules: {' '.join(module_name(m.name) for m in modules)}")

        archive = cpio_newc(initramfs_entries(work / "busybox/bin/busybox", modules))
        initrd = work / "initrd.gz"
        initrd.write_bytes(gzip.compress(archive, compresslevel=9, mtime=0))

        raw = build_disk(work, vmlinuz, initrd)
        qcow2 = work / QCOW2_NAME
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)])

        info = {
            "key": key,
            "format": FORMAT_VERSION,
            **packages.as_dict(),
            "kernel_release": kernel_release,
            "modules": [module_name(m.name) for m in modules],
            "kernel_bytes": vmlinuz.stat().st_size,
            "initrd_bytes": initrd.stat().st_size,
            "raw_bytes": raw.stat().st_size,
        }
        # Outputs first, the key last: a crash never leaves a stale key on new files.
        (outdir / INFO_NAME).unlink(missing_ok=True)
        os.replace(raw, outdir / RAW_NAME)
        os.replace(qcow2, outdir / QCOW2_NAME)
        os.replace(initrd, outdir / INITRD_NAME)
        shutil.copyfile(vmlinuz, outdir / KERNEL_NAME)
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
    if missing:
        raise SystemExit(f"tiny: missing host tools; apt-get install {' '.join(missing)}")

    packages = resolve_packages()
    key = build_key(packages)
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
        build(outdir, packages, key)
    log(f"built {outdir / RAW_NAME} and {outdir / QCOW2_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
