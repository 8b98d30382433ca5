"""kill -9 of the agent at every crash point of the mutating CRI calls
(agent/faults.py), then a restart: the call is either fully done or fully
not done, and once the test removes what it made nothing is left.

The points come from ``faults.POINTS``, so a newly registered point is
covered here without editing this file. Each case starts a real agent with
``PODVISOR_CRASH_AT=<point>``, makes what the call needs, runs the call (the
agent dies in it: the client sees UNAVAILABLE and the process SIGKILL),
restarts the agent without the setting and checks the outcome. The agents
use pod networking with the test's own CNI configuration (bridge, subnet,
IPAM directory) and boot the tiny guest under TCG.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent import faults
from agent.api.gen.runtime.v1 import api_pb2 as pb
from tests.e2e.conftest import VM_MEMORY, domains_under, purge_domains, tiny_disk, tiny_image  # noqa: F401
from tests.integration.agentproc import AgentProcess
from tests.integration.test_sandbox_network import (  # noqa: F401
    NOTHING,
    agent_with,
    leftovers,
    marks_for,
    network,
    remove_all_pod_networks,
)

# Files the agent keeps for its life whatever it runs (the database, its lock).
PERMANENT = ("podvisor.db", "podvisor.db-wal", "podvisor.db-shm", "agent.lock")


def files_left(state: Path) -> list[str]:
    """Files under the state directory beyond the agent's permanent ones."""
    return sorted(str(p.relative_to(state)) for p in state.rglob("*")
                  if not p.is_dir() and p.name not in PERMANENT)


@dataclass
class Case:
    """One crash case: an agent (armed at ``point``) with the test's network."""

    agent: AgentProcess
    image: str
    logs: Path
    point: str
    volume: Path  # a host directory every VM gets as a read-only mount (its virtiofsd is part of the state)
    made: list[tuple[str, str]] = field(default_factory=list)  # (sandbox id, ip) for leftovers()

    @property
    def rt(self) -> Any:
        return self.agent.runtime

    def sandbox_config(self, name: str) -> pb.PodSandboxConfig:
        return pb.PodSandboxConfig(metadata=pb.PodSandboxMetadata(name=name, namespace="crash", uid=uuid.uuid4().hex),
                                   hostname=name, log_directory=str(self.logs / name))

    def pull(self) -> None:
        self.agent.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=self.image)), timeout=300)

    def run_sandbox(self, cfg: pb.PodSandboxConfig) -> str:
        sid: str = self.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=120).pod_sandbox_id
        self.note(sid)
        return sid

    def note(self, sid: str) -> None:
        ip = self.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=30).status.network.ip
        self.made.append((sid, ip))

    def create_request(self, sid: str, cfg: pb.PodSandboxConfig) -> pb.CreateContainerRequest:
        return pb.CreateContainerRequest(pod_sandbox_id=sid, sandbox_config=cfg, config=pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name="vm"), image=pb.ImageSpec(image=self.image), log_path="vm/0.log",
            mounts=[pb.Mount(container_path="/etc/podvisor-crash", host_path=str(self.volume), readonly=True)],
            linux=pb.LinuxContainerConfig(resources=pb.LinuxContainerResources(memory_limit_in_bytes=VM_MEMORY))))

    def create(self, sid: str, cfg: pb.PodSandboxConfig) -> str:
        return str(self.rt.CreateContainer(self.create_request(sid, cfg), timeout=120).container_id)

    def vm_pod(self, name: str, *, start: bool = False) -> tuple[pb.PodSandboxConfig, str, str]:
        """Pull, run a sandbox, create its VM (and start it): (config, sandbox id, container id)."""
        self.pull()
        cfg = self.sandbox_config(name)
        sid = self.run_sandbox(cfg)
        cid = self.create(sid, cfg)
        if start:
            self.start(cid)
        return cfg, sid, cid

    def start(self, cid: str) -> None:
        self.rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=120)

    def containers(self) -> list[Any]:
        return list(self.rt.ListContainers(pb.ListContainersRequest(), timeout=30).containers)

    def sandboxes(self) -> list[Any]:
        return list(self.rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items)

    def container_state(self, cid: str) -> int:
        return int(self.rt.ContainerStatus(pb.ContainerStatusRequest(container_id=cid), timeout=30).status.state)

    def crashes(self, call: Any) -> None:
        """``call`` dies at the armed point: UNAVAILABLE, SIGKILL; then a restart without it."""
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
        assert self.agent.wait(30) == -signal.SIGKILL
        assert f"crashing at {self.point}" in self.agent.log()
        self.agent.stop()
        self.agent.env = None
        self.agent.start()

    def domain_state(self, cid: str) -> str:
        r = subprocess.run(["virsh", "-c", "qemu:///system", "domstate", f"podvisor-{cid}"],
                           capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else "missing"

    def remove_everything_and_check_nothing_left(self, ipam: Path) -> None:
        for sb in self.sandboxes():
            self.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sb.id), timeout=120)
        for img in self.agent.images.ListImages(pb.ListImagesRequest(), timeout=30).images:
            self.agent.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=img.id)), timeout=60)
        assert self.sandboxes() == [] and self.containers() == []
        self.agent.stop()
        # A restart collects what no record refers to; then nothing may be left.
        self.agent.start()
        assert self.sandboxes() == [] and self.containers() == []
        assert domains_under(self.agent.state_dir) == []
        assert leftovers(ipam, marks_for(self.agent, self.made)) == NOTHING
        assert files_left(self.agent.state_dir) == []
        assert virtiofsd_left(self.agent.state_dir) == []


