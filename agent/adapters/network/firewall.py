"""iptables rules of a pod network: the VM bridge's conntrack exemption and
the bridge plugin's masquerade rule when its DEL could not find it.

With br_netfilter loaded (every Kubernetes node), frames bridged through the
VM bridge ``pvb`` traverse the host's conntrack, and then again as they
arrive on the CNI bridge: the same connection tracked twice, with source
ports rewritten to resolve the clash. A raw-table NOTRACK rule for ``pvb``
keeps the host's conntrack (and so NAT and portmap) to the CNI bridge, where
it belongs.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess

import structlog

from agent.adapters.network.tools import run
from agent.domain.errors import Internal, Unavailable
from agent.domain.network.wiring import LinkNames

log = structlog.get_logger(__name__)

IPTABLES = "iptables"


def _notrack_rule(names: LinkNames, sandbox_id: str) -> list[str]:
    return ["-t", "raw", "PREROUTING", "-i", names.host_bridge, "-m", "comment", "--comment",
            f"podvisor: VM bridge of sandbox {sandbox_id[:12]}", "-j", "NOTRACK"]


def _iptables(op: str, rule: list[str]) -> int:
    # -w: the xtables lock is shared with CNI plugins running in parallel.
    args = [IPTABLES, "-w", "30", rule[0], rule[1], op, *rule[2:]]
    return run(args, what="iptables", check=False).returncode


def add_notrack(names: LinkNames, sandbox_id: str, *, fresh: bool) -> None:
    """The rule for the VM bridge; ``fresh``: the bridge was just created, so
    no earlier attempt can have added the rule (no check, one process less)."""
    rule = _notrack_rule(names, sandbox_id)
    if shutil.which(IPTABLES) is None or ((fresh or _iptables("-C", rule) != 0) and _iptables("-A", rule) != 0):
        # Not fatal: without it NAT'd flows still work, only tracked twice.
        log.warning("cannot exempt the VM bridge from conntrack", bridge=names.host_bridge)


def remove_notrack(names: LinkNames, sandbox_id: str) -> None:
    """Remove the VM bridge's rule, every copy of it; none is fine."""
    if shutil.which(IPTABLES) is None:
        return  # then setup could not have added it either
    rule = _notrack_rule(names, sandbox_id)
    for _ in range(16):  # a retried setup may have added it more than once
        # Delete first and check after: one call less than check-then-delete
        # for the usual single rule; a failed -D is an error only if -C still
        # finds the rule.
        deleted = _iptables("-D", rule) == 0
        if _iptables("-C", rule) != 0:
            return
        if not deleted:
            raise Internal(f"cannot delete the conntrack exemption of {names.host_bridge}")


def remove_masquerade_leftovers(sandbox_id: str) -> None:
    """The bridge plugin's ipMasq rule, when its DEL could not see the pod.

    Its DEL finds the pod's addresses inside the namespace; when the namespace
    is already gone (a reboot, a crash mid-teardown) it leaves the
    POSTROUTING rule and its chain behind. They carry the sandbox id in their
    comment (`id: "<sandbox id>"`), which is how they are found here.
    """
    try:
        saved = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True, timeout=30,
                               check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return  # no iptables here: nothing can be left
    marker = f'id: \\"{sandbox_id}\\"'
    for line in saved.splitlines():
        if not line.startswith("-A POSTROUTING ") or marker not in line:
            continue
        chain = line.rsplit(" ", 1)[-1]
        rule = shlex.split(line)[2:]
        for args in (["-D", "POSTROUTING", *rule], ["-F", chain], ["-X", chain]):
            done = subprocess.run([IPTABLES, "-w", "-t", "nat", *args], capture_output=True, text=True, timeout=30)
            if done.returncode != 0 and args[0] == "-D":
                raise Unavailable(f"cannot remove the masquerade rule of sandbox {sandbox_id}: {done.stderr.strip()}")
