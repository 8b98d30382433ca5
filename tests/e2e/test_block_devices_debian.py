"""CRI devices (raw block volumes) in the stock Debian 12 guest, end to end
through the CRI API under TCG (issue #11, docs/volumes.md "Block devices").

Two loop devices over files this module writes, with known bytes: one given
read-write through a symlink (as kubelet gives its volumeDevices map), one
read-only (permissions "r"). ONE VM boots with both; ExecSync (through the
guest's QEMU guest agent) reads them back under /dev/disk/by-id/virtio-<serial>
and at their container paths, writes through the read-write one (the host
file changes) and is refused on the read-only one (the host file does not).
The host's device nodes keep their owner and mode throughout: libvirt gives
QEMU a private copy. Before the VM, CreateContainer refuses a missing host
path and one that is not a block device, naming the field.

Every loop device is detached and every file removed at the end, even when a
test fails.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from agent.api.gen.runtime.v1 import api_pb2 as pb
from agent.domain.volumes import device_by_id
from tests.e2e.conftest import DEBIAN_MEMORY, VM, VMAgent, purge_domains
from tests.integration.agentproc import AgentProcess

pytestmark = pytest.mark.e2e

BOOT_TIMEOUT_S = 900
DEVICE_BYTES = 4 << 20
RW_PATH = "/dev/xvda"  # where kubelet would put a volumeDevices' devicePath
RO_PATH = "/srv/volumes/ro-disk"  # any absolute path works; the seed makes the parent
TOKEN = secrets.token_hex(6)
RW_HEAD = f"PODVISOR-RW-{TOKEN}".encode()
RO_HEAD = f"PODVISOR-RO-{TOKEN}".encode()
GUEST_WRITE = f"GUEST-WROTE-{TOKEN}".encode()


@dataclass
class Loop:
    file: Path
    device: str  # /dev/loopN

    def head(self, n: int, offset: int = 0) -> bytes:
        with open(self.file, "rb") as f:
            f.seek(offset)
            return f.read(n)


def _loop(file: Path, head: bytes) -> Loop:
    with open(file, "wb") as f:
        f.write(head)
        f.truncate(DEVICE_BYTES)
    out = subprocess.run(["losetup", "-f", "--show", str(file)], capture_output=True, text=True, timeout=30,
                         check=True)
    return Loop(file, out.stdout.strip())


@pytest.fixture(scope="module")
def loops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Loop]]:
    work = tmp_path_factory.mktemp("block-devices")
    made: dict[str, Loop] = {}
    try:
        made["rw"] = _loop(work / "rw.img", RW_HEAD)
        made["ro"] = _loop(work / "ro.img", RO_HEAD)
        yield made
    finally:
        for loop in made.values():
            subprocess.run(["losetup", "-d", loop.device], capture_output=True, timeout=30)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def agent(debian_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VMAgent]:
    """A TCG agent without pod networking (ExecSync needs none); everything it made goes at exit."""
    workdir = tmp_path_factory.mktemp("block-agent")
    state = Path(tempfile.mkdtemp(prefix="pv-e2e-blk-", dir="/var/tmp"))
    state.chmod(0o711)
    proc = AgentProcess(workdir, state_dir=state / "state")
    helper = VMAgent(proc, debian_image, workdir / "pods")
    try:
        proc.config_path.write_text(proc.config_path.read_text().replace(
            "[libvirt]\n", '[libvirt]\nvirt_type = "qemu"\n'))
        proc.start()
        proc.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=debian_image)), timeout=600)
        yield helper
    finally:
        try:
            for sb in helper.agent.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items:
                helper.remove_pod(VM(sb.id, "", Path()))
        except Exception:  # noqa: BLE001 - virsh cleans below
            pass
        purge_domains(proc.state_dir)
        proc.cleanup()
        shutil.rmtree(state, ignore_errors=True)


def _create(vma: VMAgent, name: str, devices: list[pb.Device]) -> VM:
    sb_cfg = vma.sandbox_config(name)
    sid = vma.agent.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=sb_cfg), timeout=60).pod_sandbox_id
    cfg = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name="vm"), image=pb.ImageSpec(image=vma.image), log_path="vm/0.log",
        devices=devices,
        linux=pb.LinuxContainerConfig(resources=pb.LinuxContainerResources(memory_limit_in_bytes=DEBIAN_MEMORY)))
    cid = vma.agent.runtime.CreateContainer(
        pb.CreateContainerRequest(pod_sandbox_id=sid, config=cfg, sandbox_config=sb_cfg), timeout=120).container_id
    return VM(sid, cid, vma.logs / name / "vm" / "0.log")


def _owner(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_uid, st.st_gid, st.st_mode


@dataclass
class Guest:
    vma: VMAgent
    vm: VM
    loops: dict[str, Loop]
    owners_before: dict[str, tuple[int, int, int]]

    def sh(self, script: str, timeout: int = 120) -> pb.ExecSyncResponse:
        return self.vma.agent.runtime.ExecSync(
            pb.ExecSyncRequest(container_id=self.vm.container_id, cmd=["sh", "-c", script], timeout=timeout),
            timeout=timeout + 60)


def test_create_refuses_a_missing_or_non_block_host_path(agent: VMAgent, tmp_path: Path) -> None:
    regular = tmp_path / "not-a-device"
    regular.write_bytes(b"x")
    cases = [
        (str(tmp_path / "missing"), grpc.StatusCode.NOT_FOUND, "does not exist"),
        (str(regular), grpc.StatusCode.INVALID_ARGUMENT, "a regular file"),
        (str(tmp_path), grpc.StatusCode.INVALID_ARGUMENT, "a directory"),
    ]
    for i, (host_path, code, words) in enumerate(cases):
        devices = [pb.Device(container_path="/dev/xvdz", host_path=host_path, permissions="rw")]
        with pytest.raises(grpc.RpcError) as exc:
            _create(agent, f"bad-device-{i}", devices)
        assert exc.value.code() == code, exc.value.details()
        assert "config.devices[0].host_path" in exc.value.details() and words in exc.value.details()
    # Nothing was left behind by the refused creates: no container in any sandbox.
    assert not agent.agent.runtime.ListContainers(pb.ListContainersRequest(), timeout=30).containers
    for sb in agent.agent.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items:
        agent.remove_pod(VM(sb.id, "", Path()))


@pytest.fixture(scope="module")
def guest(agent: VMAgent, loops: dict[str, Loop], tmp_path_factory: pytest.TempPathFactory) -> Guest:
    # kubelet hands a raw block volume as a symlink to the node's device.
    link = tmp_path_factory.mktemp("volume-devices") / "pv-rw"
    link.symlink_to(loops["rw"].device)
    owners = {name: _owner(loop.device) for name, loop in loops.items()}
    vm = _create(agent, "blockdev", [
        pb.Device(container_path=RW_PATH, host_path=str(link), permissions="rwm"),
        pb.Device(container_path=RO_PATH, host_path=loops["ro"].device, permissions="r"),
    ])
    agent.start(vm)
    agent.wait_log(vm, " finished at ", timeout=BOOT_TIMEOUT_S)
    return Guest(agent, vm, loops, owners)


def test_the_devices_are_found_by_id_and_at_their_container_paths(guest: Guest) -> None:
    for path, head in ((RW_PATH, RW_HEAD), (RO_PATH, RO_HEAD)):
        by_id = device_by_id(path)
        out = guest.sh(f"readlink {path}; head -c {len(head)} {by_id}; echo; head -c {len(head)} {path}")
        assert out.exit_code == 0, out.stderr
        assert out.stdout.decode().splitlines() == [by_id, head.decode(), head.decode()], out.stdout


def test_a_write_through_the_read_write_device_reaches_the_host(guest: Guest) -> None:
    out = guest.sh(f"printf %s {GUEST_WRITE.decode()} | dd of={RW_PATH} bs=512 seek=1 conv=notrunc,fsync "
                   "status=none")
    assert out.exit_code == 0, out.stderr
    assert guest.loops["rw"].head(len(GUEST_WRITE), offset=512) == GUEST_WRITE


def test_the_read_only_device_refuses_writes(guest: Guest) -> None:
    out = guest.sh(f"blockdev --getro {RO_PATH}")
    assert (out.exit_code, out.stdout.strip()) == (0, b"1"), out
    out = guest.sh(f"printf %s {GUEST_WRITE.decode()} | dd of={RO_PATH} bs=512 oflag=direct status=none")
    assert out.exit_code != 0 and out.stderr, out
    assert guest.loops["ro"].head(len(RO_HEAD)) == RO_HEAD
    assert guest.loops["ro"].head(len(GUEST_WRITE), offset=512) != GUEST_WRITE


def test_the_hosts_device_nodes_keep_their_owner_and_mode(guest: Guest) -> None:
    for name, loop in guest.loops.items():
        assert _owner(loop.device) == guest.owners_before[name], loop.device
    guest.vma.remove_pod(guest.vm)
    for name, loop in guest.loops.items():
        assert _owner(loop.device) == guest.owners_before[name], loop.device
