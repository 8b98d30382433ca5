"""Applying image layers to find the containerDisk file under /disk/.

Layers are applied bottom to top in one streaming pass each (compressed tar →
tar entries), as an image's filesystem would be assembled, but only files
under ``disk/`` are ever written, to temporary files this module names itself.
Whiteouts (``.wh.<name>`` and the opaque ``.wh..wh..opq``) remove what lower
layers put there.

Safety: an entry whose name is absolute or climbs out with ``..`` makes the
whole image unusable (no legitimate image has one, and it is the classic tar
attack). Links, devices and FIFOs are never extracted; under ``disk/`` they
are recorded as "not a regular file" so that choosing one as the disk fails
with that reason. No extracted file may exceed ``max_file_bytes`` (an image
must not fill the host's disk before qemu-img has judged it). Each layer's
uncompressed tar stream is hashed as it is read: that is the layer's diff_id,
which the caller checks against the image config's ``rootfs.diff_ids``.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from agent.adapters.nospace import exhausted, is_no_space
from agent.adapters.tar_guard import HeaderRefused, entries, open_guarded
from agent.domain.errors import FailedPrecondition, ResourceExhausted
from agent.domain.image import DiskFile
from agent.domain.oci import Compression

DISK_DIR = "disk"
WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
_CHUNK = 1 << 20
_ZEROS = bytes(_CHUNK)
_WRITEBACK_STEP = 32 << 20
# Default bound on one extracted file: [images] max_virtual_size_bytes' default
# (1 TiB) plus room for qcow2 metadata. The image service passes its own.
DEFAULT_MAX_FILE_BYTES = (1 << 40) + (64 << 20)
# Free space is checked this often while a file is written (and before each).
_SPACE_CHECK_STEP = 32 << 20


def normalise_entry(name: str, layer: str) -> str:
    """The tar entry's path relative to the image root; refuses escapes."""
    if name.startswith("/"):
        raise FailedPrecondition(f"layer {layer}: unsafe tar entry {name!r} (absolute path)")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise FailedPrecondition(f"layer {layer}: unsafe tar entry {name!r} ('..' leaves the image root)")
    return "/".join(parts)


def _under(path: str, directory: str) -> bool:
    return directory == "" or path == directory or path.startswith(directory + "/")


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hard link"
    if member.ischr() or member.isblk():
        return "device"
    if member.isfifo():
        return "fifo"
    return "special file"


class _GzipReader(io.RawIOBase):
    """gzip decompression in large steps (GzipFile's small reads cost 3x here).

    Handles concatenated members, bounds each step's output (a small blob
    cannot balloon into memory), and refuses a stream that ends mid-member.
    """

    _OUT = 4 << 20

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__()
        self._raw = raw
        self._z = zlib.decompressobj(wbits=31)
        self._pending = b""  # compressed input not yet fed
        self._out = memoryview(b"")
        self._eof = False

    def readable(self) -> bool:
        return True

    def _fill(self) -> None:
        while not self._out and not self._eof:
            if self._z.eof:
                rest = self._z.unused_data + self._pending
                self._pending = b""
                if not rest:
                    rest = self._raw.read(_CHUNK)
                if not rest or not rest.strip(b"\0"):
                    self._eof = True  # end of the last member (zero padding tolerated)
                    return
                self._z = zlib.decompressobj(wbits=31)
                self._pending = rest
            data = self._z.unconsumed_tail or self._pending or self._raw.read(_CHUNK)
            self._pending = b""
            if not data:
                raise EOFError("gzip stream ended before its end marker")
            try:
                self._out = memoryview(self._z.decompress(data, self._OUT))
            except zlib.error as exc:
                raise OSError(f"bad gzip data: {exc}") from None

    def readinto(self, buffer: Any) -> int:
        self._fill()
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n


class _ZstdReader(io.RawIOBase):
    """zstd decompression whose errors surface as OSError like the others."""

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__()
        self._reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self._reader.read(len(buffer))
        except zstandard.ZstdError as exc:
            raise OSError(f"bad zstd data: {exc}") from None
        buffer[: len(data)] = data
        return len(data)


class _HashingReader(io.RawIOBase):
    """Hashes everything read through it (the layer's uncompressed tar: its diff_id)."""

    def __init__(self, raw: Any) -> None:
        super().__init__()
        self._raw = raw
        self._hash = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:  # no readinto copy: tarfile only calls read
        data: bytes = self._raw.read(size)
        self._hash.update(data)
        return data

    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


def open_layer(stream: BinaryIO, compression: Compression) -> Any:
    """Wrap a layer blob stream in its decompressor."""
    if compression is Compression.GZIP:
        return io.BufferedReader(_GzipReader(stream), _CHUNK)
    if compression is Compression.ZSTD:
        return io.BufferedReader(_ZstdReader(stream), _CHUNK)
    return stream


