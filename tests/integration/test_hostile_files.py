"""Hostile file names and file privacy through the real agent and real
libvirt (issue #10, items 6, 7 and 11).

* Log directories and paths with NUL or control characters are refused at
  the API, naming the field, before anything is made (item 6).
* A symlink planted at a container's log path is never followed: StartContainer
  fails with FAILED_PRECONDITION naming the path, the link's target is
  untouched and the VM does not start (item 6).
* CreateContainer racing RemovePodSandbox: every round ends in one of the two
  legal outcomes and leaves no container, domain or file (item 7).
* No disk, seed or image file under the state directory is readable by other
  local users, after a pull, after CreateContainer and with the VM running
  (item 11) — and the VM still boots.

The VM tests use the tiny guest (tests/e2e/conftest.py's fixtures).
"""

from __future__ import annotations

import grp
import os
import random
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.api.gen.runtime.v1 import api_pb2 as pb
from tests.e2e.conftest import (  # noqa: F401
    VMAgent,
    domains_under,
    tiny_disk,
    tiny_image,
    virsh,
    vm_agent,
)
from tests.integration.agentproc import AgentProcess

BAD_DIRECTORIES = ["/var/log/pods/a\x00b", "/var/log/pods/a\x01b", "/var/log/pods/a\nb", "/var/log/pods/\x1b[2J"]
BAD_LOG_PATHS = ["0\x00.log", "vm/0\x01.log", "vm\n/0.log", "vm/0.log\x7f"]


def _code(fn: Any, request: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        fn(request, timeout=30)
    return err.value


def _sandbox_config(name: str, log_directory: str) -> pb.PodSandboxConfig:
    return pb.PodSandboxConfig(metadata=pb.PodSandboxMetadata(name=name, namespace="it", uid=f"uid-{name}"),
                               hostname=name, log_directory=log_directory)


def test_log_directory_and_log_path_with_nul_or_control_characters_are_refused(
        running_agent: AgentProcess, tmp_path: Path) -> None:
    agent = running_agent
    for i, bad in enumerate(BAD_DIRECTORIES):
        err = _code(agent.runtime.RunPodSandbox, pb.RunPodSandboxRequest(config=_sandbox_config(f"bad{i}", bad)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (bad, err.details())
        assert "config.log_directory" in (err.details() or "")
    assert agent.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items == []
    assert list((agent.state_dir / "sandboxes").iterdir()) == []

    logs = tmp_path / "pods" / "ok"
    sid = agent.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=_sandbox_config("ok", str(logs))),
                                      timeout=30).pod_sandbox_id
    for bad in BAD_LOG_PATHS:
        cfg = pb.ContainerConfig(metadata=pb.ContainerMetadata(name="vm"),
                                 image=pb.ImageSpec(image="registry.invalid/none:1"), log_path=bad)
        err = _code(agent.runtime.CreateContainer, pb.CreateContainerRequest(pod_sandbox_id=sid, config=cfg))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (bad, err.details())
        assert "config.log_path" in (err.details() or "")
    assert agent.runtime.ListContainers(pb.ListContainersRequest(), timeout=30).containers == []
    assert not (agent.state_dir / "sandboxes" / sid / "containers").exists()
    assert list(logs.iterdir()) == []
    # The agent is still serving, and never said INTERNAL.
    agent.runtime.Version(pb.VersionRequest(), timeout=10)
    assert '"INTERNAL"' not in agent.log()


def test_a_symlink_at_the_log_path_is_not_followed(vm_agent: VMAgent, tmp_path: Path) -> None:  # noqa: F811
    vm = vm_agent.create("linked")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    vm.log_path.parent.mkdir(parents=True, exist_ok=True)
    vm.log_path.unlink(missing_ok=True)
    vm.log_path.symlink_to(victim)
    err = _code(vm_agent.agent.runtime.StartContainer, pb.StartContainerRequest(container_id=vm.container_id))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
    assert str(vm.log_path) in (err.details() or "")
    assert victim.read_bytes() == b"precious\n"
    assert vm.log_path.is_symlink()
    assert vm_agent.status(vm).status.state == pb.CONTAINER_CREATED
    vm_agent.remove_pod(vm)
    assert victim.read_bytes() == b"precious\n"
    assert domains_under(vm_agent.agent.state_dir) == []


def _race_round(agent: AgentProcess, sid: str, sb_cfg: pb.PodSandboxConfig, cfg: pb.ContainerConfig,
                delay_remove: bool) -> str:
    """CreateContainer and RemovePodSandbox at once; the create's outcome."""
    barrier = threading.Barrier(2)

    def create() -> str:
        barrier.wait()
        if not delay_remove:
            time.sleep(random.uniform(0, 0.02))
        try:
            agent.runtime.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=sid, config=cfg,
                                                                    sandbox_config=sb_cfg), timeout=120)
            return "created"
        except grpc.RpcError as exc:
            assert exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION), exc.details()
            return str(exc.code().name)

    def remove() -> None:
        barrier.wait()
        if delay_remove:
            time.sleep(random.uniform(0, 0.05))
        agent.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)

    with ThreadPoolExecutor(2) as pool:
        created = pool.submit(create)
        pool.submit(remove).result()
        return created.result()


