"""Pod fidelity on the stock Debian 12 guest (images/debian), end to end
through the CRI API under TCG: the pod's dns_config in /etc/resolv.conf, its
sysctls in the guest kernel, and the container's command as the VM's
workload, whose exit code becomes the container's.

No way into the guest is needed: the command is the probe. It prints what it
reads (between markers) on its stdout, which the workload wrapper sends to the
serial console, hence to the container log; then it exits with a chosen code,
the guest powers off, and ContainerStatus must report that code.

Two VMs (exit 3 and exit 0) boot together under one agent without pod
networking (no NIC: nothing here needs one). The Debian disk is the one
images/debian builds (cached per machine), pushed by tests/e2e/conftest.py.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.api.gen.runtime.v1 import api_pb2 as pb
from tests.e2e.conftest import DEBIAN_MEMORY, VM, VMAgent, purge_domains
from tests.integration.agentproc import AgentProcess

BOOT_TIMEOUT_S = 900

DNS = pb.DNSConfig(servers=["10.96.0.10", "10.96.0.11"],
                   searches=["fidelity.svc.cluster.local", "svc.cluster.local", "cluster.local"],
                   options=["ndots:5", "timeout:2"])
SYSCTLS = {"kernel.shm_rmid_forced": "1", "net.ipv4.ip_unprivileged_port_start": "80"}
PROBE = (
    "echo PROBE-RESOLV-BEGIN; cat /etc/resolv.conf; echo PROBE-RESOLV-END; "
    "echo PROBE-SYSCTL shm_rmid_forced=$(cat /proc/sys/kernel/shm_rmid_forced) "
    "ip_unprivileged_port_start=$(cat /proc/sys/net/ipv4/ip_unprivileged_port_start); "
    "echo PROBE-ENV greeting=$GREETING; "
    # The command runs detached from cloud-init: its final stage ends, without errors.
    "echo PROBE-CLOUD-INIT $(cloud-init status --wait 2>&1 | tail -n 1); "
    "exit 3"
)


@pytest.fixture(scope="module")
def debian_agent(debian_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VMAgent]:
    """A TCG agent without pod networking, for the module; everything it made goes at exit."""
    workdir = tmp_path_factory.mktemp("fidelity")
    state = Path(tempfile.mkdtemp(prefix="pv-e2e-fid-", dir="/var/tmp"))
    state.chmod(0o711)
    agent = AgentProcess(workdir, state_dir=state / "state")
    helper = VMAgent(agent, debian_image, workdir / "pods")
    try:
        agent.config_path.write_text(agent.config_path.read_text().replace(
            "[libvirt]\n", '[libvirt]\nvirt_type = "qemu"\n'))
        agent.start()
        yield helper
    finally:
        try:
            for sb in helper.agent.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items:
                helper.remove_pod(VM(sb.id, "", Path()))
        except Exception:  # noqa: BLE001 - virsh cleans below
            pass
        purge_domains(agent.state_dir)
        agent.cleanup()
        shutil.rmtree(state, ignore_errors=True)


def _job(vma: VMAgent, name: str, command: list[str], *, dns: pb.DNSConfig | None = None,
         sysctls: dict[str, str] | None = None, envs: dict[str, str] | None = None) -> VM:
    """A pod whose container's command is the VM's workload (CreateContainer as kubelet sends it)."""
    sb_cfg = vma.sandbox_config(name, linux=pb.LinuxPodSandboxConfig(sysctls=sysctls or {}))
    if dns is not None:
        sb_cfg.dns_config.CopyFrom(dns)
    sid = vma.agent.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=sb_cfg), timeout=60).pod_sandbox_id
    cfg = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name="vm"), image=pb.ImageSpec(image=vma.image), log_path="vm/0.log",
        command=command, envs=[pb.KeyValue(key=k, value=v.encode()) for k, v in (envs or {}).items()],
        linux=pb.LinuxContainerConfig(resources=pb.LinuxContainerResources(memory_limit_in_bytes=DEBIAN_MEMORY)))
    cid = vma.agent.runtime.CreateContainer(
        pb.CreateContainerRequest(pod_sandbox_id=sid, config=cfg, sandbox_config=sb_cfg), timeout=120).container_id
    return VM(sid, cid, vma.logs / name / "vm" / "0.log")


@dataclass(frozen=True)
class Ran:
    vm: VM
    status: pb.ContainerStatus
    log: str  # the container log's text, CRI prefixes removed


def _text(cri_log: str) -> str:
    return "".join(re.sub(r"^\S+ stdout [FP] ", "", line) + ("\n" if " stdout F " in line else "")
                   for line in cri_log.splitlines())


@pytest.fixture(scope="module")
def jobs(debian_agent: VMAgent) -> dict[str, Ran]:
    """Both VMs run to their end, together (one boot's wait for the module)."""
    vma = debian_agent
    vma.agent.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=vma.image)), timeout=600)
    vms = {
        "fail": _job(vma, "job-fail", ["sh", "-c", PROBE], dns=DNS, sysctls=SYSCTLS, envs={"GREETING": "hi there"}),
        "ok": _job(vma, "job-ok", ["sh", "-c", "echo job-ok-ran; exit 0"]),
    }
    for vm in vms.values():
        vma.start(vm)
        assert vm.log_path.is_file()  # the log exists when StartContainer returns

    def finish(vm: VM) -> Ran:
        st = vma.wait_state(vm, pb.CONTAINER_EXITED, timeout=BOOT_TIMEOUT_S)
        return Ran(vm, st, _text(vm.log_path.read_text(errors="replace")))

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(vms, pool.map(finish, vms.values()), strict=True))


def test_the_commands_nonzero_exit_code_is_the_containers(jobs: dict[str, Ran]) -> None:
    st = jobs["fail"].status
    assert (st.exit_code, st.reason) == (3, "Error"), st
    assert st.message == "the command exited with code 3; the guest powered off"


def test_the_commands_zero_exit_is_completed(jobs: dict[str, Ran]) -> None:
    ran = jobs["ok"]
    assert (ran.status.exit_code, ran.status.reason) == (0, "Completed"), ran.status
    assert "job-ok-ran" in ran.log


def test_the_pods_dns_config_is_the_guests_resolv_conf(jobs: dict[str, Ran]) -> None:
    log = jobs["fail"].log
    assert "PROBE-RESOLV-BEGIN" in log, log[-4000:]
    resolv = log.split("PROBE-RESOLV-BEGIN\n", 1)[1].split("PROBE-RESOLV-END", 1)[0]
    lines = [line.strip() for line in resolv.splitlines() if line.strip()]
    assert [line for line in lines if not line.startswith("#")] == [
        "nameserver 10.96.0.10", "nameserver 10.96.0.11",
        "search fidelity.svc.cluster.local svc.cluster.local cluster.local",
        "options ndots:5 timeout:2",
    ], resolv


def test_the_pods_sysctls_are_set_in_the_guest_kernel(jobs: dict[str, Ran]) -> None:
    assert "PROBE-SYSCTL shm_rmid_forced=1 ip_unprivileged_port_start=80" in jobs["fail"].log


def test_the_command_sees_the_container_env(jobs: dict[str, Ran]) -> None:
    assert "PROBE-ENV greeting=hi there" in jobs["fail"].log


def test_cloud_init_finishes_without_errors_while_the_command_runs(jobs: dict[str, Ran]) -> None:
    assert "PROBE-CLOUD-INIT status: done" in jobs["fail"].log, jobs["fail"].log[-3000:]