class DiskExtractor:
    """Feed layers bottom to top; then ask which disk files the image holds."""

    def __init__(self, workdir: Path, image: str, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
                 max_total_bytes: int | None = None, min_free_bytes: int = 0, *, one_disk: bool = True) -> None:
        self.workdir = workdir
        self.image = image
        self.max_file_bytes = max_file_bytes
        self.max_total_bytes = max_file_bytes if max_total_bytes is None else max_total_bytes
        self.min_free_bytes = min_free_bytes
        # KubeVirt's rule: one entry under /disk/ (False only to test the
        # layering rules on images with several).
        self.one_disk = one_disk
        self.written = 0  # bytes of every file extracted so far (later removed ones too)
        self.files: dict[str, DiskFile] = {}

    def add_layer(self, stream: BinaryIO, compression: Compression, digest: str) -> str:
        """Apply one layer; returns the sha256 digest of its uncompressed tar (diff_id)."""
        lower = self.files
        added: dict[str, DiskFile] = {}
        try:
            with open_layer(stream, compression) as decompressed:
                plain = _HashingReader(decompressed)
                tar, guard = open_guarded(plain, _CHUNK)
                with tar:
                    self._apply(entries(tar, guard), tar, lower, added, digest)
                # Read to the end: the compressor's own check (gzip CRC and
                # length) is only verified there, trailing junk is refused, and
                # the diff_id covers the whole stream (tar padding included).
                while plain.read(_CHUNK):
                    pass
                diff_id = plain.digest()
            self._one_disk_entry({**lower, **added}, digest)
        except HeaderRefused as exc:
            self._drop_all(added)
            raise FailedPrecondition(f"image {self.image}: layer {digest} is refused: {exc}") from None
        except (tarfile.TarError, OSError, EOFError, ValueError, RecursionError) as exc:
            self._drop_all(added)
            if is_no_space(exc):
                raise exhausted(f"extracting layer {digest} of image {self.image}", self.workdir) from None
            raise FailedPrecondition(f"image {self.image}: layer {digest} is not a valid tar stream: {exc}") from None
        except MemoryError:
            # Bounded above; should a layer still find a way, it is the
            # layer's fault, never an INTERNAL error of the agent.
            self._drop_all(added)
            raise ResourceExhausted(
                f"image {self.image}: layer {digest} needs more memory to unpack than the agent has"
            ) from None
        except BaseException:
            self._drop_all(added)
            raise
        for path, f in added.items():
            if path in lower:
                self._drop(lower.pop(path))
            lower[path] = f
        self.files = lower
        return diff_id

    def _apply(self, members: Iterator[tarfile.TarInfo], tar: tarfile.TarFile, lower: dict[str, DiskFile],
               added: dict[str, DiskFile], digest: str) -> None:
        """Apply a layer's entries: whiteouts and hiding change ``lower``, files go to ``added``."""
        for member in members:
            path = normalise_entry(member.name, digest)
            if member.issym() or member.islnk():
                self._check_link(member, path, digest)
            base = posixpath.basename(path)
            parent = posixpath.dirname(path)
            if base == OPAQUE_WHITEOUT:
                for key in [k for k in lower if _under(k, parent) and k != parent]:
                    self._drop(lower.pop(key))
                continue
            if base.startswith(WHITEOUT_PREFIX):
                gone = posixpath.join(parent, base[len(WHITEOUT_PREFIX):])
                for key in [k for k in lower if _under(k, gone)]:
                    self._drop(lower.pop(key))
                continue
            # An entry hides what lower layers had at its path when the types
            # differ, as overlayfs does: a directory hides a lower file (the
            # two are never merged), a non-directory hides a lower directory's
            # whole subtree (a file named "disk" hides every lower disk).
            if member.isdir():
                if path in lower:
                    self._drop(lower.pop(path))
                continue
            for key in [k for k in lower if k.startswith(path + "/")]:
                self._drop(lower.pop(key))
            if not _under(path, DISK_DIR) or path == DISK_DIR:
                continue
            if path in added:
                self._drop(added.pop(path))
            # A second entry of this layer under disk/ is refused before a
            # byte of it is written (whiteouts of this layer cannot make room
            # for it: they only remove lower layers' entries).
            self._one_disk_entry({**added, path: DiskFile(path, digest, None)}, digest)
            if member.isreg():
                added[path] = self._extract(tar, member, path, digest)
            else:
                added[path] = DiskFile(path, digest, None, _kind(member))

    def _one_disk_entry(self, found: dict[str, DiskFile], digest: str) -> None:
        """KubeVirt's rule, enforced while unpacking: at most one entry under /disk/."""
        if self.one_disk and len(found) > 1:
            names = ", ".join("/" + p for p in sorted(found))
            raise FailedPrecondition(
                f"image {self.image}: layer {digest} makes a second entry under /disk/ ({names}); "
                "a containerDisk holds exactly one disk file"
            )

    def _check_space(self, digest: str) -> None:
        if self.min_free_bytes <= 0:
            return
        st = os.statvfs(self.workdir)
        free = st.f_bavail * st.f_frsize
        if free < self.min_free_bytes:
            raise ResourceExhausted(
                f"image {self.image}: unpacking layer {digest} stopped: the images filesystem has "
                f"{free} bytes free, less than the {self.min_free_bytes} kept in reserve ([images] min_free_bytes)"
            )

    @staticmethod
    def _check_link(member: tarfile.TarInfo, path: str, digest: str) -> None:
        target = member.linkname
        if member.islnk():
            normalise_entry(target, digest)  # hard links name entries of the image
            return
        if target.startswith("/"):
            return  # absolute symlinks resolve inside the image root; never followed here
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
        if resolved == ".." or resolved.startswith("../"):
            raise FailedPrecondition(
                f"layer {digest}: unsafe symlink {member.name!r} -> {target!r} (leaves the image root)"
            )

    def _extract(self, tar: tarfile.TarFile, member: tarfile.TarInfo, path: str, digest: str) -> DiskFile:
        # The header's size is exactly what tarfile will read (for sparse
        # members too), so a file too big is refused before a byte is written.
        if member.size > self.max_file_bytes:
            raise FailedPrecondition(
                f"image {self.image}: /{path} in layer {digest} is {member.size} bytes, "
                f"more than the {self.max_file_bytes} a disk file may have"
            )
        if self.written + member.size > self.max_total_bytes:
            raise ResourceExhausted(
                f"image {self.image}: /{path} in layer {digest} would bring what this pull unpacks to "
                f"{self.written + member.size} bytes, more than the {self.max_total_bytes} allowed "
                "([images] max_pull_bytes)"
            )
        self._check_space(digest)
        src = tar.extractfile(member)
        assert src is not None
        fd, name = tempfile.mkstemp(prefix="disk-", dir=self.workdir)
        # Readable by others, so that qemu-img can judge it as an unprivileged
        # user (agent.adapters.qemu_img); the scratch directory (0700) keeps
        # everyone else out.
        os.fchmod(fd, 0o644)
        self.written += member.size
        written = flushed = checked = 0
        try:
            with os.fdopen(fd, "wb") as out:
                while True:
                    chunk = src.read(_CHUNK)
                    if not chunk:
                        break
                    # Keep raw disks sparse: skip over whole zero chunks.
                    if len(chunk) == _CHUNK and chunk == _ZEROS:
                        out.seek(len(chunk), io.SEEK_CUR)
                    else:
                        out.write(chunk)
                    written += len(chunk)
                    if written - flushed >= _WRITEBACK_STEP:
                        # Start writeback now, so the fsync before the image
                        # is recorded finds little left to write.
                        out.flush()
                        os.posix_fadvise(out.fileno(), flushed, written - flushed, os.POSIX_FADV_DONTNEED)
                        flushed = written
                    if written - checked >= _SPACE_CHECK_STEP:
                        self._check_space(digest)
                        checked = written
                out.truncate(written)
        except BaseException:
            os.unlink(name)
            raise
        return DiskFile(path, digest, Path(name), "file", written)

    @staticmethod
    def _drop(f: DiskFile) -> None:
        if f.temp is not None:
            f.temp.unlink(missing_ok=True)

    def _drop_all(self, files: dict[str, DiskFile]) -> None:
        for f in files.values():
            self._drop(f)

    def discard(self) -> None:
        """Delete every extracted file (on failure, or after they were moved)."""
        for f in self.files.values():
            self._drop(f)
        self.files = {}

    def disks(self) -> dict[str, DiskFile]:
        """Files under /disk/ in the final image, keyed by "/disk/<name>"."""
        return {"/" + path: f for path, f in sorted(self.files.items())}


def choose_disk(disks: dict[str, DiskFile], image: str, wanted: str | None) -> DiskFile:
    """KubeVirt's rule: exactly one file under /disk/, unless a path names one."""
    if wanted:
        key = "/" + normalise_entry(wanted.lstrip("/"), image)
        if not key.startswith("/" + DISK_DIR + "/"):
            key = "/" + DISK_DIR + key
        found = disks.get(key)
        if found is None:
            raise FailedPrecondition(
                f"image {image} has no file {key} (files under /disk/: {', '.join(disks) or 'none'})"
            )
        chosen = found
    elif not disks:
        raise FailedPrecondition(f"image {image} is not a containerDisk: it has no file under /disk/")
    elif len(disks) > 1:
        raise FailedPrecondition(
            f"image {image} has {len(disks)} files under /disk/ ({', '.join(disks)}); "
            "name one with the containerDisk volume's path"
        )
    else:
        chosen = next(iter(disks.values()))
    if chosen.temp is None and chosen.kind != "file":
        raise FailedPrecondition(f"image {image}: /{chosen.path} is a {chosen.kind}, not a regular file")
    return chosen
