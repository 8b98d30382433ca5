"""Hostile sizes and documents, and the pod's cgroup, against a real agent over
its socket with real libvirt (issue #10, items 5, 8 and 9).

The cgroup test makes its own pod cgroup, ``/podvisor-test-<random>/pod<uid>``
in every cgroup hierarchy of this host (as kubelet's cgroupfs driver would),
runs the tiny VM in a sandbox whose ``cgroup_parent`` names it, and reads the
QEMU process's ``/proc/<pid>/cgroup``. Everything it made is removed at the
end, the cgroups after the VM is gone.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agent.adapters.cgroups import Hierarchy, hierarchies
from agent.api.gen.runtime.v1 import api_pb2 as pb
from tests.e2e.conftest import VM_MEMORY, VMAgent, domains_under

QEMU_RUN = Path("/run/libvirt/qemu")
NO_MEMORY_LIMIT = pb.LinuxContainerResources(cpu_quota=100_000, cpu_period=100_000)


def _sandbox(vm_agent: VMAgent, name: str, cgroup_parent: str = "",
             annotations: dict[str, str] | None = None) -> tuple[str, pb.PodSandboxConfig]:
    cfg = vm_agent.sandbox_config(name, pod_annotations=annotations or {},
                                  linux=pb.LinuxPodSandboxConfig(cgroup_parent=cgroup_parent))
    sid = vm_agent.agent.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=60).pod_sandbox_id
    return sid, cfg


def _container(sid: str, sb_cfg: pb.PodSandboxConfig, image: str, *, name: str = "vm",
               annotations: dict[str, str] | None = None,
               resources: pb.LinuxContainerResources | None = None) -> pb.CreateContainerRequest:
    cfg = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=name), image=pb.ImageSpec(image=image), log_path="vm/0.log",
        annotations=annotations or {},
        linux=pb.LinuxContainerConfig(resources=resources or pb.LinuxContainerResources(
            memory_limit_in_bytes=VM_MEMORY)))
    return pb.CreateContainerRequest(pod_sandbox_id=sid, config=cfg, sandbox_config=sb_cfg)


def _refused(call: object, request: object, field: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT,
             ) -> str:
    with pytest.raises(grpc.RpcError) as exc:
        call(request, timeout=120)  # type: ignore[operator]
    assert exc.value.code() == code, exc.value.details()
    assert field in exc.value.details()
    return str(exc.value.details())


def _nothing_left(vm_agent: VMAgent, sid: str) -> None:
    runtime = vm_agent.agent.runtime
    assert list(runtime.ListContainers(pb.ListContainersRequest(), timeout=30).containers) == []
    containers = vm_agent.agent.state_dir / "sandboxes" / sid / "containers"
    assert not containers.exists() or list(containers.iterdir()) == []
    assert domains_under(vm_agent.agent.state_dir) == []


def test_hostile_documents_names_and_sizes_are_invalid_arguments(vm_agent: VMAgent) -> None:
    runtime, image = vm_agent.agent.runtime, vm_agent.image
    vm_agent.agent.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=300)
    sid, sb_cfg = _sandbox(vm_agent, "hostile")
    ann = "config.annotations"
    cases = [
        ({"annotations": {"podvisor.io/vm": "[" * 100000}}, f"{ann}['podvisor.io/vm']"),
        ({"annotations": {"podvisor.io/network-config": "{" * 3000}}, f"{ann}['podvisor.io/network-config']"),
        ({"annotations": {"podvisor.io/user-data": "#cloud-config\n" + "[" * 3000}},
         f"{ann}['podvisor.io/user-data']"),
        ({"name": "vm\u0001"}, "config.metadata.name"),
        # No CRI memory limit here: it would win over the annotations.
        ({"annotations": {"podvisor.io/memory": "999999Ti"}, "resources": NO_MEMORY_LIMIT},
         f"{ann}['podvisor.io/memory']"),
        ({"annotations": {"podvisor.io/vm": '{"domain": {"memory": {"guest": "8Ei"}}}'},
          "resources": NO_MEMORY_LIMIT}, f"{ann}['podvisor.io/vm'].domain.memory.guest"),
        ({"resources": pb.LinuxContainerResources(memory_limit_in_bytes=2**63 - 1)},
         "config.linux.resources.memory_limit_in_bytes"),
        ({"resources": pb.LinuxContainerResources(cpu_quota=100_000, cpu_period=-100_000)},
         "config.linux.resources.cpu_period"),
    ]
    for kwargs, field in cases:
        _refused(runtime.CreateContainer, _container(sid, sb_cfg, image, **kwargs), field)  # type: ignore[arg-type]
    _nothing_left(vm_agent, sid)
    # The same documents as pod annotations: RunPodSandbox refuses them and makes nothing.
    with pytest.raises(grpc.RpcError) as exc:
        _sandbox(vm_agent, "hostile-pod", annotations={"podvisor.io/vm": "[" * 100000})
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "config.annotations['podvisor.io/vm']" in str(exc.value.details())
    assert [s.id for s in runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items] == [sid]
    # The agent is still serving.
    assert runtime.Version(pb.VersionRequest(), timeout=10).runtime_name == "podvisor"


def test_update_container_resources_checks_as_create_does(vm_agent: VMAgent) -> None:
    runtime, image = vm_agent.agent.runtime, vm_agent.image
    vm_agent.agent.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=300)
    sid, sb_cfg = _sandbox(vm_agent, "resize")
    cid = runtime.CreateContainer(_container(sid, sb_cfg, image), timeout=120).container_id
    for res, field in [
        (pb.LinuxContainerResources(cpu_quota=200_000, cpu_period=-100_000), "linux.cpu_period"),
        (pb.LinuxContainerResources(cpu_quota=-7), "linux.cpu_quota"),
        (pb.LinuxContainerResources(cpu_shares=-1), "linux.cpu_shares"),
        (pb.LinuxContainerResources(cpu_shares=10**6), "linux.cpu_shares"),
        (pb.LinuxContainerResources(memory_limit_in_bytes=-1), "linux.memory_limit_in_bytes"),
    ]:
        _refused(runtime.UpdateContainerResources,
                 pb.UpdateContainerResourcesRequest(container_id=cid, linux=res), field)
    status = runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=cid), timeout=30).status
    assert status.resources.linux.cpu_quota == 100_000  # still 1 vCPU
    assert status.resources.linux.memory_limit_in_bytes == VM_MEMORY


# -- the pod's cgroup ----------------------------------------------------------------------------------


def _directories(path: str) -> list[tuple[Hierarchy, Path]]:
    """The directory of cgroup ``path`` in every hierarchy mounted here."""
    out = []
    for h in hierarchies():
        d = h.directory(path)
        if d is not None:
            out.append((h, d))
    return out


def _make(path: str) -> None:
    """mkdir -p ``path`` in every hierarchy; cpuset cgroups get their parent's CPUs and memory nodes."""
    for _h, d in _directories(path):
        todo = [d] + [p for p in d.parents if not p.exists()]
        for p in reversed(todo):
            p.mkdir(exist_ok=True)
            if (p / "cpuset.cpus").exists() and not (p / "cpuset.cpus").read_text().strip():
                for knob in ("cpuset.cpus", "cpuset.mems"):
                    (p / knob).write_text((p.parent / knob).read_text())


