"""Named network namespaces (/run/netns/<name>), as `ip netns` manages them.

`ip netns add` bind-mounts the new namespace at /run/netns/<name>, the path
CNI plugins receive as CNI_NETNS; other tools (`ip -n`, `ip netns exec`,
`nsenter --net=`) find it by the same name. Subprocesses rather than
pyroute2: one dependency less, and every call has a timeout and a checked
exit status, like the other host tools the agent runs.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from agent.domain.errors import Internal, InvalidArgument

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


def is_mounted(p: Path) -> bool:
    """Whether a network namespace is mounted at ``p`` (any path, e.g. a CNI_NETNS)."""
    # A leftover plain file (from a crash between create and mount, or from an
    # `ip netns add` run in a private mount namespace) is not a namespace:
    # only an nsfs mount on the path is.
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return False
    target = str(p)
    for line in lines:
        fields, _, rest = line.partition(" - ")
        parts = fields.split()
        if len(parts) >= 5 and parts[4] == target and rest.split()[:1] == ["nsfs"]:
            return True
    return False


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


def create(name: str, *, exist_ok: bool = False) -> Path:
    """Create and mount a new, empty network namespace; returns its path.

    With ``exist_ok`` an already mounted namespace of that name is reused, so
    a retried operation does not fail on its own earlier half.
    """
    p = path(name)
    if exist_ok and is_mounted(p):
        return p
    proc = _ip_netns(["add", name])
    if proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip()
        raise Internal(f"cannot create network namespace {name}: {message or proc.returncode}")
    return p


def delete(name: str) -> None:
    """Unmount and remove a namespace; a missing one is success.

    The kernel frees the namespace (and the interfaces in it) once no process
    and no mount holds it any more.
    """
    p = path(name)
    if not p.exists():
        return
    proc = _ip_netns(["delete", name])
    if proc.returncode != 0 and p.exists():
        if not is_mounted(p):
            # A stale file with nothing mounted on it: just remove it.
            p.unlink(missing_ok=True)
            return
        message = proc.stderr.decode(errors="replace").strip()
        raise Internal(f"cannot delete network namespace {name}: {message or proc.returncode}")
