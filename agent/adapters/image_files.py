"""Image content on the host: blobs by digest, per-pull scratch space, and the
shared read-only base disks.

Layout under ``<state>/images``::

    blobs/sha256/<hex>     manifests, configs, layers (content-addressed)
    disks/<config hex>/    validated base disks of one image (read-only files)
    tmp/                   scratch for pulls in progress; emptied at start

Nothing here is readable by other local users: blobs and scratch are 0700
directories of 0600 files; base disks are 0640 ``root:<QEMU's group>``
(``kvm`` on Debian: libvirt's QEMU user reads them as backing files) in a
0750 directory of that group.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from agent.adapters.atomic import fsync_dir, write_atomic
from agent.adapters.kvm import QEMU_USER
from agent.adapters.nospace import no_space_is_exhausted
from agent.domain.oci import digest_hex, parse_digest

_HEX = re.compile(r"^[0-9a-f]{64}$")


def qemu_group(user: str = QEMU_USER) -> int | None:
    """The primary group of libvirt's QEMU user (None when there is no such user)."""
    try:
        return pwd.getpwnam(user).pw_gid
    except KeyError:
        return None


class ImageFiles:
    def __init__(self, images_dir: Path, *, group: int | None = None) -> None:
        self.root = images_dir
        # Base disks are shared with QEMU through this group, no one else.
        self.group = qemu_group() if group is None else group
        self.blobs = images_dir / "blobs" / "sha256"
        self.disks = images_dir / "disks"
        self.tmp = images_dir / "tmp"
        for d in (self.blobs, self.tmp):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        # QEMU (user libvirt-qemu) must reach base disks: traversable, not listable.
        for d in (images_dir, self.disks):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o711)

    # Blobs ----------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.blobs / digest_hex(parse_digest(digest))

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def write_blob(self, digest: str, data: bytes) -> None:
        """Store small verified content (manifests) atomically."""
        path = self.blob_path(digest)
        if path.is_file():
            return
        with no_space_is_exhausted(f"storing blob {digest}", self.blobs):
            write_atomic(path, data)

    def blob_digests(self) -> list[str]:
        return ["sha256:" + p.name for p in self.blobs.iterdir() if _HEX.fullmatch(p.name)]

    def remove_blob(self, digest: str) -> None:
        self.blob_path(digest).unlink(missing_ok=True)

    # Scratch --------------------------------------------------------------

    def new_workdir(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="pull-", dir=self.tmp))

    def clear_tmp(self) -> list[str]:
        """Remove everything a crashed pull left: scratch dirs, partial blobs."""
        removed = []
        for p in self.tmp.iterdir():
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(str(p))
        for p in self.blobs.iterdir():
            if p.name.endswith(".partial") or p.name.startswith(".") and p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)
                removed.append(str(p))
        for p in self.disks.iterdir():
            if p.name.endswith(".partial"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(str(p))
        return removed

    # Base disks -----------------------------------------------------------

    def _disk_dir(self, image_id: str) -> Path:
        return self.disks / digest_hex(parse_digest(image_id))

    def install_disks(self, image_id: str, files: Mapping[str, Path]) -> None:
        """Move extracted, validated disks into place as one atomic step."""
        final = self._disk_dir(image_id)
        if final.exists():
            shutil.rmtree(final)
        staging = final.with_name(final.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for name, src in files.items():
            dest = staging / name
            os.replace(src, dest)
            # Shared by every VM of the image, never written; private to root and QEMU.
            self._share_with_qemu(dest, 0o640)
            # Durable before the image record says it exists.
            fd = os.open(dest, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._share_with_qemu(staging, 0o750)
        os.replace(staging, final)
        fsync_dir(self.disks)

    def _share_with_qemu(self, path: Path, mode: int) -> None:
        """``mode`` with QEMU's group; without one (no QEMU user), owner only
        (libvirt's DAC relabelling then gives QEMU its access)."""
        if self.group is None:
            path.chmod(mode & 0o700)
            return
        os.chown(path, 0 if os.geteuid() == 0 else -1, self.group)
        path.chmod(mode)

    def disk_path(self, image_id: str, file: str) -> Path:
        return self._disk_dir(image_id) / file

    def has_disks(self, image_id: str, files: list[str]) -> bool:
        d = self._disk_dir(image_id)
        return all((d / f).is_file() for f in files) if files else True

    def disk_image_ids(self) -> list[str]:
        return ["sha256:" + p.name for p in self.disks.iterdir() if _HEX.fullmatch(p.name)]

    def remove_disks(self, image_id: str) -> None:
        shutil.rmtree(self._disk_dir(image_id), ignore_errors=True)

    # Usage ----------------------------------------------------------------

    def free_bytes(self) -> int:
        """Bytes an unprivileged writer could still use on the images filesystem."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def usage(self) -> tuple[int, int]:
        """(bytes allocated on disk, inodes) under the images directory."""
        used = inodes = 0
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in dirnames + filenames:
                inodes += 1
                try:
                    used += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
                except FileNotFoundError:
                    pass
        return used, inodes
