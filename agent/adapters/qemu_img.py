"""The one place that runs qemu-img: with timeouts, resource limits and
checked exit codes. Untrusted images are only ever inspected under limits.

``qemu-img info`` on a disk from an image:

- never probes a format: the format is the one the file's name declares
  (``.qcow2``, ``.raw``) or else the one its first bytes show, and only
  qcow2 and raw are ever opened (``-f``); anything else is refused before
  qemu-img runs (``agent.domain.disk.choose_format``);
- takes no lock (``--force-share``);
- runs under ``prlimit`` (CPU seconds, address space) and a timeout, as
  every qemu-img run here does;
- runs as ``nobody:nogroup`` without supplementary groups (``setpriv``)
  when the agent is root: it reads the disk through a descriptor the agent
  opened (``/dev/fd/N``), so the disk needs a read bit for others but no
  directory on its way needs to be open. A disk without that bit (a
  ``podvisorctl image build --disk`` file private to root) is inspected as
  the calling user, under the same limits.

QEMU must have the fix for CVE-2024-4467 (``version_warning``).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
from pathlib import Path

from agent.domain import disk
from agent.domain.errors import FailedPrecondition, Internal

QEMU_IMG = "qemu-img"
INFO_TIMEOUT = 30.0
# Bounds for every qemu-img run: a crafted qcow2 must not eat the host.
INFO_CPU_SECONDS = 20
INFO_ADDRESS_SPACE = 1 << 30
# Who inspects untrusted disks when the agent runs as root.
UNPRIVILEGED = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--no-new-privs", "--")
# Read to choose the format: the magic numbers of every format qemu knows lie here.
_HEAD = 4096


def limited(args: list[str], *, unprivileged: bool = False) -> list[str]:
    """The command line that runs ``qemu-img args`` under limits.

    prlimit(1) rather than preexec_fn: running Python between fork and exec
    in a threaded server is unsafe.
    """
    prefix = ["prlimit", f"--cpu={INFO_CPU_SECONDS}", f"--as={INFO_ADDRESS_SPACE}", "--"]
    return [*prefix, *(UNPRIVILEGED if unprivileged else ()), QEMU_IMG, *args]


def info_command(source: str, fmt: str, *, unprivileged: bool) -> list[str]:
    """The exact ``qemu-img info`` command line for ``source`` (a path, or ``/dev/fd/N``)."""
    return limited(["info", "--force-share", "-f", fmt, "--output=json", "--", source],
                   unprivileged=unprivileged)


def _run(cmd: list[str], *, what: str, timeout: float, pass_fds: tuple[int, ...] = ()) -> bytes:
    # Checked first: under prlimit a missing qemu-img is only prlimit's exit
    # status 1, which would read as a fault of the image being inspected.
    if shutil.which(QEMU_IMG) is None:
        raise Internal("qemu-img is not installed (Debian package qemu-utils)")
    for tool in ("prlimit", UNPRIVILEGED[0]):
        if shutil.which(tool) is None:
            raise Internal(f"{tool} is not installed (Debian package util-linux)")
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False, pass_fds=pass_fds)
    except subprocess.TimeoutExpired:
        raise FailedPrecondition(f"qemu-img {what} took longer than {timeout:.0f}s") from None
    except FileNotFoundError:
        raise Internal("qemu-img is not installed (Debian package qemu-utils)") from None
    if proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip().splitlines()
        if message and os.strerror(errno.ENOSPC) in message[-1]:
            # A full filesystem, not a fault of the image: the caller names it.
            raise OSError(errno.ENOSPC, f"qemu-img {what} failed: {message[-1]}")
        raise FailedPrecondition(f"qemu-img {what} failed: {message[-1] if message else proc.returncode}")
    return proc.stdout


def info(path: Path, *, source: str, max_virtual_size: int,
         declared_format: str | None = None) -> disk.DiskInfo:
    """Inspect and judge a disk, opened as the format it declares or shows."""
    try:
        # O_NONBLOCK: a FIFO must not hang the open; it is refused below.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise FailedPrecondition(f"{source}: cannot open {path} to inspect it: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FailedPrecondition(f"{source}: {path} is not a regular file")
        fmt = disk.choose_format(os.pread(fd, _HEAD, 0), declared_format, source=source)
        unprivileged = os.geteuid() == 0 and bool(st.st_mode & stat.S_IROTH)
        raw = _run(info_command(f"/dev/fd/{fd}", fmt, unprivileged=unprivileged), what="info",
                   timeout=INFO_TIMEOUT, pass_fds=(fd,))
    finally:
        os.close(fd)
    return disk.check(raw, source=source, max_virtual_size=max_virtual_size, declared_format=fmt)


def create_overlay(base: Path, base_format: str, overlay: Path) -> None:
    """A qcow2 overlay whose backing format is stated, never probed.

    qemu-img reads the base's header for its size: under the same limits.
    """
    _run(limited(["create", "-q", "-f", "qcow2", "-F", base_format, "-b", str(base), str(overlay)]),
         what="create", timeout=60)


def version_warning() -> str | None:
    """Why the installed qemu-img is unsafe for untrusted images, or None.

    ``qemu-img info`` before the fix for CVE-2024-4467 can be made to open
    and write host files named in an image (QEMU 9.0.2, 8.2.6, 7.2.13 and
    9.1.0 carry the fix).
    """
    try:
        out = _run(limited(["--version"]), what="--version", timeout=INFO_TIMEOUT)
    except (FailedPrecondition, Internal) as exc:
        return f"cannot tell the qemu-img version: {exc}"
    first = out.decode(errors="replace").strip().splitlines()
    line = first[0] if first else ""
    fixed = disk.has_cve_2024_4467_fix(line)
    if fixed:
        return None
    what = "cannot read its version" if fixed is None else "it lacks the fix for CVE-2024-4467"
    return (f"qemu-img ({line or 'no version'}): {what}; untrusted images need QEMU "
            f"{disk.CVE_2024_4467_FIXED_TEXT} or later (a distribution backport counts)")
