"""Pod volumes in the stock Debian 12 guest (images/debian), under TCG.

ONE VM pod for the module, on a private pod network, created with kubelet-
style CRI mounts of real host paths: a ConfigMap-like directory (``..data``
symlink, read-only, reached through a host path that is itself a symlink),
an emptyDir (read-write), a file with its own mode, and the termination-log
file. The guest mounts them by itself at boot (cloud-init bootcmd over
virtiofs); the tests act in the guest with ExecSync (the QEMU guest agent).

Order matters: the VM is stopped by the termination-message test and its pod
removed by the clean-up test; the kill -9 tests come last and boot nothing
(they cut CreateContainer and StartContainer before the domain runs).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agent.api.gen.runtime.v1 import api_pb2 as pb
from tests.e2e.conftest import VM, DebianVM, DebianVMSpec

# A loaded machine needs more than the default 600 s for the module VM's boot (fixture set-up counts).
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]

CONFIG_PATH = "/etc/podvisor-config"
SCRAPS_PATH = "/var/lib/scraps"
MODE_FILE_PATH = "/etc/podvisor-secret.txt"
TERMLOG_PATH = "/dev/termination-log"
# The bound for a host update to reach the guest (kubelet's ..data swap).
LIVE_UPDATE_S = 10


class Host:
    """The module's host paths (what kubelet would have made under /var/lib/kubelet/pods)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = root / "configmap"
        self.config_link = root / "configmap-link"
        self.scraps = root / "emptydir"
        self.mode_file = root / "secret.txt"
        self.termlog = root / "termination-log"

    def build(self) -> None:
        version = self.config / "..2026_12_02_00_00_00.1"
        version.mkdir(parents=True)
        (version / "greeting").write_text("hello from the host\n")
        (self.config / "..data").symlink_to(version.name)
        (self.config / "greeting").symlink_to("..data/greeting")
        self.config_link.symlink_to(self.config)
        self.scraps.mkdir()
        self.mode_file.write_text("s3cret\n")
        self.mode_file.chmod(0o640)
        self.termlog.write_text("")

    def swap_config(self, text: str) -> None:
        """kubelet's atomic writer: a new version directory, then ..data renamed over."""
        version = self.config / f"..2026_12_02_00_00_{int(time.time() * 1000) % 100000}"
        version.mkdir()
        (version / "greeting").write_text(text)
        tmp = self.config / "..data_tmp"
        tmp.symlink_to(version.name)
        os.replace(tmp, self.config / "..data")

    def mounts(self) -> list[pb.Mount]:
        return [
            pb.Mount(container_path=CONFIG_PATH, host_path=str(self.config_link), readonly=True),
            pb.Mount(container_path=SCRAPS_PATH, host_path=str(self.scraps)),
            pb.Mount(container_path=MODE_FILE_PATH, host_path=str(self.mode_file), readonly=True),
            pb.Mount(container_path=TERMLOG_PATH, host_path=str(self.termlog)),
        ]


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    root = Path(tempfile.mkdtemp(prefix="pv-e2e-vol-", dir="/var/tmp"))
    h = Host(root)
    h.build()
    try:
        yield h
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def debian_vm_spec(host: Host) -> DebianVMSpec:
    return DebianVMSpec(hostname="volumes-vm", mounts=host.mounts())


def _exec(vm: DebianVM, script: str, timeout: int = 120) -> pb.ExecSyncResponse:
    return vm.vma.agent.runtime.ExecSync(
        pb.ExecSyncRequest(container_id=vm.vm.container_id, cmd=["sh", "-c", script], timeout=timeout),
        timeout=timeout + 60)


def _ok(vm: DebianVM, script: str) -> str:
    r = _exec(vm, script)
    assert r.exit_code == 0, (script, r.exit_code, r.stdout, r.stderr)
    return str(r.stdout.decode())


def _info(vm: DebianVM) -> dict[str, str]:
    return json.loads(vm.vma.status(vm.vm, verbose=True).info["info"])  # type: ignore[no-any-return]


