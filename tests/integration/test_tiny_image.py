"""Boot the tiny test guest (images/tiny) under plain QEMU/TCG with a NoCloud seed.

These tests check the guest's console contract (PODVISOR-* lines), the NoCloud
seed produced by agent.render.nocloud, and ACPI power-button behaviour. They
run QEMU directly: no libvirt, no KVM (the build machines' /dev/kvm is a PVM
device ordinary guests cannot use), and no NIC that can reach a network.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.render.nocloud import build_seed_iso, render_meta_data

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "images" / "tiny" / "build.py"
IMAGE_DIR = Path(os.environ.get("PODVISOR_TINY_IMAGE_DIR", "/var/cache/podvisor/images/tiny"))
QEMU = shutil.which("qemu-system-x86_64")

# Debian's cloud kernel needs ~68 MiB just to decompress itself and runs out
# of memory unpacking the initramfs below ~76 MiB; 96 MiB leaves headroom.
GUEST_MEMORY = os.environ.get("PODVISOR_TINY_MEMORY", "96M")
READY_TIMEOUT = 120.0

READY_RE = re.compile(r"^PODVISOR-READY hostname=(?P<hostname>\S+) ip=(?P<ip>\S+)$", re.M)


@pytest.fixture(scope="session")
def tiny_image() -> Path:
    """The tiny guest disk (qcow2), built once per machine and reused."""
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
    subprocess.run([sys.executable, str(BUILD_SCRIPT), str(IMAGE_DIR)], check=True, timeout=900)
    return IMAGE_DIR / "tiny.qcow2"


@dataclass
class Guest:
    """One QEMU process and the files it owns."""

    proc: subprocess.Popen[bytes]
    console: Path
    qmp_path: Path
    started: float = field(default_factory=time.monotonic)

    def console_text(self) -> str:
        try:
            raw = self.console.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""
        return raw.replace("\r\n", "\n")  # the guest tty turns \n into \r\n

    def wait_for(self, pattern: re.Pattern[str], timeout: float = READY_TIMEOUT) -> re.Match[str]:
        """Wait until the console matches; fail with the console if QEMU dies or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            match = pattern.search(self.console_text())
            if match:
                return match
            if self.proc.poll() is not None:
                pytest.fail(
                    f"QEMU exited ({self.proc.returncode}) before {pattern.pattern!r}:\n"
                    f"{self.console_text()}\n{self._stderr()}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"no {pattern.pattern!r} after {timeout} s:\n{self.console_text()}")
            time.sleep(0.2)

    def wait_ready(self) -> re.Match[str]:
        return self.wait_for(READY_RE)

    def qmp(self, command: str, **arguments: object) -> dict[str, object]:
        """Run one QMP command on a fresh connection and return its reply."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            deadline = time.monotonic() + 10
            while True:  # QEMU creates the socket a moment after it starts
                try:
                    sock.connect(str(self.qmp_path))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        raise
                    time.sleep(0.05)
            stream = sock.makefile("rwb")
            json.loads(stream.readline())  # greeting
            reply: dict[str, object] = {}
            for request in ({"execute": "qmp_capabilities"}, {"execute": command, "arguments": arguments}):
                stream.write(json.dumps(request).encode() + b"\n")
                stream.flush()
                while True:
                    reply = json.loads(stream.readline())
                    if "return" in reply or "error" in reply:
                        break  # skip asynchronous events
            return reply

    def exits_within(self, timeout: float) -> bool:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def _stderr(self) -> str:
        path = self.console.with_name("qemu.stderr")
        return path.read_text(errors="replace") if path.exists() else ""


BootGuest = Callable[..., Guest]


@pytest.fixture
def boot(tiny_image: Path) -> Iterator[BootGuest]:
    """Factory booting guests; every QEMU is killed and its files removed afterwards."""
    guests: list[Guest] = []
    workdir = Path(tempfile.mkdtemp(prefix="podvisor-tiny-"))

    def start(
        seed: bytes | None,
        *,
        seed_bus: str = "ide-cdrom",
        net: list[str] | None = None,
        memory: str = GUEST_MEMORY,
        paused: bool = False,
        machine: str = "pc",
        kernel_append: str | None = None,
    ) -> Guest:
        gdir = workdir / f"guest{len(guests)}"
        gdir.mkdir()
        console, qmp_path = gdir / "console.log", gdir / "qmp.sock"
        args = [
            str(QEMU), "-accel", "tcg", "-machine", machine, "-m", memory,
            "-nodefaults", "-display", "none", "-no-user-config",
            "-serial", f"file:{console}",
            "-qmp", f"unix:{qmp_path},server=on,wait=off",
            # snapshot=on: writes go to a throw-away overlay, the cached image stays pristine.
            "-drive", f"file={tiny_image},if=virtio,format=qcow2,snapshot=on",
        ]  # fmt: skip
        if seed is not None:
            seed_path = gdir / "seed.iso"
            seed_path.write_bytes(seed)
            if seed_bus == "ide-cdrom":
                args += ["-drive", f"file={seed_path},if=ide,media=cdrom,format=raw,readonly=on"]
            elif seed_bus == "virtio-disk":
                args += ["-drive", f"file={seed_path},if=virtio,format=raw,readonly=on"]
            elif seed_bus == "virtio-scsi-cdrom":
                args += [
                    "-device", "virtio-scsi-pci,id=scsi0",
                    "-drive", f"file={seed_path},if=none,id=seed,media=cdrom,format=raw,readonly=on",
                    "-device", "scsi-cd,drive=seed,bus=scsi0.0",
                ]  # fmt: skip
            else:
                raise ValueError(seed_bus)
        args += net if net is not None else ["-nic", "none"]
        if paused:
            args.append("-S")  # wait for QMP "cont"
        if kernel_append is not None:
            # Direct kernel boot: the only way to change the kernel command line.
            kernel, initrd = tiny_image.with_name("vmlinuz"), tiny_image.with_name("initrd.gz")
            args += ["-kernel", str(kernel), "-initrd", str(initrd), "-append", kernel_append]
        with (gdir / "qemu.stderr").open("wb") as stderr:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
        guest = Guest(proc, console, qmp_path)
        guests.append(guest)
        return guest

    try:
        yield start
    finally:
        for guest in guests:
            if guest.proc.poll() is None:
                guest.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                guest.proc.wait(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)


def seed(hostname: str, user_data: bytes, meta_extra: bytes = b"") -> bytes:
    meta = render_meta_data(f"iid-{hostname}", hostname) + meta_extra
    return build_seed_iso(meta, user_data)


SCRIPT_USER_DATA = b"#!/bin/sh\necho hello-from-user-data $(hostname)\n"


# q35's own cdrom sits on AHCI, which Debian's cloud kernel lacks: there the
# seed must be a virtio disk or a virtio-scsi cdrom.
@pytest.mark.parametrize(
    ("machine", "seed_bus"),
    [("pc", "ide-cdrom"), ("pc", "virtio-disk"), ("q35", "virtio-disk"), ("q35", "virtio-scsi-cdrom")],
)
def test_guest_boots_reads_seed_and_reports_ready(boot: BootGuest, machine: str, seed_bus: str) -> None:
    guest = boot(seed("tiny-ready", SCRIPT_USER_DATA), seed_bus=seed_bus, machine=machine)
    ready = guest.wait_ready()
    boot_seconds = time.monotonic() - guest.started
    print(f"ready after {boot_seconds:.1f} s on {machine} with the seed as {seed_bus}")

    assert ready["hostname"] == "tiny-ready"
    assert ready["ip"] == "none"  # no NIC at all: ready at once, no DHCP wait
    text = guest.console_text()
    begin, end = text.index("PODVISOR-USER-DATA-BEGIN"), text.index("PODVISOR-USER-DATA-END")
    assert SCRIPT_USER_DATA.decode() in text[begin:end]
    guest.wait_for(re.compile(r"^hello-from-user-data tiny-ready$", re.M), timeout=30)
    guest.wait_for(re.compile(r"^PODVISOR-SCRIPT-END rc=0$", re.M), timeout=30)
    assert len(READY_RE.findall(guest.console_text())) == 1


def test_cloud_config_user_data_is_printed_not_run(boot: BootGuest) -> None:
    user_data = b"#cloud-config\nruncmd:\n  - echo should-not-run\n"
    guest = boot(seed("tiny-config", user_data))
    assert guest.wait_ready()["hostname"] == "tiny-config"
    text = guest.console_text()
    assert user_data.decode() in text
    assert "PODVISOR-SCRIPT-BEGIN" not in text


def test_guest_without_seed_still_gets_ready(boot: BootGuest) -> None:
    guest = boot(None)
    assert guest.wait_ready()["hostname"] == "tiny"
    assert "no NoCloud seed found" in guest.console_text()


def test_nic_without_dhcp_answer_is_ready_after_timeout(boot: BootGuest) -> None:
    # A NIC with no backend: the guest sees eth0 but no DHCP server ever answers.
    guest = boot(seed("tiny-nodhcp", b""), net=["-device", "virtio-net-pci"])
    ready = guest.wait_ready()
    assert ready["ip"] == "none"
    assert ready["hostname"] == "tiny-nodhcp"


def test_dhcp_address_and_http_hostname(boot: BootGuest) -> None:
    # QEMU user networking with restrict=on: the guest reaches no network, but
    # QEMU's built-in DHCP answers and one forwarded port reaches httpd.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    net = ["-nic", f"user,model=virtio-net-pci,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:80"]
    guest = boot(seed("tiny-http", b""), net=net)
    ready = guest.wait_ready()
    assert ready["hostname"] == "tiny-http"
    assert ready["ip"] == "10.0.2.15"

    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                assert response.read() == b"tiny-http\n"
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_late_dhcp_lease_is_announced_after_ready(boot: BootGuest) -> None:
    # The NIC's link is down until the guest has given up waiting, then comes up.
    net = ["-netdev", "user,id=net0,restrict=on", "-device", "virtio-net-pci,netdev=net0,id=nic0"]
    guest = boot(seed("tiny-late", b""), net=net, paused=True)
    assert guest.qmp("set_link", name="nic0", up=False) == {"return": {}}
    assert guest.qmp("cont") == {"return": {}}
    ready = guest.wait_ready()
    assert ready["ip"] == "none"
    assert guest.qmp("set_link", name="nic0", up=True) == {"return": {}}
    guest.wait_for(re.compile(r"^PODVISOR-IP ip=10\.0\.2\.15$", re.M), timeout=60)
    assert len(READY_RE.findall(guest.console_text())) == 1


def test_acpi_power_button_powers_guest_off(boot: BootGuest) -> None:
    guest = boot(seed("tiny-acpi", b""))
    guest.wait_ready()
    assert guest.qmp("system_powerdown") == {"return": {}}
    assert guest.exits_within(60), f"QEMU still running:\n{guest.console_text()}"
    assert guest.proc.returncode == 0
    text = guest.console_text()
    assert "PODVISOR-ACPI-POWER-BUTTON" in text
    assert "PODVISOR-SHUTDOWN hostname=tiny-acpi" in text


@pytest.mark.parametrize(
    ("user_data", "meta_extra", "kernel_append"),
    [
        pytest.param(b"#cloud-config\n#podvisor:ignore-acpi\n", b"", None, id="user-data-line"),
        pytest.param(b"", b"podvisor-ignore-acpi: true\n", None, id="meta-data-key"),
        pytest.param(b"", b"", "console=ttyS0 quiet podvisor.ignore_acpi=1", id="kernel-command-line"),
    ],
)
def test_ignore_acpi_knob_keeps_guest_running(
    boot: BootGuest, user_data: bytes, meta_extra: bytes, kernel_append: str | None
) -> None:
    guest = boot(seed("tiny-stubborn", user_data, meta_extra), kernel_append=kernel_append)
    guest.wait_ready()
    assert "ignoring the ACPI power button" in guest.console_text()
    assert guest.qmp("system_powerdown") == {"return": {}}
    assert not guest.exits_within(15), f"guest powered off:\n{guest.console_text()}"


def test_guest_poweroff_ends_qemu(boot: BootGuest) -> None:
    guest = boot(seed("tiny-bye", b"#!/bin/sh\necho going-down\npoweroff\n"))
    assert guest.exits_within(READY_TIMEOUT), f"QEMU still running:\n{guest.console_text()}"
    assert guest.proc.returncode == 0
    text = guest.console_text()
    assert "going-down" in text
    assert "PODVISOR-SHUTDOWN hostname=tiny-bye" in text