def _remove(top: str) -> None:
    """rmdir ``top`` and everything below it in every hierarchy, deepest first (processes gone)."""
    for _h, d in _directories(top):
        if not d.exists():
            continue
        for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            for _ in range(50):
                try:
                    sub.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
        d.rmdir()


@pytest.fixture
def pod_cgroup() -> Iterator[str]:
    top = f"/podvisor-test-{uuid.uuid4().hex[:12]}"
    path = f"{top}/pod{uuid.uuid4()}"
    _make(path)
    try:
        yield path
    finally:
        _remove(top)


def test_the_vm_runs_in_the_pods_cgroup(vm_agent: VMAgent, pod_cgroup: str) -> None:
    runtime, image = vm_agent.agent.runtime, vm_agent.image
    vm_agent.agent.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=300)
    sid, sb_cfg = _sandbox(vm_agent, "cgrouped", cgroup_parent=pod_cgroup)
    cid = runtime.CreateContainer(_container(sid, sb_cfg, image), timeout=120).container_id
    runtime.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=120)
    pid = (QEMU_RUN / f"podvisor-{cid}.pid").read_text().strip()
    # The kernel's view from the process: v2 ("0::") and the accounting controllers of v1.
    lines = [line.split(":", 2) for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()]
    accounted = [(ctl, path) for _id, ctl, path in lines
                 if ctl == "" or {"memory", "cpu", "cpuacct", "pids"} & set(ctl.split(","))]
    assert accounted, lines
    for ctl, path in accounted:
        assert path == f"{pod_cgroup}/{cid}", (ctl, path, lines)
    # …and from every hierarchy's side (libvirt's v1 devices cgroup keeps QEMU).
    for h, d in _directories(pod_cgroup):
        if h.version == 1 and "devices" in h.controllers:
            continue
        assert pid in (d / cid / "cgroup.procs").read_text().split(), (h, d)
    # Removal takes the VM's own cgroup away and leaves the pod's to kubelet.
    runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    for _h, d in _directories(pod_cgroup):
        assert d.is_dir() and not (d / cid).exists()


def test_a_missing_pod_cgroup_is_a_failed_precondition(vm_agent: VMAgent) -> None:
    runtime, image = vm_agent.agent.runtime, vm_agent.image
    vm_agent.agent.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=300)
    missing = f"/podvisor-test-{uuid.uuid4().hex[:12]}/pod{uuid.uuid4()}"
    sid, sb_cfg = _sandbox(vm_agent, "no-cgroup", cgroup_parent=missing)
    details = _refused(runtime.CreateContainer, _container(sid, sb_cfg, image), missing,
                       grpc.StatusCode.FAILED_PRECONDITION)
    assert "does not exist" in details
    _nothing_left(vm_agent, sid)
