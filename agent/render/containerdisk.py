"""Building containerDisk images: a disk file → one layer → config → manifest.

The layer holds ``disk/<name>`` owned by uid/gid 107 (QEMU's user in KubeVirt's
images), with fixed timestamps, so the same disk always gives the same
digests. Config and manifest are OCI documents for linux/amd64.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import tarfile
from dataclasses import dataclass
from typing import BinaryIO

from agent.domain import oci

QEMU_UID = 107
_CHUNK = 1 << 20


@dataclass(frozen=True)
class BuiltLayer:
    digest: str  # of the blob as stored (compressed)
    diff_id: str  # of the uncompressed tar
    size: int
    media_type: str


class _HashingWriter:
    """A write-only file object that hashes and counts what passes through."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self.hasher = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hasher.update(data)
        self.size += len(data)
        return self._out.write(data)

    def flush(self) -> None:
        self._out.flush()


def write_layer(disk: BinaryIO, size: int, name: str, out: BinaryIO, *, compress: bool = True,
                level: int = 1) -> BuiltLayer:
    """Write the layer tar (gzip by default) holding ``disk/<name>`` to ``out``.

    ``disk`` is the open disk file and ``size`` its length: the caller reads
    the file system, this only encodes.
    """
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"disk name {name!r} must be a plain file name")
    blob = _HashingWriter(out)
    gz = gzip.GzipFile(fileobj=blob, mode="wb", compresslevel=level, mtime=0) if compress else None
    plain = _HashingWriter(gz if gz is not None else blob)  # type: ignore[arg-type]
    with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        d = tarfile.TarInfo("disk")
        d.type = tarfile.DIRTYPE
        d.mode = 0o555
        d.uid = d.gid = QEMU_UID
        tar.addfile(d)
        info = tarfile.TarInfo(f"disk/{name}")
        info.size = size
        info.mode = 0o444
        info.uid = info.gid = QEMU_UID
        tar.addfile(info, disk)
    if gz is not None:
        gz.close()
    media_type = oci.OCI_LAYER_GZIP if compress else oci.OCI_LAYER
    return BuiltLayer(
        digest="sha256:" + blob.hasher.hexdigest(),
        diff_id="sha256:" + plain.hasher.hexdigest(),
        size=blob.size,
        media_type=media_type,
    )


def config_bytes(layers: list[BuiltLayer], *, architecture: str = "amd64") -> bytes:
    """The image config: platform and the uncompressed layer digests."""
    doc = {
        "architecture": architecture,
        "os": "linux",
        "config": {"User": str(QEMU_UID)},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def manifest_bytes(config: bytes, layers: list[BuiltLayer], annotations: dict[str, str] | None = None) -> bytes:
    manifest = oci.ImageManifest(
        media_type=oci.OCI_MANIFEST,
        config=oci.Descriptor(oci.OCI_CONFIG, oci.sha256_digest(config), len(config)),
        layers=tuple(oci.Descriptor(layer.media_type, layer.digest, layer.size) for layer in layers),
        annotations=dict(annotations or {}),
    )
    return oci.encode_manifest(manifest)


@dataclass(frozen=True)
class BuiltImage:
    manifest: bytes
    manifest_digest: str
    config: bytes
    layers: tuple[BuiltLayer, ...]
