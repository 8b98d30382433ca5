"""The BlockDevices adapter on paths any machine has (a real block device
needs root and a loop device: tests/integration/test_block_devices_libvirt.py)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from agent.adapters.block_devices import BlockDevices
from agent.domain.volumes import HostPath, HostPathKind


def test_a_missing_path_and_a_dangling_symlink_are_missing(tmp_path: Path) -> None:
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    for path in (tmp_path / "nowhere", tmp_path / "dangling", tmp_path / "file" / "below"):
        assert BlockDevices().lookup(str(path)) == HostPath(HostPathKind.MISSING)


def test_other_kinds_say_what_they_are_with_symlinks_resolved(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "file")
    os.mkfifo(tmp_path / "fifo")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock"))
        real = os.path.realpath(tmp_path)
        assert BlockDevices().lookup(str(tmp_path / "link")) == HostPath(
            HostPathKind.OTHER, f"{real}/file", "a regular file")
        assert BlockDevices().lookup(str(tmp_path)).what == "a directory"
        assert BlockDevices().lookup(str(tmp_path / "fifo")).what == "a FIFO"
        assert BlockDevices().lookup(str(tmp_path / "sock")).what == "a socket"
        assert BlockDevices().lookup("/dev/null") == HostPath(HostPathKind.OTHER, "/dev/null", "a character device")


def test_a_symlink_loop_is_unusable(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    found = BlockDevices().lookup(str(tmp_path / "a"))
    assert found.kind is HostPathKind.OTHER and found.what.startswith("unusable")