def _virtiofsd_serving(directory: str) -> list[int]:
    """virtiofsd processes whose share lives in ``directory`` (the container's)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            args = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"virtiofsd") and f"source={directory}/volumes".encode() in args:
            found.append(int(entry.name))
    return found


def test_the_guest_reads_a_configmap_through_a_symlinked_host_path(debian_vm: DebianVM) -> None:
    out = _ok(debian_vm, f"mountpoint -q {CONFIG_PATH} && cat {CONFIG_PATH}/greeting && ls -a {CONFIG_PATH}")
    assert out.startswith("hello from the host\n")
    assert "..data" in out.split()


def test_status_reports_the_mounts(debian_vm: DebianVM, host: Host) -> None:
    status = debian_vm.vma.status(debian_vm.vm).status
    assert [(m.container_path, m.host_path, m.readonly) for m in status.mounts] == [
        (m.container_path, m.host_path, m.readonly) for m in host.mounts()]
    assert (status.reason, status.message) == ("", "")
    assert _virtiofsd_serving(_info(debian_vm)["directory"])


def test_a_read_only_mount_refuses_writes_in_the_guest_and_on_the_host(debian_vm: DebianVM, host: Host) -> None:
    r = _exec(debian_vm, f"echo x > {CONFIG_PATH}/new")
    assert r.exit_code != 0 and b"Read-only file system" in r.stderr
    # Even a guest that remounts it read-write cannot write: the host's mount is read-only.
    r = _exec(debian_vm, f"mount -o remount,bind,rw {CONFIG_PATH}; echo x > {CONFIG_PATH}/new")
    assert r.exit_code != 0 and b"Read-only file system" in r.stderr, (r.stdout, r.stderr)
    assert not (host.config / "new").exists()


def test_a_file_keeps_its_host_mode_and_content(debian_vm: DebianVM) -> None:
    assert _ok(debian_vm, f"stat -c %a {MODE_FILE_PATH}; cat {MODE_FILE_PATH}") == "640\ns3cret\n"


def test_a_configmap_update_on_the_host_reaches_the_guest(debian_vm: DebianVM, host: Host) -> None:
    host.swap_config("updated on the host\n")
    deadline = time.monotonic() + LIVE_UPDATE_S
    seen = ""
    while time.monotonic() < deadline:
        seen = _ok(debian_vm, f"cat {CONFIG_PATH}/greeting")
        if seen == "updated on the host\n":
            break
        time.sleep(0.5)
    assert seen == "updated on the host\n", f"the guest still reads {seen!r} {LIVE_UPDATE_S} s after the swap"


def test_a_file_the_guest_writes_to_an_emptydir_is_on_the_host(debian_vm: DebianVM, host: Host) -> None:
    _ok(debian_vm, f"mkdir -p {SCRAPS_PATH}/sub && echo from-the-guest > {SCRAPS_PATH}/sub/note")
    assert (host.scraps / "sub" / "note").read_text() == "from-the-guest\n"
    (host.scraps / "from-host").write_text("back\n")
    assert _ok(debian_vm, f"cat {SCRAPS_PATH}/from-host") == "back\n"


def test_the_termination_message_reaches_container_status(debian_vm: DebianVM) -> None:
    _ok(debian_vm, f"printf 'the VM says goodbye' > {TERMLOG_PATH}")
    vma, vm = debian_vm.vma, debian_vm.vm
    vma.agent.runtime.StopContainer(pb.StopContainerRequest(container_id=vm.container_id, timeout=0), timeout=120)
    status = vma.wait_state(vm, pb.CONTAINER_EXITED)
    assert status.message == "the VM says goodbye"
    assert any(m.container_path == TERMLOG_PATH for m in status.mounts)
    # The VM is gone, and so is its virtiofsd.
    assert _virtiofsd_serving(_info(debian_vm)["directory"]) == []


def test_remove_pod_sandbox_leaves_no_virtiofsd_socket_or_file(debian_vm: DebianVM, host: Host) -> None:
    info = _info(debian_vm)
    directory, socket = info["directory"], _socket_of(info)
    debian_vm.vma.remove_pod(debian_vm.vm)
    assert _virtiofsd_serving(directory) == []
    assert not Path(socket).exists()
    assert not Path(directory).exists()
    _nothing_left(debian_vm)
    # The host's files are the volumes' own: untouched.
    assert (host.config / "greeting").read_text() == "updated on the host\n"
    assert host.termlog.read_text() == "the VM says goodbye"


def _socket_of(info: dict[str, str]) -> str:
    # The serial socket's neighbour in the agent's runtime directory.
    return info["serialSocket"].removesuffix(".serial") + ".fs"


# --- kill -9 of the agent in the middle (no VM boots) --------------------------------------------


def _restart(vm: DebianVM, crash_at: str | None) -> None:
    agent = vm.vma.agent
    agent.kill9()
    agent.env = {"PODVISOR_CRASH_AT": crash_at} if crash_at else None
    agent.start()


def _create(vm: DebianVM, host: Host, name: str) -> VM:
    return vm.vma.create(name, hostname=name, pull=False, mounts=host.mounts())


def _virtiofsd_under(state_dir: Path) -> list[int]:
    """Any virtiofsd serving a share of this agent's containers."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            args = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"virtiofsd") and any(
                a.startswith(f"source={state_dir}/".encode()) for a in args):
            found.append(int(entry.name))
    return found


def _nothing_left(vm: DebianVM) -> None:
    agent = vm.vma.agent
    assert _virtiofsd_under(agent.state_dir) == []
    assert list(Path(agent.socket_dir).glob("**/*.fs")) == []
    assert list(Path(agent.state_dir).glob("sandboxes/*/containers/*")) == []


def test_kill9_mid_start_leaves_nothing_after_remove(debian_vm: DebianVM, host: Host) -> None:
    # The cut: virtiofsd runs, the domain has not started, RUNNING is not recorded.
    _restart(debian_vm, "container.start.virtiofsd")
    try:
        vm = _create(debian_vm, host, "crash-start")
        info = json.loads(debian_vm.vma.status(vm, verbose=True).info["info"])
        with pytest.raises(grpc.RpcError):
            debian_vm.vma.start(vm)
        debian_vm.vma.agent.wait(30)  # the agent killed itself at the point
        assert _virtiofsd_serving(info["directory"]), "the cut came after virtiofsd started"
    finally:
        _restart(debian_vm, None)
    # Recovery ended the interrupted start's virtiofsd; the container is still CREATED.
    assert _virtiofsd_serving(info["directory"]) == []
    assert not Path(_socket_of(info)).exists()
    assert debian_vm.vma.status(vm).status.state == pb.CONTAINER_CREATED
    debian_vm.vma.remove_pod(vm)
    _nothing_left(debian_vm)


def test_kill9_mid_create_leaves_nothing(debian_vm: DebianVM, host: Host) -> None:
    _restart(debian_vm, "container.create.seed")
    try:
        with pytest.raises(grpc.RpcError):
            _create(debian_vm, host, "crash-create")
        debian_vm.vma.agent.wait(30)
    finally:
        _restart(debian_vm, None)
    runtime = debian_vm.vma.agent.runtime
    assert runtime.ListContainers(pb.ListContainersRequest(), timeout=30).containers == []
    for sb in runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items:
        debian_vm.vma.remove_pod(VM(sb.id, "", Path()))
    _nothing_left(debian_vm)
