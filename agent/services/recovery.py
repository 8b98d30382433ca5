"""Start-up recovery: rebuild the in-memory views from the store and finish or
undo what a crash interrupted, before the socket exists.

``recover`` is the one entry; it runs the steps in this order:

1. sandboxes (``recover_sandboxes``), with their pod networks:
   - CREATING sandboxes were never reported to a client as created: roll back
     (pod network included).
   - REMOVING sandboxes were being deleted: finish the deletion.
   - READY sandboxes whose pod network is gone (a host reboot) become
     NOTREADY; pod networks of sandboxes without a row are removed.
   - Sandbox directories without a row are orphans this agent made: delete.
2. images (``ImageService.recover``): the pull scratch space is emptied, the
   records loaded, blobs and disks no image references collected.
3. VM containers (``ContainerService.recover``): half-done creations rolled
   back, removals finished, running domains adopted (their console followed
   again), vanished ones marked exited, orphan domains undefined. Last:
   libvirt connects meanwhile, and the records it reads refer to the
   sandboxes and images the earlier steps settled.

Each step is idempotent and must not keep the agent from starting: a crash
during recovery is recovered by the next start.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import structlog

from agent.domain.errors import PodvisorError
from agent.domain.sandbox import NetworkMode, SandboxState
from agent.services.ports import Ports
from agent.services.sandboxes import SandboxService

log = structlog.get_logger(__name__)


@dataclass
class RecoveryReport:
    kept: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    finished_removal: list[str] = field(default_factory=list)
    orphan_dirs: list[str] = field(default_factory=list)
    orphan_networks: list[str] = field(default_factory=list)
    network_lost: list[str] = field(default_factory=list)


def _best_effort(what: str, sandbox_id: str, fn: Callable[[], object]) -> bool:
    """Recovery must not keep the agent from starting: log and carry on (the
    next start, or kubelet's next Stop/Remove, retries)."""
    try:
        fn()
    except (PodvisorError, OSError) as exc:
        log.error(f"recovery could not {what}", sandbox_id=sandbox_id, error=str(exc))
        return False
    return True


class Recoverable(Protocol):
    """A service that rebuilds its own state at start (images, containers)."""

    def recover(self) -> None: ...


def recover(ports: Ports, sandboxes: SandboxService, images: Recoverable,
            containers: Recoverable) -> RecoveryReport:
    """Recover everything, in the order the module docstring gives; the
    sandboxes' report is returned."""
    report = recover_sandboxes(ports, sandboxes)
    images.recover()
    containers.recover()
    return report


def recover_sandboxes(ports: Ports, sandboxes: SandboxService) -> RecoveryReport:
    """Step 1: sandboxes and their pod networks."""
    report = RecoveryReport()
    stored = ports.store.load_sandboxes()
    keep = []
    for sb in stored:
        if sb.state is SandboxState.CREATING:
            _best_effort("roll back pod network", sb.id, partial(sandboxes.remove_network, sb))
            ports.files.remove_sandbox_dir(sb.id)
            ports.store.delete_sandbox(sb.id)
            report.rolled_back.append(sb.id)
        elif sb.state is SandboxState.REMOVING:
            keep.append(sb)
        else:
            keep.append(sb)
            report.kept.append(sb.id)
    sandboxes.load(keep)
    for sb in keep:
        if sb.state is SandboxState.REMOVING:
            if _best_effort("finish removal", sb.id, partial(sandboxes.finish_removal, sb)):
                report.finished_removal.append(sb.id)
    known = {sb.id for sb in stored}
    if ports.network is not None:
        for sb in list(keep):
            if sb.state is SandboxState.READY and sb.spec.network_mode is NetworkMode.POD:
                try:
                    # Still there? And dnsmasq, if the VM had it started,
                    # may have died with the agent (same cgroup).
                    ports.network.recover(sb.id, ports.files.sandbox_dir(sb.id))
                except (PodvisorError, OSError) as exc:
                    # After a reboot the namespace and links are gone: the
                    # sandbox cannot serve its VM any more. NOTREADY makes
                    # kubelet recreate the pod, as with containerd.
                    log.warning("pod network lost; sandbox marked NOTREADY", sandbox_id=sb.id, error=str(exc))
                    lost = dataclasses.replace(sb, state=SandboxState.NOTREADY, stopped_at_ns=ports.clock.now_ns())
                    ports.store.update_sandbox(lost)
                    sandboxes.load([lost])
                    report.network_lost.append(sb.id)
        network = ports.network
        for sid in network.cached_sandbox_ids():
            if sid not in known:
                if _best_effort("remove orphan pod network", sid,
                                partial(network.remove, sid, ports.files.sandbox_dir(sid))):
                    report.orphan_networks.append(sid)
    for name in ports.files.list_sandbox_dirs():
        if name not in known:
            ports.files.remove_sandbox_dir(name)
            report.orphan_dirs.append(name)
    log.info(
        "recovery done",
        sandboxes=len(report.kept),
        rolled_back=report.rolled_back,
        finished_removal=report.finished_removal,
        orphan_dirs=report.orphan_dirs,
        orphan_networks=report.orphan_networks,
    )
    return report
