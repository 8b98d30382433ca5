"""Named network namespaces (/run/netns/<name>), as `ip netns` manages them.

A namespace is bind-mounted at /run/netns/<name>, the path CNI plugins
receive as CNI_NETNS; other tools (`ip -n`, `ip netns exec`, `nsenter
--net=`) find it by the same name. It is made the way containerd makes its
pod namespaces: a thread of the agent unshares its network namespace and
bind-mounts it (no process to start); `ip netns add` is the fallback for the
first namespace on a host, where /run/netns is not yet the shared mount point
that `ip` sets up once.

:func:`run_in` runs a function in a new thread that has joined a pod's
namespace: sockets it opens, /proc/sys/net it writes and processes it starts
all belong to that namespace, again without `nsenter` or `ip netns exec`.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from agent.domain.errors import Internal, InvalidArgument, PodvisorError

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]

NETNS_DIR = Path("/run/netns")
IP = "ip"
TIMEOUT = 30.0
# What `ip netns` accepts as a file name, kept conservative: no "/" and no
# leading dot, so a name can never address anything outside NETNS_DIR.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$")


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise InvalidArgument("netns", f"{name!r} is not a valid network namespace name")


def path(name: str) -> Path:
    """Where the namespace of that name is (or would be) mounted."""
    _check_name(name)
    return NETNS_DIR / name


def _mount_types(p: Path) -> list[str]:
    """File system types mounted on ``p`` (mountinfo), innermost last."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    target = str(p)
    found = []
    for line in lines:
        fields, _, rest = line.partition(" - ")
        parts = fields.split()
        if len(parts) >= 5 and parts[4] == target:
            found.append((rest.split() or [""])[0])
    return found


def is_mounted(p: Path) -> bool:
    """Whether a network namespace is mounted at ``p`` (any path, e.g. a CNI_NETNS)."""
    # A leftover plain file (from a crash between create and mount, or from an
    # `ip netns add` run in a private mount namespace) is not a namespace:
    # only an nsfs mount on the path is.
    return "nsfs" in _mount_types(p)


def exists(name: str) -> bool:
    """Whether a namespace of that name is mounted."""
    return is_mounted(path(name))


def list_names() -> list[str]:
    """Names of the mounted namespaces under /run/netns, sorted."""
    try:
        entries = sorted(p.name for p in NETNS_DIR.iterdir())
    except OSError:
        return []
    return [n for n in entries if _NAME.match(n) and is_mounted(NETNS_DIR / n)]


def _ip_netns(args: list[str]) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run([IP, "netns", *args], capture_output=True, timeout=TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise Internal(f"ip netns {args[0]} took longer than {TIMEOUT:.0f}s") from None
    except FileNotFoundError:
        raise Internal("ip is not installed (Debian package iproute2)") from None


def _errno_error(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def _on_new_thread(fn: Callable[[], T], label: str) -> T:
    """Call ``fn`` on a thread of its own and hand its result or exception
    to the caller: namespace changes (setns, unshare) are per thread, and
    this thread ends with the call, so none of the agent's threads is ever
    left in another namespace. An OSError becomes Internal."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name=label, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        exc = box["error"]
        if isinstance(exc, OSError) and not isinstance(exc, PodvisorError):
            raise Internal(str(exc)) from exc
        raise exc
    return box["value"]  # type: ignore[no-any-return]


def run_in(name: str, fn: Callable[[], T]) -> T:
    """Call ``fn`` in a new thread that has joined namespace ``name``; its
    result or exception is the caller's."""
    p = path(name)

    def entered() -> T:
        try:
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise Internal(f"cannot enter network namespace {name}: {exc.strerror}") from None
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise _errno_error(f"cannot enter network namespace {name}")
        finally:
            os.close(fd)
        return fn()

    return _on_new_thread(entered, f"netns-{name[:24]}")


def _create_here(p: Path) -> None:
    """Unshare a new namespace in a new thread and bind-mount it at ``p``
    (an empty file made here; removed again on failure)."""
    fd = os.open(p, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    os.close(fd)

    def unshare_and_mount() -> None:
        if _libc.unshare(CLONE_NEWNET) != 0:
            raise _errno_error("unshare(CLONE_NEWNET)")
        if _libc.mount(b"/proc/thread-self/ns/net", str(p).encode(), None, MS_BIND, None) != 0:
            raise _errno_error(f"mount --bind on {p}")

    try:
        _on_new_thread(unshare_and_mount, "netns-create")
    except Internal as exc:
        p.unlink(missing_ok=True)
        raise Internal(f"cannot create network namespace {p.name}: {exc.message}") from None


def create(name: str, *, exist_ok: bool = False) -> Path:
    """Create and mount a new, empty network namespace; returns its path.

    With ``exist_ok`` an already mounted namespace of that name is reused, so
    a retried operation does not fail on its own earlier half. A plain file
    left where a namespace was being mounted (a crash in between) is replaced.
    """
    p = path(name)
    if is_mounted(p):
        if exist_ok:
            return p
        raise Internal(f"cannot create network namespace {name}: it exists")
    if p.exists():
        p.unlink()  # not a namespace: a crash between creating the file and mounting
    if _mount_types(NETNS_DIR):
        # /run/netns is already the (shared) mount point `ip netns add` makes.
        _create_here(p)
        return p
    proc = _ip_netns(["add", name])
    if proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip()
        raise Internal(f"cannot create network namespace {name}: {message or proc.returncode}")
    return p


def delete(name: str) -> None:
    """Unmount and remove a namespace; a missing one is success (no process).

    The kernel frees the namespace (and the interfaces in it) once no process
    and no mount holds it any more.
    """
    p = path(name)
    if not p.exists():
        return
    # As `ip netns delete` does it: a lazy unmount (a process may still have
    # it open), then the file. Not mounted (EINVAL): a stale file, removed.
    if _libc.umount2(str(p).encode(), MNT_DETACH) != 0 and ctypes.get_errno() != errno.EINVAL:
        raise Internal(f"cannot delete network namespace {name}: {_errno_error(f'umount {p}')}")
    try:
        p.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise Internal(f"cannot delete network namespace {name}: {exc.strerror}") from None
