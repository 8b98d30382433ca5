"""Host facts about /dev/kvm, including a real boot probe under KVM.

The probe boots QEMU's SeaBIOS with no disk under KVM and waits for it to
report "No bootable device" on the debug console. A KVM that cannot run
ordinary guests either fails that (emulation failure, MSR aborts) or makes
QEMU warn that the host lacks basic CPU features; either way the answer is no.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import structlog

from agent.domain.virt import KvmFacts

log = structlog.get_logger(__name__)

KVM_DEVICE = Path("/dev/kvm")
QEMU_USER = "libvirt-qemu"
PVM_MODULE = Path("/sys/module/kvm_pvm")
_BAD_SIGNS = (
    "doesn't support requested feature",
    "KVM internal error",
    "emulation failure",
    "kvm_buf_set_msrs",
    "failed to initialize kvm",
    "Could not access KVM",
)


def gather(device: Path = KVM_DEVICE, pvm_module: Path = PVM_MODULE) -> KvmFacts:
    """Cheap facts: device present, openable, PVM module loaded."""
    present = device.exists()
    usable = False
    if present:
        try:
            fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            usable = False
        else:
            os.close(fd)
            usable = qemu_user_can_open(device)
    return KvmFacts(device_present=present, device_usable=usable, pvm=pvm_module.exists())


def qemu_user_can_open(device: Path, user: str = QEMU_USER) -> bool:
    """Whether libvirt's unprivileged QEMU user may open the device read-write.

    The probe runs as root and would pass regardless; guests would then fail
    to start. Without that user (not a libvirt host), trust root's answer.
    """
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return True
    st = device.stat()
    if st.st_mode & 0o006 == 0o006:
        return True
    groups = {pw.pw_gid, *(g.gr_gid for g in grp.getgrall() if user in g.gr_mem)}
    if st.st_gid in groups and st.st_mode & 0o060 == 0o060:
        return True
    return st.st_uid == pw.pw_uid and st.st_mode & 0o600 == 0o600


def find_emulator() -> str | None:
    for name in ("qemu-system-x86_64", "kvm"):
        found = shutil.which(name)
        if found:
            return found
    for candidate in ("/usr/bin/qemu-system-x86_64", "/usr/libexec/qemu-kvm"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def probe(emulator: str | None = None, timeout: float = 15.0) -> tuple[bool, str]:
    """Boot firmware under KVM; (works, detail)."""
    emulator = emulator or find_emulator()
    if emulator is None:
        return False, "no qemu-system-x86_64 found"
    with tempfile.TemporaryDirectory(prefix="podvisor-kvm-probe-") as tmp:
        debug_log = Path(tmp) / "debugcon.log"
        cmd = [
            emulator, "-accel", "kvm", "-machine", "pc", "-m", "16",
            "-display", "none", "-nodefaults", "-no-user-config", "-no-reboot",
            "-chardev", f"file,id=dbg,path={debug_log}",
            "-device", "isa-debugcon,iobase=0x402,chardev=dbg",
        ]
        stderr_path = Path(tmp) / "stderr"
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err)
            deadline = time.monotonic() + timeout
            booted = False
            try:
                while time.monotonic() < deadline and proc.poll() is None:
                    if debug_log.exists() and b"No bootable device" in debug_log.read_bytes():
                        booted = True
                        break
                    time.sleep(0.05)
            finally:
                proc.kill()
                proc.wait(timeout=10)
        stderr = stderr_path.read_text(errors="replace")
    for sign in _BAD_SIGNS:
        if sign in stderr:
            line = next((ln for ln in stderr.splitlines() if sign in ln), sign)
            return False, line.strip()[:200]
    if not booted:
        return False, f"firmware did not finish under KVM within {timeout:.0f}s"
    return True, "firmware booted under KVM"
