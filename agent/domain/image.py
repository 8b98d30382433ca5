"""Images as the agent stores them: records, references, lookups (pure)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from agent.domain.errors import FailedPrecondition, InvalidArgument
from agent.domain.imageref import ImageRef, parse_image_ref

_ID = re.compile(r"^(sha256:)?([0-9a-f]{12,64})$")


@dataclass(frozen=True)
class BaseDisk:
    """A validated disk file from an image, shared read-only by its VMs."""

    path_in_image: str  # "/disk/cirros.qcow2"
    file: str  # file name inside the image's disk directory
    format: str  # "qcow2" or "raw", stated explicitly wherever it is used
    virtual_size: int
    size: int  # bytes on the host


@dataclass
class DiskFile:
    """A file under /disk/ as an image's layers so far left it (while pulling)."""

    path: str  # normalised, e.g. "disk/cirros.qcow2"
    layer: str  # digest of the layer that wrote it
    temp: Path | None  # extracted content; None when not a regular file
    kind: str = "file"  # "file", or what else the entry was ("symlink", ...)
    size: int = 0


@dataclass(frozen=True)
class Image:
    id: str  # the config digest, "sha256:<hex>", as containerd reports it
    manifest_digest: str
    repo_tags: tuple[str, ...]
    repo_digests: tuple[str, ...]
    size: int  # config + compressed layers, as registries and kubelet count it
    layers: tuple[str, ...]
    config_media_type: str
    user: str
    disks: tuple[BaseDisk, ...]
    created_at_ns: int
    # Why the image cannot back a VM (no or several disks), "" when it can.
    disk_problem: str = ""

    @property
    def blobs(self) -> tuple[str, ...]:
        """Every blob the image needs kept: manifest, config, layers."""
        return (self.manifest_digest, self.id, *self.layers)

    def disk_for(self, wanted: str | None) -> BaseDisk:
        """The base disk a VM boots from (KubeVirt: one file, or the named one)."""
        if wanted:
            key = wanted if wanted.startswith("/") else "/" + wanted
            if not key.startswith("/disk/"):
                key = "/disk" + key
            for d in self.disks:
                if d.path_in_image == key:
                    return d
            names = ", ".join(d.path_in_image for d in self.disks) or "none"
            raise FailedPrecondition(f"image {self.name} has no disk {key} (disks: {names})")
        # A recorded problem beside one disk means other entries under /disk/
        # (a symlink, a device) that count as files, as in choose_disk.
        if len(self.disks) == 1 and not self.disk_problem:
            return self.disks[0]
        if len(self.disks) == 1:
            raise FailedPrecondition(
                f"image {self.name} holds more than {self.disks[0].path_in_image} under /disk/ "
                f"({self.disk_problem}); name the disk with the containerDisk path"
            )
        if not self.disks:
            raise FailedPrecondition(
                f"image {self.name} is not a containerDisk: {self.disk_problem or 'no file under /disk/'}"
            )
        raise FailedPrecondition(
            f"image {self.name} has {len(self.disks)} files under /disk/ "
            f"({', '.join(d.path_in_image for d in self.disks)}); name one with the containerDisk path"
        )

    @property
    def name(self) -> str:
        return self.repo_tags[0] if self.repo_tags else (self.repo_digests[0] if self.repo_digests else self.id)


def tag_ref(ref: ImageRef) -> str | None:
    return f"{ref.name}:{ref.tag}" if ref.tag is not None and ref.digest is None else None


def digest_ref(ref: ImageRef, digest: str) -> str:
    return f"{ref.name}@{digest}"


def lookup_keys(text: str) -> tuple[str | None, list[str]]:
    """How a client's image string may name a stored image.

    Returns (id or id prefix, references): "sha256:<hex>" or 64 bare hex
    digits is an id; anything else is parsed as a reference (tag or digest
    form). 12 to 63 bare hex digits (crictl prints 13) are both a reference
    and an id prefix, which is the fallback when no reference matches (as in
    containerd).
    """
    text = text.strip()
    m = _ID.match(text)
    if m and (m.group(1) or len(m.group(2)) == 64):
        return "sha256:" + m.group(2), []
    ref = parse_image_ref(text, field="image.image")
    refs = []
    if ref.digest is not None:
        refs.append(digest_ref(ref, ref.digest))
    tag = tag_ref(ref)
    if tag is not None:
        refs.append(tag)
    return ("sha256:" + m.group(2) if m else None), refs


def find(images: Iterable[Image], text: str) -> Image | None:
    """The stored image a client's string names, or None.

    A reference wins over an id prefix; an ambiguous id prefix is a client
    error rather than a guess (RemoveImage would act on it).
    """
    wanted_id, refs = lookup_keys(text)
    images = list(images)
    for img in images:
        if any(r in img.repo_tags or r in img.repo_digests for r in refs):
            return img
    if wanted_id is None:
        return None
    matched = [img for img in images if img.id.startswith(wanted_id)]
    if len(matched) > 1:
        raise InvalidArgument("image.image", f"{text.strip()!r} is an ambiguous image id prefix")
    return matched[0] if matched else None
