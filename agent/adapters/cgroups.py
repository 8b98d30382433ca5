"""The pod's cgroup on this host: does it exist, and moving a VM's QEMU into it.

Every mounted cgroup hierarchy counts, v1 (one per controller, or co-mounted)
and v2 alike, found in ``/proc/self/mountinfo``. A pod cgroup path
(``/kubepods/burstable/pod<uid>``) is looked up in each; QEMU is placed in a
child named after the container, ``<pod cgroup>/<container id>``, in every
hierarchy where the pod's cgroup exists, as runc places a container. kubelet
then accounts the VM to the pod (memory, CPU, pids) and its eviction and
limits apply to it.

Details a VM needs beyond runc's:

* cgroup v1 ``cpuset``: a new cgroup starts with no CPUs and no memory
  nodes and accepts no task, so the child copies its parent's;
* cgroup v1 ``memory``: charges stay where they were made unless the
  destination sets ``memory.move_charge_at_immigrate``; the child sets it, so
  what QEMU allocated while libvirt started it moves with it (kernels without
  the file, or v2, keep those few pages where they were);
* writing the process id to ``cgroup.procs`` moves every thread, including
  the vCPU threads libvirt had put in its own sub-cgroups;
* the v1 ``devices`` hierarchy is left alone: it accounts nothing, and there
  QEMU keeps the device whitelist libvirt gave it. On cgroup v2 libvirt's
  device filter is an eBPF program on its own cgroup, which QEMU leaves
  (docs/vms.md says what still confines it).
"""

from __future__ import annotations

import errno
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from agent.domain.errors import FailedPrecondition

log = structlog.get_logger(__name__)

MOUNTINFO = Path("/proc/self/mountinfo")
REMOVE_ATTEMPTS = 20  # 0.1 s apart


@dataclass(frozen=True)
class Hierarchy:
    mount: Path  # where it is mounted
    root: str  # the cgroup mounted there ("/" unless the agent runs in a cgroup namespace)
    version: int  # 1 or 2
    controllers: frozenset[str]  # v1: from the super options ("cpu", "memory", "name=systemd"…)

    def directory(self, path: str) -> Path | None:
        """The directory of cgroup ``path`` in this hierarchy; None when it lies outside the mount."""
        root = self.root.rstrip("/")
        if root and not (path == root or path.startswith(root + "/")):
            return None
        rel = path[len(root):].lstrip("/")
        return self.mount / rel if rel else self.mount


def _unescape(field: str) -> str:
    """mountinfo octal escapes (``\\040`` for a space)."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def hierarchies(mountinfo: Path = MOUNTINFO) -> list[Hierarchy]:
    """The cgroup hierarchies mounted in this mount namespace, each once."""
    seen: set[str] = set()
    found: list[Hierarchy] = []
    for line in mountinfo.read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        device = fields[2]
        if device in seen:  # the same hierarchy mounted twice
            continue
        seen.add(device)
        version = 2 if tail[0] == "cgroup2" else 1
        controllers = frozenset(tail[2].split(",")) if version == 1 else frozenset()
        found.append(Hierarchy(Path(_unescape(fields[4])), _unescape(fields[3]), version, controllers))
    return found


class PodCgroups:
    """The ``PodCgroups`` port over the host's cgroup filesystems."""

    def __init__(self, mountinfo: Path = MOUNTINFO) -> None:
        self._mountinfo = mountinfo

    def _directories(self, path: str) -> Iterator[tuple[Hierarchy, Path]]:
        for h in hierarchies(self._mountinfo):
            if h.version == 1 and "devices" in h.controllers:
                continue  # QEMU stays in libvirt's device whitelist (it accounts nothing)
            d = h.directory(path)
            if d is not None and d.is_dir():
                yield h, d

    def exists(self, path: str) -> bool:
        """Whether cgroup ``path`` exists in at least one hierarchy."""
        return any(True for _ in self._directories(path))

    def place(self, path: str, name: str, pid: int) -> None:
        """Move process ``pid`` (all its threads) into ``<path>/<name>`` in every hierarchy that has ``path``.

        FailedPrecondition names the cgroup when ``path`` exists nowhere or a
        move fails.
        """
        placed = 0
        for h, parent in self._directories(path):
            child = parent / name
            try:
                child.mkdir(exist_ok=True)
                if h.version == 1 and "cpuset" in h.controllers:
                    for knob in ("cpuset.cpus", "cpuset.mems"):
                        if not (child / knob).read_text().strip():
                            (child / knob).write_text((parent / knob).read_text())
                if h.version == 1 and "memory" in h.controllers:
                    _try_write(child / "memory.move_charge_at_immigrate", "3")
                (child / "cgroup.procs").write_text(str(pid))
            except OSError as exc:
                raise FailedPrecondition(
                    f"cannot move the VM's QEMU process into the pod's cgroup {child}: "
                    f"{exc.strerror or exc}") from None
            placed += 1
        if not placed:
            raise FailedPrecondition(f"the pod's cgroup {path} does not exist in any cgroup hierarchy of this host")
        log.debug("VM placed in the pod's cgroup", cgroup=f"{path}/{name}", pid=pid, hierarchies=placed)

    def remove(self, path: str, name: str) -> None:
        """Remove ``<path>/<name>`` wherever it exists (the VM has exited); a busy one is left, logged."""
        for _h, parent in self._directories(path):
            child = parent / name
            for attempt in range(REMOVE_ATTEMPTS):
                try:
                    child.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    # EBUSY: QEMU's last threads are still leaving (or its zombie not yet reaped).
                    if exc.errno == errno.EBUSY and attempt + 1 < REMOVE_ATTEMPTS:
                        time.sleep(0.1)
                        continue
                    log.warning("could not remove a VM's cgroup", cgroup=str(child),
                                error=exc.strerror or str(exc))
                    break


def _try_write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError:
        pass  # absent (v2-only kernels) or refused: charges simply stay where they were made
