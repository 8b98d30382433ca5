"""What a run may leave behind on the host, found by the marks that tie it
to one agent: its state directory, the sandbox and container ids it made,
the pod IPs it handed out. bench/soak.py checks every kind after its cycles.

Only this run's things count: other agents and tests share the host's
libvirtd, namespaces and iptables, so nothing is compared by totals.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

# Files the agent keeps for its whole life: the state database (with SQLite's
# side files) and pulled images; directories it makes once and reuses.
DATABASE_SUFFIXES = ("", "-wal", "-shm", "-journal")


@dataclass
class Marks:
    """What identifies this run's objects in names, command lines and rules."""

    state_dir: Path
    runtime_dir: Path
    ids: set[str] = field(default_factory=set)
    ips: set[str] = field(default_factory=set)

    def add_sandbox(self, sandbox_id: str, ip: str = "") -> None:
        self.ids |= {sandbox_id, sandbox_id[:12]}
        if ip:
            self.ips.add(ip)

    def add_container(self, container_id: str) -> None:
        self.ids |= {container_id, container_id[:32], container_id[:12]}

    def words(self) -> set[str]:
        # An IP counts only as a whole address ("10.1.2.3/32", "10.1.2.3 "),
        # never as the prefix of a longer one.
        return ({str(self.state_dir), *self.ids} | {ip + "/" for ip in self.ips} | {ip + " " for ip in self.ips}
                | {ip + '"' for ip in self.ips})

    def hit(self, text: str) -> bool:
        return any(w in text for w in self.words())


def _out(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout


def links(marks: Marks) -> list[str]:
    names = {line.split(":")[1].strip().split("@")[0] for line in _out("ip", "-o", "link").splitlines()}
    return sorted(n for n in names if marks.hit(n))


def netns(marks: Marks) -> list[str]:
    names = {line.split()[0] for line in _out("ip", "netns", "list").splitlines() if line.strip()}
    return sorted(n for n in names if marks.hit(n))


def iptables_rules(marks: Marks) -> list[str]:
    """Rules naming one of this run's sandboxes, IPs or the state directory
    (not the network's bridge: the bridge plugin's rules for it are made once
    and stay with the bridge)."""
    return [line for line in _out("iptables-save").splitlines() if marks.hit(line)]


def dnsmasq(marks: Marks) -> list[str]:
    return [line for line in _out("pgrep", "-a", "dnsmasq").splitlines() if marks.hit(line)]


def domains(marks: Marks, uri: str = "qemu:///system", wait: float = 60.0) -> list[str]:
    """This run's libvirt domains. A connection per call, retried while
    libvirtd restarts (other tests on the host restart it)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            conn = libvirt.open(uri)
            try:
                found = []
                for dom in conn.listAllDomains():
                    try:
                        xml = dom.XMLDesc(0)
                        name = dom.name()
                    except libvirt.libvirtError:
                        continue  # undefined while listed
                    if marks.hit(name) or str(marks.state_dir) in xml:
                        found.append(name)
                return sorted(found)
            finally:
                conn.close()
        except libvirt.libvirtError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def leases(ipam_dir: Path) -> list[str]:
    """host-local's lease files: one per address, named by it."""
    if not ipam_dir.exists():
        return []
    return sorted(str(p.relative_to(ipam_dir)) for p in ipam_dir.rglob("*") if p.is_file() and p.name[0].isdigit())


def tree(root: Path, skip: Path | None = None) -> set[str]:
    """Every path under ``root``, relative to it, except those under ``skip``."""
    if not root.exists():
        return set()
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if skip is None or not (p == skip or p.is_relative_to(skip))}


def new_files(root: Path, before: set[str], *, database: str = "", keep_dirs: Iterable[str] = (),
              skip: Path | None = None) -> list[str]:
    """Paths under ``root`` (not under ``skip``) that were not there in
    ``before``: the database's side files and the empty directories named in
    ``keep_dirs`` excepted."""
    db_files = {database + s for s in DATABASE_SUFFIXES} if database else set()
    kept = set(keep_dirs)
    left = []
    for rel in sorted(tree(root, skip) - before):
        if rel in db_files:
            continue
        if rel in kept and (root / rel).is_dir() and not any((root / rel).iterdir()):
            continue
        left.append(rel)
    return left


def fds(pid: int) -> dict[str, str]:
    """The process's open descriptors and what each points at."""
    out = {}
    base = Path(f"/proc/{pid}/fd")
    for entry in base.iterdir():
        try:
            out[entry.name] = os.readlink(entry)
        except OSError:
            continue  # closed while listed
    return out


def normalise_fd_targets(targets: Iterable[str]) -> list[str]:
    """Descriptor targets without their inode numbers, for a readable diff."""
    return sorted(t.split(":[")[0] + ":[]" if ":[" in t else t for t in targets)
