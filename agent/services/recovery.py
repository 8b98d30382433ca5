"""Start-up recovery: rebuild the in-memory view from the store and finish or
undo what a crash interrupted.

- CREATING sandboxes were never reported to a client as created: roll back.
- REMOVING sandboxes were being deleted: finish the deletion.
- Sandbox directories without a row are orphans this agent made: delete.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog

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


def recover(ports: Ports, sandboxes: SandboxService) -> RecoveryReport:
    report = RecoveryReport()
    stored = ports.store.load_sandboxes()
    keep = []
    for sb in stored:
        if sb.state is SandboxState.CREATING:
            sandboxes.remove_network(sb)
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
            sandboxes.finish_removal(sb)
            report.finished_removal.append(sb.id)
    known = {sb.id for sb in stored}
    if ports.network is not None:
        for sb in keep:
            if sb.state is SandboxState.READY and sb.spec.network_mode is NetworkMode.POD:
                # dnsmasq is the agent's child: a crash or reboot may have taken it.
                ports.network.ensure_dhcp(sb.id, ports.files.sandbox_dir(sb.id))
        for sid in ports.network.cached_sandbox_ids():
            if sid not in known:
                ports.network.remove(sid, ports.files.sandbox_dir(sid))
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
