"""What a CRI device's host path is on this node (the ``HostBlockDevices`` port).

kubelet hands a raw block volume as a path that is usually a symlink (its
per-pod ``volumeDevices`` map) to the node's block device. The path is
followed to its end and stat'ed; nothing is opened, nothing is changed.
Ownership is libvirt's business: with its default per-domain mount namespace
it chowns a private copy of the device node for QEMU and leaves the node's
own untouched (docs/volumes.md).
"""

from __future__ import annotations

import os
import stat

from agent.domain.volumes import HostPath, HostPathKind

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


class BlockDevices:
    """The ``HostBlockDevices`` port."""

    def lookup(self, path: str) -> HostPath:
        try:
            st = os.stat(path)  # follows symlinks
            real = os.path.realpath(path, strict=True)
        except (FileNotFoundError, NotADirectoryError):  # also a dangling symlink
            return HostPath(HostPathKind.MISSING)
        except OSError as exc:  # a symlink loop, a path too long, no permission
            return HostPath(HostPathKind.OTHER, what=f"unusable ({exc.strerror or exc})")
        if stat.S_ISBLK(st.st_mode):
            return HostPath(HostPathKind.BLOCK, real_path=real)
        what = next((name for test, name in _KINDS if test(st.st_mode)), "not a block device")
        return HostPath(HostPathKind.OTHER, real_path=real, what=what)