def test_create_container_racing_remove_pod_sandbox(vm_agent: VMAgent) -> None:  # noqa: F811
    agent = vm_agent.agent
    agent.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=vm_agent.image)), timeout=300)
    outcomes: list[str] = []
    for i in range(20):
        sb_cfg = vm_agent.sandbox_config(f"race{i}")
        sid = agent.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=sb_cfg), timeout=60).pod_sandbox_id
        cfg = pb.ContainerConfig(metadata=pb.ContainerMetadata(name="vm"), image=pb.ImageSpec(image=vm_agent.image),
                                 log_path="vm/0.log")
        outcomes.append(_race_round(agent, sid, sb_cfg, cfg, delay_remove=i % 2 == 0))
        # Legal: created before the removal took the sandbox, then removed
        # with it; or refused with nothing created. Either way nothing is left.
        assert agent.runtime.ListContainers(pb.ListContainersRequest(), timeout=30).containers == [], outcomes
        assert [s.id for s in agent.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items] == []
        assert not (agent.state_dir / "sandboxes" / sid).exists(), f"round {i} ({outcomes[-1]}) left files"
        assert domains_under(agent.state_dir) == [], f"round {i} ({outcomes[-1]}) left a domain"
    # After a restart nothing comes back either (no record was orphaned).
    agent.stop()
    agent.start()
    assert agent.runtime.ListContainers(pb.ListContainersRequest(), timeout=30).containers == []
    assert domains_under(agent.state_dir) == []
    print("outcomes:", {o: outcomes.count(o) for o in set(outcomes)})


def _exposed(root: Path) -> list[str]:
    """Regular files under ``root`` that other local users could read."""
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode) and st.st_mode & stat.S_IROTH:
                found.append(f"{os.path.join(dirpath, name)} {stat.filemode(st.st_mode)}")
    return found


def test_guest_disks_and_images_are_private_and_the_vm_still_boots(vm_agent: VMAgent) -> None:  # noqa: F811
    agent = vm_agent.agent
    agent.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=vm_agent.image)), timeout=300)
    assert _exposed(agent.state_dir) == []
    disks = [p for p in (agent.state_dir / "images" / "disks").rglob("*") if p.is_file()]
    assert disks
    kvm = grp.getgrnam("kvm").gr_gid
    for disk in disks:
        st = disk.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, kvm), disk
        parent = disk.parent.stat()
        assert (stat.S_IMODE(parent.st_mode), parent.st_gid) == (0o750, kvm), disk.parent

    vm = vm_agent.create("private", pull=False)
    assert _exposed(agent.state_dir) == []
    vm_dir = agent.state_dir / "sandboxes" / vm.sandbox_id / "containers" / vm.container_id
    for name in ("disk.qcow2", "cloudinit.iso"):
        st = (vm_dir / name).stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, 0), name

    vm_agent.start(vm)
    vm_agent.wait_log(vm, "PODVISOR-READY")
    # libvirt relabelled the disks for QEMU; still nobody else's.
    assert _exposed(agent.state_dir) == []
    vm_agent.remove_pod(vm)
