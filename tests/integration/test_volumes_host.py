"""The pod volumes' host side against the real system: the virtiofsd launcher
(private mount namespace, bind mounts, read-only enforced by the host), a
domain with the share started by the real libvirt (QEMU connects to the
agent's virtiofsd), clean-up, and the guest's mount script run in a mount
namespace of its own (a bind mount standing in for ``mount -t virtiofs``).

The guest reading and writing through virtiofs is proven end to end on the
Debian guest (tests/e2e/test_volumes.py).
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.adapters.virtiofs import PID_FILE, ROOT_DIR, SPEC_FILE, VirtiofsHost
from agent.domain.errors import InvalidArgument, NotFound
from agent.domain.volumes import VOLUMES_STATUS_CHANNEL, Mount, Share
from agent.render.cloudinit import VOLUMES_SCRIPT, volumes_bootcmd_args
from tests.integration.test_domain_xml_libvirt import _define, _prepare, _undefine, _virsh, qemu_dir  # noqa: F401

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount namespaces, qemu:///system)")


@pytest.fixture
def host() -> VirtiofsHost:
    return VirtiofsHost((pwd.getpwnam("libvirt-qemu").pw_uid, -1))


@pytest.fixture
def volumes(qemu_dir: Path) -> Iterator[tuple[Path, tuple[Mount, ...]]]:  # noqa: F811
    """A host directory behind a symlink (read-only), a file (read-write), a directory (read-write)."""
    data = qemu_dir / "data"
    data.mkdir()
    (data / "a.txt").write_text("hello\n")
    (qemu_dir / "link").symlink_to(data)
    (qemu_dir / "termination-log").write_text("")
    (qemu_dir / "scratch").mkdir()
    container = qemu_dir / "c"
    container.mkdir(mode=0o711)
    yield container, (
        Mount("/etc/config", str(qemu_dir / "link"), readonly=True),
        Mount("/dev/termination-log", str(qemu_dir / "termination-log")),
        Mount("/scratch", str(qemu_dir / "scratch")),
    )


def _in_namespace_of(pid: int, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", "-t", str(pid), "-m", "sh", "-c", script], capture_output=True, text=True,
                          timeout=30, check=False)


def test_inspect_resolves_kinds_and_names_a_missing_host_path(host: VirtiofsHost, qemu_dir: Path,  # noqa: F811
                                                              volumes: tuple[Path, tuple[Mount, ...]]) -> None:
    _, mounts = volumes
    assert [(s.name, s.is_dir) for s in host.inspect(mounts)] == [("0", True), ("1", False), ("2", True)]
    with pytest.raises(NotFound, match=r"config\.mounts\[1\]\.host_path"):
        host.inspect((mounts[0], Mount("/x", str(qemu_dir / "missing"))))
    (qemu_dir / "dangling").symlink_to(qemu_dir / "nowhere")
    with pytest.raises(NotFound, match=r"config\.mounts\[0\]\.host_path"):
        host.inspect((Mount("/x", str(qemu_dir / "dangling")),))
    with pytest.raises(InvalidArgument, match=r"config\.mounts\[0\]\.host_path"):
        host.inspect((Mount("/x", "/dev/null"),))


def test_the_launcher_serves_binds_and_the_host_enforces_read_only(
        host: VirtiofsHost, qemu_dir: Path, volumes: tuple[Path, tuple[Mount, ...]]) -> None:  # noqa: F811
    container, mounts = volumes
    socket = str(qemu_dir / "v.sock")
    pid = host.start(str(container), socket, host.inspect(mounts))
    try:
        assert Path(socket).is_socket()
        assert os.stat(socket).st_uid == pwd.getpwnam("libvirt-qemu").pw_uid
        assert f"--socket-path={socket}" in Path(f"/proc/{pid}/cmdline").read_text().split("\0")
        assert (container / PID_FILE).read_text().strip() == str(pid)
        root = container / ROOT_DIR
        ro = _in_namespace_of(pid, f"cat {root}/0/a.txt && echo x > {root}/0/new")
        assert ro.stdout == "hello\n"
        assert "Read-only file system" in ro.stderr
        rw = _in_namespace_of(pid, f"echo done > {root}/1 && echo y > {root}/2/made")
        assert rw.returncode == 0, rw.stderr
        assert (qemu_dir / "termination-log").read_text() == "done\n"
        assert (qemu_dir / "scratch" / "made").read_text() == "y\n"
        assert not (qemu_dir / "data" / "new").exists()
        # Nothing of the namespace shows on the host.
        assert list(root.iterdir()) == []
        assert str(root) not in Path("/proc/self/mountinfo").read_text()
    finally:
        host.stop(str(container), socket)
    assert not host.running(str(container), socket)
    assert not Path(f"/proc/{pid}").exists() or "virtiofsd" not in Path(f"/proc/{pid}/cmdline").read_text()
    assert not Path(socket).exists()
    assert not (container / PID_FILE).exists() and not (container / SPEC_FILE).exists()


def test_a_launch_that_cannot_mount_fails_with_the_reason(host: VirtiofsHost, qemu_dir: Path,  # noqa: F811
                                                          volumes: tuple[Path, tuple[Mount, ...]]) -> None:
    container, mounts = volumes
    entries = host.inspect(mounts)
    (qemu_dir / "scratch").rmdir()  # gone between CreateContainer and StartContainer
    socket = str(qemu_dir / "v.sock")
    with pytest.raises(Exception, match="no longer a directory"):
        host.start(str(container), socket, entries)
    assert not host.running(str(container), socket)
    assert not Path(socket).exists()


def test_stop_leaves_a_recorded_pid_that_is_not_virtiofsd_alone(host: VirtiofsHost, qemu_dir: Path) -> None:  # noqa: F811
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        container = qemu_dir / "c2"
        container.mkdir()
        (container / PID_FILE).write_text(f"{sleeper.pid}\n")
        host.stop(str(container), str(qemu_dir / "other.sock"))
        assert sleeper.poll() is None, "stop killed a process that was not the VM's virtiofsd"
        assert not (container / PID_FILE).exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_libvirt_connects_the_domain_to_the_agents_virtiofsd(
        host: VirtiofsHost, qemu_dir: Path, volumes: tuple[Path, tuple[Mount, ...]]) -> None:  # noqa: F811
    container, mounts = volumes
    spec = _prepare("virtiofs-volumes", qemu_dir)
    spec = dataclasses.replace(spec, interfaces=(), volumes_status=str(container / "volumes.status"))
    pid = host.start(str(container), spec.virtiofs_socket, host.inspect(mounts))
    try:
        _define(spec, qemu_dir)
        dumped = _virsh("dumpxml", spec.name).stdout
        assert "<source type='memfd'/>" in dumped and "<access mode='shared'/>" in dumped
        assert f"<source socket='{spec.virtiofs_socket}'/>" in dumped
        _virsh("start", spec.name)
        assert _virsh("domstate", spec.name).stdout.strip() == "running"
        assert host.running(str(container), spec.virtiofs_socket)
        _virsh("destroy", spec.name)
        # QEMU gone: virtiofsd ends by itself (stop is for the cases it does not).
        deadline = time.monotonic() + 30
        while host.running(str(container), spec.virtiofs_socket) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not host.running(str(container), spec.virtiofs_socket)
    finally:
        _virsh("destroy", spec.name, check=False)
        _undefine(spec.name)
        host.stop(str(container), spec.virtiofs_socket)
    assert not Path(f"/proc/{pid}/cmdline").exists() or "virtiofsd" not in Path(f"/proc/{pid}/cmdline").read_text()
    assert not Path(spec.virtiofs_socket).exists()


# --- the guest's mount script, run here in a private mount namespace ------------------------------


def _guest_script(tmp: Path, mount_line: str) -> str:
    script = VOLUMES_SCRIPT
    for old, new in (
        (f"port=/dev/virtio-ports/{VOLUMES_STATUS_CHANNEL}", f"port={tmp}/port"),
        ('[ -c "$port" ]', '[ -f "$port" ]'),
        ("for c in /dev/console /dev/ttyS0; do", f"for c in {tmp}/console; do"),
        ('[ -c "$c" ]', '[ -f "$c" ]'),
        ('modprobe virtiofs 2>/dev/null\n', ""),
        ('mount -t virtiofs "$tag" "$root"', mount_line),
    ):
        assert old in script, old
        script = script.replace(old, new)
    return script


def _run_guest(tmp: Path, script: str, args: list[str], after: str) -> subprocess.CompletedProcess[str]:
    (tmp / "port").write_text("")
    (tmp / "console").write_text("")
    inner = f'sh -c "$0" podvisor-volumes "$@"; {after}'
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", inner, script,
                           *args], capture_output=True, text=True, timeout=60, check=False)


def test_the_guest_script_binds_each_entry_read_only_where_asked(tmp_path: Path) -> None:
    share = tmp_path / "share"
    (share / "0").mkdir(parents=True)
    (share / "0" / "a.txt").write_text("hello\n")
    (share / "1").write_text("file\n")
    (share / "1").chmod(0o640)
    guest = tmp_path / "guest"
    entries = (Share(Mount(f"{guest}/etc/config", "/h/0", readonly=True), "0", True),
               Share(Mount(f"{guest}/dev/termination-log", "/h/1"), "1", False))
    args = volumes_bootcmd_args(entries)
    args[0] = str(share)  # the tag: what the stand-in bind mount mounts
    args[1] = str(tmp_path / "root")
    done = _run_guest(tmp_path, _guest_script(tmp_path, 'mount --bind "$tag" "$root"'), args,
                      f"cat {guest}/etc/config/a.txt; stat -c %a {guest}/dev/termination-log; "
                      f"echo x > {guest}/etc/config/new || echo refused; echo written > {guest}/dev/termination-log")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["hello", "640", "refused"]
    assert (tmp_path / "port").read_text() == "ok\n"
    assert (tmp_path / "console").read_text() == ""
    assert (share / "1").read_text() == "written\n"
    assert not (share / "0" / "new").exists()


def test_the_guest_script_reports_a_guest_without_virtiofs_and_still_succeeds(tmp_path: Path) -> None:
    args = volumes_bootcmd_args((Share(Mount("/etc/config", "/h"), "0", True),))
    args[1] = str(tmp_path / "root")
    done = _run_guest(tmp_path, _guest_script(tmp_path, "false"), args, "true")
    assert done.returncode == 0, done.stderr
    assert "podvisor: cannot mount the pod volumes" in (tmp_path / "console").read_text()
    assert (tmp_path / "port").read_text().startswith("error: cannot mount the pod volumes")
