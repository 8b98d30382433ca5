"""The pod's DHCP server process: dnsmasq started in the pod namespace,
found by its pid file (and, when that is lost, through /proc), stopped.

Its command line is planned in ``agent/domain/network/dnsmasq.py``; its files
(pid, leases, log) are in the sandbox directory, so it is found again with
nothing in memory.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from agent.adapters.network.tools import run
from agent.domain.errors import Internal
from agent.domain.network.dnsmasq import LEASE_FILE, LOG_FILE, PID_FILE, dnsmasq_args
from agent.domain.network.wiring import PodWiring

STOP_TIMEOUT = 5.0


def proc_state(pid: int) -> str:
    """The process's state letter ('' when gone); a zombie counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # comm may contain spaces and parentheses: the state follows the last ')'.
    return stat[stat.rfind(")") + 2:][:1]


def _is_ours(pid: int, pid_file: Path) -> bool:
    """Whether ``pid`` is a live dnsmasq started for this pid file (pids are reused)."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return comm == "dnsmasq" and f"--pid-file={pid_file}".encode() in cmdline and proc_state(pid) not in ("", "Z")


def _read_pid(pid_file: Path) -> int | None:
    try:
        text = pid_file.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _find(pid_file: Path) -> list[int]:
    """Live dnsmasq processes serving this sandbox: the pid file's, and any
    other started with the same pid file (a pid file lost in a crash)."""
    pids = []
    pid = _read_pid(pid_file)
    if pid is not None and _is_ours(pid, pid_file):
        pids.append(pid)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) not in pids and _is_ours(int(entry.name), pid_file):
            pids.append(int(entry.name))
    return pids


def running(workdir: Path) -> bool:
    """Whether this sandbox's DHCP server runs."""
    pid = _read_pid(workdir / PID_FILE)
    return pid is not None and _is_ours(pid, workdir / PID_FILE)


def start(wiring: PodWiring, interface: str, workdir: Path) -> None:
    """Start the DHCP server on ``interface``; call it inside the pod's
    namespace (netns.run_in)."""
    # dnsmasq forks into the background once its sockets are bound, so a bad
    # flag or a missing interface shows up as this command's exit status.
    run(dnsmasq_args(wiring, interface=interface, workdir=workdir), what="start the DHCP server")
    if not running(workdir):
        raise Internal(f"dnsmasq for sandbox {wiring.host_bridge[3:]} exited right after starting; "
                       f"see {workdir / LOG_FILE}")


def stop(workdir: Path, *, scan: bool = True) -> None:
    """Stop the sandbox's dnsmasq (SIGTERM, SIGKILL after STOP_TIMEOUT) and
    remove its files; ``scan``: also look through /proc for one whose pid
    file was lost (needless when the state says none was started)."""
    pid_file = workdir / PID_FILE
    if scan:
        pids = _find(pid_file)
    else:
        pid = _read_pid(pid_file)
        pids = [pid] if pid is not None and _is_ours(pid, pid_file) else []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + STOP_TIMEOUT
    for pid in pids:
        while _is_ours(pid, pid_file):
            if time.monotonic() > deadline:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                time.sleep(0.05)
                if _is_ours(pid, pid_file):
                    raise Internal(f"dnsmasq (pid {pid}) does not exit")
                break
            time.sleep(0.005)  # dnsmasq exits within milliseconds of SIGTERM
    for name in (PID_FILE, LEASE_FILE, LOG_FILE):
        (workdir / name).unlink(missing_ok=True)
