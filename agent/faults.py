"""Named crash points for fault-injection tests (neutral: services and
adapters both place them; no imports from the agent).

Every durable step of the mutating CRI calls (a store write, a directory, a
network namespace, CNI ADD, an overlay, a seed, a define, a start, a blob, an
extraction, an installed disk, a record) is followed by ``point("name")``.
With ``PODVISOR_CRASH_AT=<name>`` (or ``<name>:<n>``, the n-th time the point
is reached, 1 by default) in the agent's environment, the agent kills itself
with SIGKILL there: a real ``kill -9``, no cleanup, no flush. Tests then
restart the agent and check that the call is either fully done or fully not
done, with nothing left behind (tests/integration/test_crash_points.py).

Disarmed (the default, and always in production) ``point`` is one comparison
of a module global with None.

``POINTS`` is the registry: every point placed in the code is listed under
the CRI call(s) that reach it, in the order they are reached, so the crash
tests cover a new point as soon as it is registered (a unit test checks that
the code and the registry agree). docs/debugging.md lists them too.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

ENV = "PODVISOR_CRASH_AT"

# CRI call → its crash points, in the order a call reaches them.
POINTS: dict[str, tuple[str, ...]] = {
    "RunPodSandbox": (
        "sandbox.run.recorded",        # the CREATING row is in the store
        "sandbox.run.dir",             # the sandbox's directory exists
        "sandbox.run.log_dir",         # kubelet's log directory exists
        "podnet.add.netns",            # the network namespace exists
        "podnet.add.cni",              # CNI ADD done (IPAM lease, veth, rules) and the VM's links built
        "podnet.add.plan_saved",       # podnet.json (the hand-over plan) written
        "podnet.add.handed_over",      # eth0 handed over to the VM's bridge
        "sandbox.run.ready",           # the READY row is in the store
    ),
    "CreateContainer": (
        "container.create.recorded",   # the CREATING row is in the store
        "container.create.dir",        # the container's directory exists
        "container.create.overlay",    # the qcow2 overlay is written
        "container.create.seed",       # the NoCloud seed ISO is written
        "podnet.dhcp.recorded",        # podnet.json says the DHCP server runs
        "podnet.dhcp.started",         # dnsmasq runs in the pod's namespace
        "container.create.defined",    # the libvirt domain is defined
        "container.create.created",    # the CREATED row is in the store
    ),
    "StartContainer": (
        "container.start.following",   # the console log is followed (log file opened)
        "container.start.virtiofsd",   # the pod volumes' virtiofsd runs (VMs with mounts)
        "container.start.started",     # the domain runs
        "container.start.running",     # the RUNNING row is in the store
    ),
    "RemovePodSandbox": (
        "container.stop.requested",    # stop_requested is in the store
        "container.stop.destroyed",    # the domain is stopped
        "container.stop.exited",       # the EXITED row is in the store
        "container.remove.recorded",   # the REMOVING row is in the store
        "container.remove.undefined",  # the domain is undefined
        "container.remove.files",      # the container's directory is deleted
        "container.remove.deleted",    # the container's row is deleted
        "sandbox.remove.recorded",     # the REMOVING row is in the store
        "podnet.remove.pod",           # dnsmasq stopped, eth0 restored
        "podnet.remove.cni",           # CNI DEL done, the VM's links deleted
        "podnet.remove.netns",         # the network namespace is deleted
        "sandbox.remove.files",        # the sandbox's directory is deleted
        "sandbox.remove.deleted",      # the sandbox's row is deleted
    ),
    "PullImage": (
        "pull.manifest",               # the manifest blob is stored
        "pull.config",                 # the config blob is stored
        "pull.blob",                   # a layer blob is downloaded and stored
        "pull.extracted",              # the layers are extracted to the scratch directory
        "pull.installed",              # the base disks are installed in the image's directory
        "pull.recorded",               # the image's row is in the store
    ),
}

ALL_POINTS = frozenset(p for points in POINTS.values() for p in points)



class _Armed:
    def __init__(self, name: str, hits: int) -> None:
        self.name = name
        self.left = hits
        self.lock = threading.Lock()


# The armed point; None (the default) costs nothing but the comparison in ``point``.
_armed: _Armed | None = None


def parse(setting: str) -> tuple[str, int]:
    """``name`` or ``name:n`` → (name, n); ValueError for an unknown point or a bad count."""
    name, _, count = setting.strip().partition(":")
    if name not in ALL_POINTS:
        raise ValueError(f"{ENV}: unknown crash point {name!r} (see docs/debugging.md)")
    n = int(count) if count.isdigit() else (1 if not count else 0)
    if n < 1:
        raise ValueError(f"{ENV}: the count after ':' must be at least 1, not {n}")
    return name, n


def arm(setting: str | None) -> None:
    """Arm the crash point ``setting`` names (None or "" disarms)."""
    global _armed
    _armed = _Armed(*parse(setting)) if setting else None


def arm_from_environment() -> None:
    """Arm from ``PODVISOR_CRASH_AT`` (the agent's start-up)."""
    arm(os.environ.get(ENV))


def point(name: str) -> None:
    """A crash point: kill -9 of this process here when it is the armed one."""
    if _armed is None:
        return
    _reached(_armed, name)


def _reached(armed: _Armed, name: str) -> None:
    if armed.name != name:
        return
    with armed.lock:
        armed.left -= 1
        if armed.left > 0:
            return
    sys.stderr.write(f"podvisor: {ENV}: crashing at {name}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


# Wedged loops, for the watchdog's tests --------------------------------------------------
#
# ``PODVISOR_WEDGE=<loop>@<file>`` in the agent's environment: once ``file``
# exists, the named loop blocks for ever the next time it passes its wedge
# point, as a deadlock would. The watchdog must then stop sending WATCHDOG=1
# (tests/integration/test_watchdog.py). Disarmed (the default, and always in
# production) ``wedge`` is one comparison of a module global with None.

WEDGE_ENV = "PODVISOR_WEDGE"

# The loops the watchdog watches, each with a wedge point in it.
LOOPS = (
    "grpc",            # an RPC handler (agent.api.interceptor): the self-probe hangs
    "libvirt-events",  # libvirt's event loop thread (agent.adapters.libvirt)
    "console-logs",    # the console follower's thread (agent.adapters.console_log)
)

_wedge: tuple[str, str] | None = None


def parse_wedge(setting: str) -> tuple[str, str]:
    """``<loop>@<file>`` → (loop, file); ValueError naming the problem."""
    loop, sep, trigger = setting.strip().partition("@")
    if loop not in LOOPS:
        raise ValueError(f"{WEDGE_ENV}: unknown loop {loop!r} (one of {', '.join(LOOPS)})")
    if not sep or not trigger.startswith("/"):
        raise ValueError(f"{WEDGE_ENV}: expected <loop>@<absolute path of the trigger file>")
    return loop, trigger


def arm_wedge(setting: str | None) -> None:
    """Arm the wedge ``setting`` names (None or "" disarms)."""
    global _wedge
    _wedge = parse_wedge(setting) if setting else None


def wedge(loop: str) -> None:
    """A wedge point of ``loop``: blocks for ever once armed for it and triggered."""
    if _wedge is None:
        return
    name, trigger = _wedge
    if name != loop or not os.path.exists(trigger):
        return
    sys.stderr.write(f"podvisor: {WEDGE_ENV}: loop {loop} wedged\n")
    sys.stderr.flush()
    threading.Event().wait()
