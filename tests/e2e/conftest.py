"""End-to-end fixtures: the tiny guest and the stock Debian 12 guest
(images/debian) as containerDisks in a real registry, and agents that boot
them under TCG through real libvirt.

Every domain a test makes is removed at teardown even when the test or the
agent failed: through the agent first, then directly with virsh for any
domain whose disks live under the test's state directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.adapters.registry import RegistryClient
from agent.api.gen.runtime.v1 import api_pb2 as pb
from agent.cli import oci_layout
from agent.domain.imageref import RemoteRepository
from tests.integration.agentproc import AgentProcess, agent_factory  # noqa: F401
from tests.integration.registry_fixture import RunningRegistry, registry  # noqa: F401
from tests.integration.test_sandbox_network import remove_all_pod_networks

ROOT = Path(__file__).resolve().parents[2]
TINY_DIR = Path(os.environ.get("PODVISOR_TINY_IMAGE_DIR", "/var/cache/podvisor/images/tiny"))
# The tiny guest needs 76 MiB to boot (Debian's kernel decompresses into ~68 MiB).
VM_MEMORY = 96 << 20
DEBIAN_DIR = Path(os.environ.get("PODVISOR_DEBIAN_IMAGE_DIR", "/var/cache/podvisor/images/debian"))
# Stock Debian 12 with cloud-init: comfortable in 768 MiB (images/debian/README.md).
DEBIAN_MEMORY = 768 << 20


def push_disk(disk: Path, registry: RunningRegistry, layout: Path, name: str, tag: str,  # noqa: F811
              timeout: float) -> str:
    """``disk`` as a containerDisk ``name:tag`` in the test registry; returns its reference."""
    built = oci_layout.build(disk, layout, tag)
    repo = RemoteRepository(registry=registry.host, host=registry.host, name=name)
    with RegistryClient(timeout=timeout) as client:
        oci_layout.push(client, layout, built, repo, tag)
    return f"{registry.host}/{name}:{tag}"


@pytest.fixture(scope="session")
def tiny_disk() -> Path:
    subprocess.run([str(ROOT / "images/tiny/build.sh"), str(TINY_DIR)], check=True, timeout=900)
    return TINY_DIR / "tiny.qcow2"


@pytest.fixture(scope="session")
def tiny_image(tiny_disk: Path, registry: RunningRegistry,  # noqa: F811
               tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny guest pushed as a containerDisk; returns its reference."""
    return push_disk(tiny_disk, registry, tmp_path_factory.mktemp("tiny-layout"), "podvisor/tiny", "1", 120)


@pytest.fixture(scope="session")
def debian_disk() -> Path:
    """The stock Debian 12 guest, built once per machine (minutes the first time)."""
    subprocess.run([str(ROOT / "images/debian/build.sh"), str(DEBIAN_DIR)], check=True, timeout=3600)
    return DEBIAN_DIR / "debian.qcow2"


@pytest.fixture(scope="session")
def debian_image(debian_disk: Path, registry: RunningRegistry,  # noqa: F811
                 tmp_path_factory: pytest.TempPathFactory) -> str:
    """The Debian guest pushed as a containerDisk; returns its reference."""
    return push_disk(debian_disk, registry, tmp_path_factory.mktemp("debian-layout"), "podvisor/debian", "12",
                     600)


def virsh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, timeout=120)


def domains_under(path: Path) -> list[str]:
    """Podvisor domains whose files are under ``path`` (this test's)."""
    names = virsh("list", "--all", "--name").stdout.split()
    mine = []
    for name in names:
        if name.startswith("podvisor-") and str(path) in virsh("dumpxml", name).stdout:
            mine.append(name)
    return mine


def purge_domains(path: Path) -> None:
    for name in domains_under(path):
        virsh("destroy", name)
        virsh("undefine", "--nvram", name)


@dataclass
class VM:
    sandbox_id: str
    container_id: str
    log_path: Path


