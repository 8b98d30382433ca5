"""An OCI image layout directory read as if it were a registry (``podvisorctl image import``).

``LayoutSource`` implements the pull side of ``RegistryPort`` over a local
image-layout 1.0 directory (``oci-layout``, ``index.json``, ``blobs/sha256/``),
so that an import runs the very pull pipeline of ``agent.services.pull``:
the same limits on manifests and configs, every blob checked against its
descriptor's digest and size while it is copied into the store, the layers
checked against the config's diff_ids, and the disk against qemu-img.

The layout is untrusted input. Nothing in it may be a symbolic link or
anything but a regular file or directory (a link could make the agent read a
file the caller cannot), each file is opened with ``O_NOFOLLOW`` and checked
with ``fstat``, and every size is bounded before reading.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path

from agent.adapters.registry.pull import MAX_CONFIG_BYTES, MAX_MANIFEST_BYTES
from agent.concurrency import BlobProgress
from agent.domain.errors import FailedPrecondition, InvalidArgument, NotFound
from agent.domain.imageref import ImageRef, RemoteRepository
from agent.domain.oci import (
    OCI_INDEX,
    Descriptor,
    ImageIndex,
    ImageManifest,
    digest_hex,
    is_digest,
    parse_manifest_document,
    select_platform,
    sha256_digest,
)
from agent.domain.registry import RegistryAuth, ResolvedImage

REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT_REGISTRY = "oci-layout"  # RemoteRepository.registry of an import (messages only)
_MAX_INDEX_DEPTH = 2
_CHUNK = 1 << 20


class LayoutSource:
    """``RegistryPort`` over one OCI layout directory; ``layout_ref`` picks the manifest."""

    def __init__(self, path: Path, layout_ref: str = "", *, field: str = "layout_path") -> None:
        if not path.is_absolute():
            raise InvalidArgument(field, f"{str(path)!r} is not an absolute path (the agent resolves it on its host)")
        self.root = path
        self.layout_ref = layout_ref
        self.field = field
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise NotFound(f"{field}: no OCI layout at {path} on the agent's host") from None
        except OSError as exc:
            raise FailedPrecondition(f"{field}: cannot read {path}: {exc.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise InvalidArgument(field, f"{path} is not a directory (an OCI image layout is one)")
        marker = self._read("oci-layout", 4096)
        try:
            version = json.loads(marker).get("imageLayoutVersion")
        except (ValueError, AttributeError):
            version = None
        if not isinstance(version, str) or not version.startswith("1."):
            raise FailedPrecondition(f"OCI layout {path}: oci-layout does not declare imageLayoutVersion 1.x")

    # Files -------------------------------------------------------------------

    def _open(self, relative: str) -> int:
        """A regular file of the layout, opened without following links anywhere below the root."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            parts = relative.split("/")
            for part in parts[:-1]:
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd = nxt
            target = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=fd)
        except FileNotFoundError:
            raise FailedPrecondition(f"OCI layout {self.root}: {relative} is missing") from None
        except OSError as exc:
            # ELOOP/ENOTDIR: a symbolic link where a file or directory belongs.
            raise FailedPrecondition(
                f"OCI layout {self.root}: {relative} cannot be opened ({exc.strerror}); "
                "symbolic links are refused in an imported layout"
            ) from None
        finally:
            os.close(fd)
        if not stat.S_ISREG(os.fstat(target).st_mode):
            os.close(target)
            raise FailedPrecondition(f"OCI layout {self.root}: {relative} is not a regular file")
        return target

    def _read(self, relative: str, limit: int) -> bytes:
        fd = self._open(relative)
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise FailedPrecondition(
                    f"OCI layout {self.root}: {relative} is {size} bytes, more than the {limit} allowed")
            data = f.read(limit + 1)
        if len(data) > limit:
            raise FailedPrecondition(f"OCI layout {self.root}: {relative} grew past {limit} bytes while read")
        return data

    @staticmethod
    def _blob_name(digest: str) -> str:
        if not is_digest(digest) or not digest.startswith("sha256:"):
            raise FailedPrecondition(f"unsupported digest {digest!r}: an OCI layout import takes sha256 blobs")
        return f"blobs/sha256/{digest_hex(digest)}"

    def _read_blob(self, digest: str, size: int, limit: int, what: str) -> bytes:
        if size > limit:
            raise FailedPrecondition(f"OCI layout {self.root}: {what} {digest} is {size} bytes, more than {limit}")
        data = self._read(self._blob_name(digest), limit)
        if len(data) != size:
            raise FailedPrecondition(
                f"OCI layout {self.root}: {what} {digest} is {len(data)} bytes, its descriptor says {size}")
        if sha256_digest(data) != digest:
            raise FailedPrecondition(
                f"OCI layout {self.root}: {what} blob {digest} hashes to {sha256_digest(data)}")
        return data

    # RegistryPort -------------------------------------------------------------

    def _entry(self, index: ImageIndex, source: str) -> Descriptor:
        if self.layout_ref:
            named = [m for m in index.manifests if m.annotations.get(REF_NAME) == self.layout_ref]
            if not named:
                names = sorted({m.annotations.get(REF_NAME, "") for m in index.manifests} - {""})
                raise NotFound(f"{source}: index.json has no manifest named {self.layout_ref!r} "
                               f"(it has: {', '.join(names) or 'no named manifests'})")
            return named[0]
        if len(index.manifests) != 1:
            raise InvalidArgument("layout_ref", f"{source}: index.json lists {len(index.manifests)} manifests; "
                                  "name one (org.opencontainers.image.ref.name)")
        return index.manifests[0]

    def resolve(self, ref: ImageRef, *, auth: RegistryAuth | None = None) -> ResolvedImage:
        source = f"OCI layout {self.root}"
        top_data = self._read("index.json", MAX_MANIFEST_BYTES)
        index = parse_manifest_document(top_data, OCI_INDEX, source=source)
        if not isinstance(index, ImageIndex):
            raise FailedPrecondition(f"{source}: index.json is not an image index")
        entry = self._entry(index, source)
        data = self._read_blob(entry.digest, entry.size, MAX_MANIFEST_BYTES, "manifest")
        document = parse_manifest_document(data, entry.media_type, source=source)
        reference_digest, digest = entry.digest, entry.digest
        nested: ImageIndex | None = None
        depth = 0
        while isinstance(document, ImageIndex):
            depth += 1
            if depth > _MAX_INDEX_DEPTH:
                raise FailedPrecondition(f"{source}: indexes are nested too deeply")
            nested = document
            chosen = select_platform(document, source=source)
            data = self._read_blob(chosen.digest, chosen.size, MAX_MANIFEST_BYTES, "manifest")
            document = parse_manifest_document(data, chosen.media_type, source=source)
            digest = chosen.digest
        assert isinstance(document, ImageManifest)
        repo = RemoteRepository(registry=LAYOUT_REGISTRY, host=str(self.root), name=ref.repository)
        return ResolvedImage(ref=ref, repository=repo, digest=digest, media_type=document.media_type,
                             manifest_bytes=data, manifest=document, reference_digest=reference_digest,
                             index=nested)

    def fetch_config(self, repo: RemoteRepository, config: Descriptor, *,
                     auth: RegistryAuth | None = None) -> bytes:
        return self._read_blob(config.digest, config.size, MAX_CONFIG_BYTES, "config")

    def fetch_blob(self, repo: RemoteRepository, digest: str, dest_path: str | os.PathLike[str], *,
                   expected_size: int | None = None, auth: RegistryAuth | None = None,
                   progress: BlobProgress | None = None) -> int:
        """Copy one blob into the store, hashed on the way; renamed into place only when it matches."""
        fd = self._open(self._blob_name(digest))
        dest = Path(dest_path)
        out_fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial")
        tmp = Path(tmp_name)
        try:
            if progress is not None:
                progress.started(tmp_name)
            hasher = hashlib.sha256()
            total = 0
            with os.fdopen(fd, "rb") as src, os.fdopen(out_fd, "wb", buffering=0) as out:
                while chunk := src.read(_CHUNK):
                    total += len(chunk)
                    if expected_size is not None and total > expected_size:
                        raise FailedPrecondition(
                            f"OCI layout {self.root}: blob {digest} is larger than its descriptor's "
                            f"{expected_size} bytes")
                    hasher.update(chunk)
                    out.write(chunk)
                    if progress is not None:
                        progress.wrote(len(chunk))
                out.flush()
                os.fsync(out.fileno())
            if expected_size is not None and total != expected_size:
                raise FailedPrecondition(
                    f"OCI layout {self.root}: blob {digest} is {total} bytes, its descriptor says {expected_size}")
            actual = "sha256:" + hasher.hexdigest()
            if actual != digest:
                raise FailedPrecondition(f"OCI layout {self.root}: blob {digest} hashes to {actual}")
            os.replace(tmp, dest)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if progress is not None:
                progress.finished(exc)
            raise
        if progress is not None:
            progress.finished()
        return total
