"""A full state filesystem (a small tmpfs mounted by the test as the agent's
state directory): a pull that does not fit and a create whose overlay cannot
be written fail with RESOURCE_EXHAUSTED naming the filesystem, are rolled
back, leave the SQLite database intact, and the agent keeps serving and works
again once there is space.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.adapters.registry import RegistryClient
from agent.api.gen.runtime.v1 import api_pb2 as pb
from agent.cli import oci_layout
from agent.domain.imageref import RemoteRepository
from tests.e2e.conftest import VM_MEMORY, domains_under, purge_domains, tiny_disk, tiny_image  # noqa: F401
from tests.integration.agentproc import AgentProcess
from tests.integration.registry_fixture import RunningRegistry

TMPFS_MIB = 64
# Incompressible: the layer blob and the extracted disk together need twice this.
BIG_DISK_MIB = 48


@pytest.fixture
def full_fs_agent(agent_factory: Any) -> Iterator[AgentProcess]:
    """An agent whose state directory is a 64 MiB tmpfs (QEMU can traverse it)."""
    root = Path(tempfile.mkdtemp(prefix="pv-fullfs-", dir="/var/tmp"))
    root.chmod(0o711)
    mount = root / "state"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MIB}m,mode=0711", "pvfullfs", str(mount)],
                   check=True)
    # No free-space reserve: this tests ENOSPC itself (the reserve has tests
    # of its own in test_image_limits.py and would refuse first here).
    agent: AgentProcess = agent_factory(state_dir=mount, extra_config="[images]\nmin_free_bytes = 0\n")
    agent.config_path.write_text(agent.config_path.read_text().replace(
        "[libvirt]\n", '[libvirt]\nvirt_type = "qemu"\n'))
    try:
        yield agent.start()
    finally:
        try:
            for sb in agent.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items:
                agent.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sb.id), timeout=120)
        except Exception:  # noqa: BLE001 - virsh cleans below
            pass
        agent.stop()
        purge_domains(mount)
        subprocess.run(["umount", str(mount)], check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def big_image(registry: RunningRegistry, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A containerDisk whose raw disk is 48 MiB of random bytes (layer uncompressed)."""
    work = tmp_path_factory.mktemp("big-image")
    disk = work / "big.raw"
    with open(disk, "wb") as f:
        for _ in range(BIG_DISK_MIB):
            f.write(os.urandom(1 << 20))
    built = oci_layout.build(disk, work / "layout", "1", compress=False)
    repo = RemoteRepository(registry=registry.host, host=registry.host, name="podvisor/fullfs-big")
    with RegistryClient(timeout=120) as client:
        oci_layout.push(client, work / "layout", built, repo, "1")
    return f"{registry.host}/podvisor/fullfs-big:1"


def integrity(agent: AgentProcess) -> str:
    db = sqlite3.connect(f"file:{agent.state_dir / 'podvisor.db'}?mode=ro", uri=True)
    try:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        db.close()


def still_serving(agent: AgentProcess) -> list[str]:
    agent.runtime.Version(pb.VersionRequest(), timeout=10)
    return [t for i in agent.images.ListImages(pb.ListImagesRequest(), timeout=30).images for t in i.repo_tags]


def pull(agent: AgentProcess, image: str) -> None:
    agent.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=300)


def big_files(path: Path, over: int = 1 << 20) -> list[str]:
    return [str(p) for p in path.rglob("*") if p.is_file() and p.stat().st_size > over]


def test_pull_larger_than_the_filesystem(full_fs_agent: AgentProcess, big_image: str,
                                         tiny_image: str) -> None:  # noqa: F811
    agent = full_fs_agent
    with pytest.raises(grpc.RpcError) as err:
        pull(agent, big_image)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    assert "no space left on the filesystem of" in (err.value.details() or "")
    assert "RESOURCE_EXHAUSTED" in agent.log() and "Traceback" not in agent.log()
    images = agent.state_dir / "images"
    # Nothing of the failed pull takes space: no layer blob, partial file, scratch or disk.
    assert big_files(agent.state_dir) == []
    assert list((images / "tmp").iterdir()) == [] and list((images / "disks").iterdir()) == []
    assert integrity(agent) == "ok"
    assert still_serving(agent) == []
    # The space the failed pull used is free again: an image that fits is pulled.
    pull(agent, tiny_image)
    assert still_serving(agent) == [tiny_image]
    assert integrity(agent) == "ok"


def test_create_when_the_overlay_cannot_be_written(full_fs_agent: AgentProcess,
                                                   tiny_image: str, tmp_path: Path) -> None:  # noqa: F811
    agent = full_fs_agent
    pull(agent, tiny_image)
    cfg = pb.PodSandboxConfig(metadata=pb.PodSandboxMetadata(name="full", namespace="it", uid=uuid.uuid4().hex),
                              log_directory=str(tmp_path / "logs"))
    sid = agent.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=60).pod_sandbox_id
    request = pb.CreateContainerRequest(pod_sandbox_id=sid, sandbox_config=cfg, config=pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name="vm"), image=pb.ImageSpec(image=tiny_image), log_path="vm.log",
        linux=pb.LinuxContainerConfig(resources=pb.LinuxContainerResources(memory_limit_in_bytes=VM_MEMORY))))
    # Leave ~100 KiB: the database's next rows fit, a qcow2 overlay (~196 KiB) does not.
    st = os.statvfs(agent.state_dir)
    ballast = agent.state_dir / "ballast"
    subprocess.run(["fallocate", "-l", str(st.f_bavail * st.f_frsize - (100 << 10)), str(ballast)], check=True)
    with pytest.raises(grpc.RpcError) as err:
        agent.runtime.CreateContainer(request, timeout=120)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    assert "no space left on the filesystem of" in (err.value.details() or "")
    # Rolled back: no record, no domain, no container directory.
    assert agent.runtime.ListContainers(pb.ListContainersRequest(), timeout=30).containers == []
    assert domains_under(agent.state_dir) == []
    assert list((agent.state_dir / "sandboxes" / sid).glob("containers/*")) == []
    assert integrity(agent) == "ok"
    assert still_serving(agent) == [tiny_image]
    # Space freed: the same create works, and the VM starts.
    ballast.unlink()
    cid = agent.runtime.CreateContainer(request, timeout=120).container_id
    agent.runtime.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=120)
    status = agent.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=cid), timeout=30).status
    assert status.state == pb.CONTAINER_RUNNING
    assert integrity(agent) == "ok"