class VMAgent:
    """An agent plus helpers to run VM pods on it."""

    def __init__(self, agent: AgentProcess, image: str, logs: Path) -> None:
        self.agent = agent
        self.image = image
        self.logs = logs

    def sandbox_config(self, name: str, **kw: Any) -> pb.PodSandboxConfig:
        return pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, namespace="e2e", uid=uuid.uuid4().hex),
            hostname=kw.pop("hostname", name),
            log_directory=str(self.logs / name),
            annotations=kw.pop("pod_annotations", {}),
            **kw,
        )

    def create(self, name: str, *, annotations: dict[str, str] | None = None,
               pod_annotations: dict[str, str] | None = None, memory: int = VM_MEMORY,
               envs: dict[str, str] | None = None, hostname: str | None = None,
               image: str | None = None, pull: bool = True,
               command: list[str] | None = None, args: list[str] | None = None,
               mounts: list[pb.Mount] | None = None) -> VM:
        image = image or self.image
        if pull:
            self.agent.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=300)
        sb_cfg = self.sandbox_config(name, hostname=hostname or name, pod_annotations=pod_annotations or {})
        sid = self.agent.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=sb_cfg), timeout=60).pod_sandbox_id
        cfg = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name="vm"),
            image=pb.ImageSpec(image=image),
            log_path="vm/0.log",
            annotations=annotations or {},
            envs=[pb.KeyValue(key=k, value=v.encode()) for k, v in (envs or {}).items()],
            command=command or [],
            args=args or [],
            mounts=mounts or [],
            linux=pb.LinuxContainerConfig(resources=pb.LinuxContainerResources(memory_limit_in_bytes=memory)),
        )
        cid = self.agent.runtime.CreateContainer(
            pb.CreateContainerRequest(pod_sandbox_id=sid, config=cfg, sandbox_config=sb_cfg), timeout=120
        ).container_id
        return VM(sid, cid, self.logs / name / "vm" / "0.log")

    def run_many(self, prefix: str, count: int, parallel: int) -> list[VM]:
        """Pull once, then create and start ``count`` VMs, ``parallel`` at a time."""
        self.agent.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=self.image)), timeout=300)

        def run(i: int) -> VM:
            vm = self.create(f"{prefix}-{i}", pull=False)
            self.start(vm)
            return vm

        with ThreadPoolExecutor(parallel) as pool:
            return list(pool.map(run, range(count)))

    def start(self, vm: VM) -> None:
        self.agent.runtime.StartContainer(pb.StartContainerRequest(container_id=vm.container_id), timeout=120)

    def status(self, vm: VM, verbose: bool = False) -> Any:
        return self.agent.runtime.ContainerStatus(
            pb.ContainerStatusRequest(container_id=vm.container_id, verbose=verbose), timeout=30)

    def wait_log(self, vm: VM, text: str, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        content = ""
        while time.monotonic() < deadline:
            try:
                content = vm.log_path.read_text(errors="replace")
            except FileNotFoundError:
                content = ""
            if text in content:
                return content
            time.sleep(0.25)
        raise AssertionError(f"{text!r} not in {vm.log_path} after {timeout}s:\n{content[-4000:]}\n"
                             f"agent log:\n{self.agent.log()[-4000:]}")

    def wait_state(self, vm: VM, state: int, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        st = None
        while time.monotonic() < deadline:
            st = self.status(vm).status
            if st.state == state:
                return st
            time.sleep(0.2)
        raise AssertionError(f"container never reached state {state}: {st}")

    def remove_pod(self, vm: VM) -> None:
        self.agent.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=vm.sandbox_id), timeout=120)
        self.agent.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=vm.sandbox_id), timeout=120)


@pytest.fixture
def vm_agent(agent_factory: Any, tiny_image: str, tmp_path: Path) -> Iterator[VMAgent]:  # noqa: F811
    # QEMU runs as libvirt-qemu and must traverse to the VM's files: pytest's
    # tmp tree is private (0700), so the state lives in a 0711 directory.
    state = Path(tempfile.mkdtemp(prefix="pv-e2e-", dir="/var/tmp"))
    state.chmod(0o711)
    agent: AgentProcess = agent_factory(state_dir=state / "state")
    # Pin TCG: this fixture must boot guests on any machine the tests run on.
    agent.config_path.write_text(agent.config_path.read_text().replace(
        "[libvirt]\n", '[libvirt]\nvirt_type = "qemu"\n'))
    agent.start()
    logs = tmp_path / "pods"
    helper = VMAgent(agent, tiny_image, logs)
    try:
        yield helper
    finally:
        try:
            # helper.agent: a test may have replaced the agent (restarts).
            for sb in helper.agent.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items:
                helper.remove_pod(VM(sb.id, "", Path()))
        except Exception:  # noqa: BLE001 - the agent may be dead; virsh cleans below
            pass
        purge_domains(agent.state_dir)
        shutil.rmtree(state, ignore_errors=True)


# --- a VM pod on a private CNI network, for a whole module ----------------------


