"""Checking a disk image before the host uses it (pure: judges qemu-img's JSON).

A disk from an image is untrusted input. A qcow2 whose backing file (or
external data file) names a host path would make QEMU read that path for the
guest: the classic image-import attack. So: the format must be qcow2 or raw,
agree with what was declared, name no backing file and no data file, and have
a sane virtual size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from agent.domain import jsontext
from agent.domain.errors import FailedPrecondition

FORMATS = ("qcow2", "raw")


@dataclass(frozen=True)
class DiskInfo:
    format: str
    virtual_size: int
    actual_size: int


def check(raw_json: bytes | str, *, source: str, max_virtual_size: int,
          declared_format: str | None = None) -> DiskInfo:
    """Judge ``qemu-img info --output=json``; FailedPrecondition says what is wrong."""
    try:
        info: Any = jsontext.loads(raw_json)
    except ValueError:
        raise FailedPrecondition(f"{source}: qemu-img info gave no readable answer") from None
    if not isinstance(info, dict):
        raise FailedPrecondition(f"{source}: qemu-img info gave no readable answer")
    fmt = info.get("format")
    if fmt not in FORMATS:
        raise FailedPrecondition(f"{source}: disk format {fmt!r} is not allowed (only qcow2 or raw)")
    if declared_format is not None and fmt != declared_format:
        raise FailedPrecondition(f"{source}: disk is {fmt}, but {declared_format} was declared")
    for key in ("backing-filename", "full-backing-filename", "backing-filename-format"):
        if info.get(key):
            raise FailedPrecondition(
                f"{source}: refusing a disk with a backing file ({info.get('backing-filename') or info[key]!r})"
            )
    specific = _mapping(_mapping(info.get("format-specific")).get("data"))
    if specific.get("data-file"):
        raise FailedPrecondition(
            f"{source}: refusing a qcow2 with an external data file ({specific['data-file']!r})"
        )
    if specific.get("corrupt"):
        raise FailedPrecondition(f"{source}: qcow2 image is marked corrupt")
    size = info.get("virtual-size")
    if not isinstance(size, int) or size <= 0:
        raise FailedPrecondition(f"{source}: disk has no usable virtual size")
    if size > max_virtual_size:
        raise FailedPrecondition(
            f"{source}: virtual size {size} bytes exceeds the configured maximum of {max_virtual_size} bytes"
        )
    actual = info.get("actual-size")
    return DiskInfo(format=fmt, virtual_size=size, actual_size=actual if isinstance(actual, int) else 0)


def _mapping(value: Any) -> dict[str, Any]:
    """A JSON object, or an empty one for anything else (qemu-img's optional sections)."""
    return value if isinstance(value, dict) else {}


# Choosing the format without letting qemu-img probe -----------------------------------

# Magic numbers of the formats qemu-img would otherwise probe (block/*.c).
_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"KDMV", "vmdk"),
    (0, b"COWD", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk"),
    (0, b"conectix", "vpc"),
    (0, b"vhdxfile", "vhdx"),
    (0x40, b"\x7f\x10\xda\xbe", "vdi"),
    (0, b"QED\x00", "qed"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
    (0, b"Bochs Virtual HD Image", "bochs"),
    (0, b"#!/bin/sh\n#V2.0 Format\n", "cloop"),
)
_QCOW_MAGIC = b"QFI\xfb"
# What a file's name declares (KubeVirt's images use .qcow2, .img and .raw;
# ".img" says nothing: it is qcow2 as often as raw).
_DECLARED_BY_SUFFIX = {".qcow2": "qcow2", ".raw": "raw"}


def sniff_format(head: bytes) -> str:
    """The format a file's first bytes show: qcow2, another qemu format, or raw."""
    if head.startswith(_QCOW_MAGIC):
        return "qcow" if head[4:8] == b"\x00\x00\x00\x01" else "qcow2"
    for offset, magic, name in _MAGIC:
        if head[offset:offset + len(magic)] == magic:
            return name
    return "raw"


def declared_format(path_in_image: str) -> str | None:
    """The format a disk file's name declares (``disk/x.qcow2``), if any."""
    dot = path_in_image.rfind(".")
    return _DECLARED_BY_SUFFIX.get(path_in_image[dot:].lower()) if dot > path_in_image.rfind("/") else None


def choose_format(head: bytes, declared: str | None, *, source: str) -> str:
    """The format qemu-img is told to open (``-f``): it never probes.

    A file declared raw is raw whatever its bytes look like (the guest's
    data). A file declared qcow2 must look like one. An undeclared file is
    what its magic shows, and only qcow2 or raw is opened at all.
    """
    if declared is not None and declared not in FORMATS:
        raise FailedPrecondition(f"{source}: disk format {declared!r} is not allowed (only qcow2 or raw)")
    if declared == "raw":
        return "raw"
    seen = sniff_format(head)
    if declared is not None and seen != declared:
        raise FailedPrecondition(f"{source}: disk is {seen}, but {declared} was declared")
    if seen not in FORMATS:
        raise FailedPrecondition(f"{source}: disk format {seen!r} is not allowed (only qcow2 or raw)")
    return seen


# CVE-2024-4467: `qemu-img info` could be made to open and write files an image
# names (json: data files). Fixed in 9.1.0 and the stable releases below.
CVE_2024_4467_FIXED = {(9, 0): 2, (8, 2): 6, (7, 2): 13}
CVE_2024_4467_FIXED_TEXT = "9.0.2, 8.2.6, 7.2.13 (Debian 12: 1:7.2+dfsg-7+deb12u7), 9.1.0"
_VERSION = re.compile(r"\bversion (\d+)\.(\d+)\.(\d+)")


def has_cve_2024_4467_fix(version_line: str) -> bool | None:
    """Whether ``qemu-img --version``'s first line names a fixed QEMU; None: unreadable.

    Debian's packages print the upstream stable release they carry
    ("qemu-img version 7.2.13 (Debian 1:7.2+dfsg-7+deb12u7)").
    """
    found = _VERSION.search(version_line)
    if found is None:
        return None
    major, minor, micro = (int(x) for x in found.groups())
    if (major, minor) >= (9, 1):
        return True
    least = CVE_2024_4467_FIXED.get((major, minor))
    return least is not None and micro >= least
