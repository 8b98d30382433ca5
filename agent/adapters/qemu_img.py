"""The one place that runs qemu-img: with timeouts, resource limits and
checked exit codes. Untrusted images are only ever inspected under limits."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

from agent.domain import disk
from agent.domain.errors import FailedPrecondition, Internal

QEMU_IMG = "qemu-img"
INFO_TIMEOUT = 30.0
# Bounds for inspecting an untrusted image: a crafted qcow2 must not eat the host.
INFO_CPU_SECONDS = 20
INFO_ADDRESS_SPACE = 1 << 30


def _run(args: list[str], *, timeout: float, limited: bool = False) -> bytes:
    # Checked first: under prlimit a missing qemu-img is only prlimit's exit
    # status 1, which would read as a fault of the image being inspected.
    if shutil.which(QEMU_IMG) is None:
        raise Internal("qemu-img is not installed (Debian package qemu-utils)")
    if limited and shutil.which("prlimit") is None:
        raise Internal("prlimit is not installed (Debian package util-linux)")
    cmd = [QEMU_IMG, *args]
    if limited:
        # prlimit(1) rather than preexec_fn: running Python between fork and
        # exec in a threaded server is unsafe.
        cmd = ["prlimit", f"--cpu={INFO_CPU_SECONDS}", f"--as={INFO_ADDRESS_SPACE}", "--", *cmd]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise FailedPrecondition(f"qemu-img {args[0]} took longer than {timeout:.0f}s") from None
    except FileNotFoundError:
        raise Internal("qemu-img is not installed (Debian package qemu-utils)") from None
    if proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip().splitlines()
        if message and os.strerror(errno.ENOSPC) in message[-1]:
            # A full filesystem, not a fault of the image: the caller names it.
            raise OSError(errno.ENOSPC, f"qemu-img {args[0]} failed: {message[-1]}")
        raise FailedPrecondition(f"qemu-img {args[0]} failed: {message[-1] if message else proc.returncode}")
    return proc.stdout


def info(path: Path, *, source: str, max_virtual_size: int,
         declared_format: str | None = None) -> disk.DiskInfo:
    """Inspect and judge a disk (the format is probed, then compared)."""
    raw = _run(["info", "--output=json", "--", str(path)], timeout=INFO_TIMEOUT, limited=True)
    return disk.check(raw, source=source, max_virtual_size=max_virtual_size, declared_format=declared_format)


def create_overlay(base: Path, base_format: str, overlay: Path) -> None:
    """A qcow2 overlay whose backing format is stated, never probed."""
    _run(["create", "-q", "-f", "qcow2", "-F", base_format, "-b", str(base), str(overlay)], timeout=60)