@contextlib.contextmanager
def pod_network_agent(workdir: Path, image: str) -> Iterator[tuple[VMAgent, dict[str, str]]]:
    """A TCG agent whose pods join a CNI network private to the caller (its own
    bridge and /24); every pod, domain, netns and the bridge go at exit."""
    state = Path(tempfile.mkdtemp(prefix="pv-e2e-net-", dir="/var/tmp"))
    state.chmod(0o711)
    suffix = secrets.token_hex(3)
    net = {"bridge": f"pvt{suffix}", "subnet": f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}.0/24",
           "name": f"e2e-{suffix}", "ipam": str(workdir / "ipam")}
    conf = workdir / "net.d"
    conf.mkdir(parents=True)
    (conf / "10-e2e.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": net["name"],
        "plugins": [
            {"type": "bridge", "bridge": net["bridge"], "isGateway": True, "ipMasq": False, "hairpinMode": True,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": net["subnet"]}]], "dataDir": net["ipam"],
                      "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ]}))
    agent = AgentProcess(workdir, state_dir=state / "state", cni_conf_dir=conf, network=True)
    helper = VMAgent(agent, image, workdir / "pods")
    try:
        agent.config_path.write_text(agent.config_path.read_text().replace(
            "[libvirt]\n", '[libvirt]\nvirt_type = "qemu"\n'))
        agent.start()
        yield helper, net
    finally:
        try:
            for sb in helper.agent.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items:
                helper.remove_pod(VM(sb.id, "", Path()))
        except Exception:  # noqa: BLE001 - virsh and ip clean below
            pass
        purge_domains(agent.state_dir)
        remove_all_pod_networks(helper.agent)
        agent.cleanup()
        subprocess.run(["ip", "link", "del", net["bridge"]], capture_output=True, timeout=30)
        shutil.rmtree(state, ignore_errors=True)


@dataclass(frozen=True)
class DebianVMSpec:
    """What the module's Debian VM pod is made with (override ``debian_vm_spec``)."""

    hostname: str = "debian-vm"
    annotations: dict[str, str] | None = None
    envs: dict[str, str] | None = None
    command: list[str] | None = None
    args: list[str] | None = None
    memory: int = DEBIAN_MEMORY
    mounts: list[pb.Mount] | None = None  # CRI mounts (pod volumes)
    # Printed on the console when the guest is ready for the module's tests:
    # cloud-init's own last line ("Cloud-init v. N finished at ..."). Not
    # systemd's "Reached target ... Cloud-init target": systemd stops printing
    # unit status once the serial getty holds the console, which under TCG
    # often comes first.
    ready_marker: str = " finished at "
    boot_timeout: float = 900


@dataclass
class DebianVM:
    """The module's running Debian VM pod."""

    vma: VMAgent
    vm: VM
    spec: DebianVMSpec
    pod_ip: str
    domain: str

    def log(self) -> str:
        return self.vm.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 600) -> str:
        return self.vma.wait_log(self.vm, text, timeout=timeout)

    def agent_command(self, command: dict[str, Any], timeout: float = 60) -> Any:
        """A QEMU guest agent command through libvirt (virsh qemu-agent-command)."""
        out = virsh("qemu-agent-command", "--timeout", str(int(timeout)), self.domain, json.dumps(command))
        if out.returncode != 0:
            raise AssertionError(f"qemu-agent-command {command} failed: {out.stderr.strip()}")
        return json.loads(out.stdout)["return"]


@pytest.fixture(scope="module")
def debian_vm_spec() -> DebianVMSpec:
    """Override in a test module to give its VM user-data, envs, a command."""
    return DebianVMSpec()


@pytest.fixture(scope="module")
def debian_vm(debian_image: str, debian_vm_spec: DebianVMSpec,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[DebianVM]:
    """ONE stock Debian 12 VM pod for the whole module, on a pod network,
    booted under TCG; yields once ``spec.ready_marker`` is on its console."""
    spec = debian_vm_spec
    workdir = tmp_path_factory.mktemp("debian-vm")
    with pod_network_agent(workdir, debian_image) as (vma, _net):
        vm = vma.create(spec.hostname, hostname=spec.hostname, annotations=spec.annotations,
                        envs=spec.envs, memory=spec.memory, command=spec.command, args=spec.args,
                        mounts=spec.mounts)
        pod_ip = vma.agent.runtime.PodSandboxStatus(
            pb.PodSandboxStatusRequest(pod_sandbox_id=vm.sandbox_id), timeout=30).status.network.ip
        info = json.loads(vma.status(vm, verbose=True).info["info"])
        domain = ET.fromstring(info["domainXML"]).findtext("name") or ""
        vma.start(vm)
        vma.wait_log(vm, spec.ready_marker, timeout=spec.boot_timeout)
        yield DebianVM(vma, vm, spec, pod_ip, domain)