def virtiofsd_left(state: Path) -> list[int]:
    """virtiofsd processes still serving a share of a container under ``state``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"virtiofsd") and any(a.startswith(f"source={state}/".encode()) for a in args):
            found.append(int(proc.name))
    return found


@pytest.fixture
def case_factory(agent_factory: Any, network: dict[str, Any], tiny_image: str,  # noqa: F811
                 tmp_path: Path) -> Iterator[Any]:
    made: list[Case] = []
    # QEMU runs as libvirt-qemu and must traverse to the VM's files.
    root = Path(tempfile.mkdtemp(prefix="pv-crash-", dir="/var/tmp"))
    root.chmod(0o711)

    def make(point: str) -> Case:
        agent = agent_with(agent_factory, network, state_dir=root / "state")
        agent.config_path.write_text(agent.config_path.read_text().replace(
            "[libvirt]\n", '[libvirt]\nvirt_type = "qemu"\n'))
        agent.env = {faults.ENV: point}
        volume = tmp_path / f"volume-{len(made)}"
        volume.mkdir()
        (volume / "config").write_text("for the crash tests\n")
        case = Case(agent.start(), tiny_image, tmp_path / "pods", point, volume)
        made.append(case)
        return case

    try:
        yield make
    finally:
        for case in made:
            try:
                for sb in case.sandboxes():
                    case.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sb.id), timeout=120)
            except Exception:  # noqa: BLE001 - the agent may be dead; virsh and the CNI cache clean below
                pass
            case.agent.stop()
            purge_domains(case.agent.state_dir)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("point", faults.POINTS["RunPodSandbox"])
def test_run_pod_sandbox(case_factory: Any, network: dict[str, Any], point: str) -> None:  # noqa: F811
    case: Case = case_factory(point)
    cfg = case.sandbox_config("runs")
    case.crashes(lambda: case.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=120))
    listed = case.sandboxes()
    if listed:
        # Done: READY, with its pod network.
        assert len(listed) == 1 and listed[0].state == pb.SANDBOX_READY, listed
        case.note(listed[0].id)
        assert case.made[0][1], "a READY sandbox without its IP"
        assert leftovers(network["ipam"], marks_for(case.agent, case.made))["netns"]
    else:
        # Not done: nothing of it anywhere, and kubelet's retry succeeds.
        assert leftovers(network["ipam"], marks_for(case.agent, [])) == NOTHING
        assert files_left(case.agent.state_dir) == []
        case.run_sandbox(cfg)
    case.remove_everything_and_check_nothing_left(network["ipam"])


@pytest.mark.parametrize("point", faults.POINTS["CreateContainer"])
def test_create_container(case_factory: Any, network: dict[str, Any], point: str) -> None:  # noqa: F811
    case: Case = case_factory(point)
    case.pull()
    cfg = case.sandbox_config("creates")
    sid = case.run_sandbox(cfg)
    case.crashes(lambda: case.create(sid, cfg))
    listed = case.containers()
    if listed:
        # Done: CREATED with its domain defined, and it starts.
        assert len(listed) == 1 and listed[0].state == pb.CONTAINER_CREATED, listed
        cid = listed[0].id
        assert case.domain_state(cid) == "shut off"
    else:
        # Not done: no domain or container directory, and a retry succeeds.
        assert domains_under(case.agent.state_dir) == []
        assert list((case.agent.state_dir / "sandboxes" / sid).glob("containers/*")) == []
        cid = case.create(sid, cfg)
    case.start(cid)
    assert case.container_state(cid) == pb.CONTAINER_RUNNING
    case.remove_everything_and_check_nothing_left(network["ipam"])


@pytest.mark.parametrize("point", faults.POINTS["StartContainer"])
def test_start_container(case_factory: Any, network: dict[str, Any], point: str) -> None:  # noqa: F811
    case: Case = case_factory(point)
    _, _, cid = case.vm_pod("starts")
    case.crashes(lambda: case.start(cid))
    state = case.container_state(cid)
    if state == pb.CONTAINER_RUNNING:
        assert case.domain_state(cid) == "running"
    else:
        # Not done: CREATED with its domain stopped, and kubelet's retry starts it.
        assert state == pb.CONTAINER_CREATED
        assert case.domain_state(cid) == "shut off"
        assert virtiofsd_left(case.agent.state_dir) == [], "recovery left the interrupted start's virtiofsd"
        case.start(cid)
        assert case.container_state(cid) == pb.CONTAINER_RUNNING
    case.remove_everything_and_check_nothing_left(network["ipam"])


@pytest.mark.parametrize("point", faults.POINTS["RemovePodSandbox"])
def test_remove_pod_sandbox(case_factory: Any, network: dict[str, Any], point: str) -> None:  # noqa: F811
    case: Case = case_factory(point)
    _, sid, cid = case.vm_pod("removes", start=True)
    case.crashes(lambda: case.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120))
    if case.sandboxes():
        # Not finished: whatever is left is consistent, and kubelet's retry removes it.
        for c in case.containers():
            assert case.container_state(c.id) in (pb.CONTAINER_RUNNING, pb.CONTAINER_EXITED)
            if case.container_state(c.id) == pb.CONTAINER_EXITED:
                assert case.domain_state(c.id) in ("shut off", "missing")
        case.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    assert case.sandboxes() == [] and case.containers() == []
    assert case.domain_state(cid) == "missing"
    case.remove_everything_and_check_nothing_left(network["ipam"])


@pytest.mark.parametrize("point", faults.POINTS["PullImage"])
def test_pull_image(case_factory: Any, network: dict[str, Any], point: str) -> None:  # noqa: F811
    case: Case = case_factory(point)
    case.crashes(case.pull)
    images = case.agent.images.ListImages(pb.ListImagesRequest(), timeout=30).images
    if images:
        # Done: listed under its tag, and a VM boots from it.
        assert [list(i.repo_tags) for i in images] == [[case.image]]
        cfg = case.sandbox_config("pulled")
        cid = case.create(case.run_sandbox(cfg), cfg)
        case.start(cid)
        assert case.container_state(cid) == pb.CONTAINER_RUNNING
    else:
        # Not done: no disk of it, and the retry pulls it.
        assert [p for p in (case.agent.state_dir / "images" / "disks").rglob("*") if p.is_file()] == []
        case.pull()
        assert len(case.agent.images.ListImages(pb.ListImagesRequest(), timeout=30).images) == 1
    case.remove_everything_and_check_nothing_left(network["ipam"])
