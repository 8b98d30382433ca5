"""A VM pod on a real agent without booting an OS: an empty qcow2 containerDisk.

The VM's firmware finds nothing to boot and keeps the domain running, and it
ignores the ACPI power button: what a hung guest looks like, at the cost of a
firmware loop under TCG.
"""

from __future__ import annotations

import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from agent.adapters.registry import RegistryClient
from agent.api.gen.runtime.v1 import api_pb2 as pb
from agent.domain.vm import domain_name
from tests.integration.agentproc import AgentProcess
from tests.integration.registry_fixture import RunningRegistry, containerdisk_layer, push_image

MiB = 1 << 20


def push_empty_disk_image(registry: RunningRegistry, tmp: Path) -> str:
    disk = tmp / f"{uuid.uuid4().hex}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True, timeout=60)
    name = f"podvisor-test/{uuid.uuid4().hex[:12]}"
    with RegistryClient(timeout=30) as client:
        push_image(client, registry.repository(name), "v1",
                   [containerdisk_layer({"disk/disk.qcow2": disk.read_bytes()})])
    disk.unlink()
    return f"{registry.host}/{name}:v1"


@dataclass
class Pod:
    sandbox_id: str
    container_id: str

    @property
    def domain(self) -> str:
        return domain_name(self.container_id)


def create_pod(agent: AgentProcess, image: str, logs: Path, name: str = "vm") -> Pod:
    agent.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=120)
    sb_cfg = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, namespace="it", uid=uuid.uuid4().hex),
        log_directory=str(logs / name))
    sid = agent.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=sb_cfg), timeout=60).pod_sandbox_id
    cfg = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name="vm"), image=pb.ImageSpec(image=image), log_path="vm/0.log",
        linux=pb.LinuxContainerConfig(resources=pb.LinuxContainerResources(memory_limit_in_bytes=64 * MiB)))
    cid = agent.runtime.CreateContainer(
        pb.CreateContainerRequest(pod_sandbox_id=sid, config=cfg, sandbox_config=sb_cfg), timeout=120
    ).container_id
    return Pod(sid, cid)


def remove_pod(agent: AgentProcess, pod: Pod) -> None:
    agent.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod.sandbox_id), timeout=120)
    agent.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod.sandbox_id), timeout=120)


def purge_domain(pod: Pod) -> None:
    """Whatever the test left: destroy and undefine the pod's domain, quietly."""
    for cmd in (["destroy", pod.domain], ["undefine", "--nvram", pod.domain]):
        subprocess.run(["virsh", "-c", "qemu:///system", *cmd], capture_output=True, timeout=60)
