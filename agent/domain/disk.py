"""Checking a disk image before the host uses it (pure: judges qemu-img's JSON).

A disk from an image is untrusted input. A qcow2 whose backing file (or
external data file) names a host path would make QEMU read that path for the
guest: the classic image-import attack. So: the format must be qcow2 or raw,
agree with what was declared, name no backing file and no data file, and have
a sane virtual size.
"""

from __future__ import annotations

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
