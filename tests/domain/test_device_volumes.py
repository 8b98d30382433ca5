"""CRI devices as domain values (agent.domain.volumes): the stable serial, the
guest's by-id name, and what a host path must be to attach."""

from __future__ import annotations

import hashlib
import re

import pytest

from agent.domain.errors import InvalidArgument, NotFound
from agent.domain.volumes import (
    DEVICE_SERIAL_LENGTH,
    Device,
    HostPath,
    HostPathKind,
    attachable_device,
    device_by_id,
    device_serial,
)

PATHS = ["/dev/xvda", "/dev/xvdb", "/data/disk", "/dev/" + "x" * 200, "/dev/ünïcode"]


@pytest.mark.parametrize("path", PATHS)
def test_the_serial_is_stable_short_and_safe_for_libvirt(path: str) -> None:
    serial = device_serial(path)
    assert serial == device_serial(path)
    assert len(serial) == DEVICE_SERIAL_LENGTH
    # libvirt's own rule for <serial>, and udev keeps such a serial verbatim in by-id.
    assert re.fullmatch(r"pv-[0-9a-f]{17}", serial)


def test_the_serial_is_the_sha256_of_the_container_path() -> None:
    # The documented rule (docs/volumes.md): "pv-" + the first 17 hex digits of SHA-256(path).
    assert device_serial("/dev/xvda") == "pv-" + hashlib.sha256(b"/dev/xvda").hexdigest()[:17]


def test_different_paths_get_different_serials() -> None:
    assert len({device_serial(p) for p in PATHS}) == len(PATHS)


def test_the_guest_finds_the_device_by_its_serial() -> None:
    assert device_by_id("/dev/xvda") == f"/dev/disk/by-id/virtio-{device_serial('/dev/xvda')}"


DEVICE = Device(container_path="/dev/xvda", host_path="/var/lib/kubelet/pods/u/volumeDevices/pv", permissions="r")


def test_a_block_device_is_attached_by_its_real_path() -> None:
    got = attachable_device("config.devices[0]", DEVICE, HostPath(HostPathKind.BLOCK, "/dev/sdc"))
    assert got == Device(container_path="/dev/xvda", host_path="/dev/sdc", permissions="r")
    assert got.readonly


def test_a_missing_path_is_not_found() -> None:
    with pytest.raises(NotFound) as exc:
        attachable_device("config.devices[2]", DEVICE, HostPath(HostPathKind.MISSING))
    assert exc.value.message == (f"config.devices[2].host_path: {DEVICE.host_path!r} does not exist on this node")


@pytest.mark.parametrize(("what", "shown"), [("a directory", "is a directory"), ("", "is not a block device")])
def test_anything_else_is_an_invalid_argument(what: str, shown: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        attachable_device("config.devices[0]", DEVICE, HostPath(HostPathKind.OTHER, "/srv", what))
    assert exc.value.field == "config.devices[0].host_path"
    assert shown in exc.value.message
