"""Stopping and starting the machine's libvirtd for fault tests.

With systemd the units are used (sockets too, or socket activation would
bring libvirtd straight back); without it, the daemon is signalled directly,
as the Makefile started it.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

SYSTEMD = Path("/run/systemd/system").is_dir()


def libvirtd_running() -> bool:
    return subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True).returncode == 0


def stop_libvirtd(timeout: float = 30.0) -> None:
    if SYSTEMD:
        subprocess.run(["systemctl", "stop", "libvirtd.socket", "libvirtd-ro.socket",
                        "libvirtd-admin.socket", "libvirtd.service"], check=False, timeout=60)
    else:
        subprocess.run(["pkill", "-TERM", "-x", "libvirtd"], check=False)
    deadline = time.monotonic() + timeout
    while libvirtd_running():
        if time.monotonic() > deadline:
            subprocess.run(["pkill", "-KILL", "-x", "libvirtd"], check=False)
            time.sleep(1)
            break
        time.sleep(0.2)


def start_libvirtd(timeout: float = 120.0) -> None:
    if SYSTEMD:
        subprocess.run(["systemctl", "start", "libvirtd.socket", "libvirtd.service"],
                       check=True, timeout=60)
    elif not libvirtd_running():
        subprocess.run(["libvirtd", "-d"], check=True, timeout=60)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True,
                           timeout=60)
        if r.returncode == 0:
            return
        time.sleep(0.5)
    raise AssertionError("libvirtd did not come back")
