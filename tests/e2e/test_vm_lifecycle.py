"""VMs as CRI containers, end to end: the tiny guest boots under TCG through
real libvirt from a containerDisk in a real registry, driven only by gRPC."""

from __future__ import annotations

import base64
import json
import re
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
import yaml

from agent.api.gen.runtime.v1 import api_pb2 as pb
from tests.e2e.conftest import VM, VMAgent, purge_domains, virsh
from tests.integration import hostctl

ROOT = Path(__file__).resolve().parents[2]


def containers(vma: VMAgent, **flt: object) -> list[pb.Container]:
    req = pb.ListContainersRequest(filter=pb.ContainerFilter(**flt)) if flt else pb.ListContainersRequest()
    return list(vma.agent.runtime.ListContainers(req, timeout=30).containers)


def _collect_events(vma: VMAgent, into: list[pb.ContainerEventResponse]) -> threading.Thread:
    stream = vma.agent.runtime.GetContainerEvents(pb.GetEventsRequest(), timeout=600)

    def run() -> None:
        try:
            for ev in stream:
                into.append(ev)
        except grpc.RpcError:
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.stream = stream  # type: ignore[attr-defined]
    return t


def test_full_lifecycle(vm_agent: VMAgent) -> None:
    events: list[pb.ContainerEventResponse] = []
    watcher = _collect_events(vm_agent, events)
    time.sleep(0.5)
    vm = vm_agent.create("life", hostname="life-host", envs={"GREETING": "hello-env"})
    st = vm_agent.status(vm, verbose=True)
    assert st.status.state == pb.CONTAINER_CREATED
    info = json.loads(st.info["info"])
    assert "<domain" in info["domainXML"] and "hvm" in info["domainXML"]
    assert "host-passthrough" not in info["domainXML"]  # TCG
    assert Path(info["overlay"]).is_file() and Path(info["seed"]).is_file()

    vm_agent.start(vm)
    text = vm_agent.wait_log(vm, "PODVISOR-READY hostname=life-host")
    # The CRI log format: "<RFC3339Nano> stdout F <line>".
    assert re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z stdout [FP] ", text, re.M)
    assert "GREETING=hello-env" in text or "GREETING: hello-env" in text or "hello-env" in text

    st = vm_agent.status(vm).status
    assert st.state == pb.CONTAINER_RUNNING and st.started_at >= st.created_at > 0
    assert st.log_path == str(vm.log_path)
    assert [c.id for c in containers(vm_agent, pod_sandbox_id=vm.sandbox_id)] == [vm.container_id]
    assert [c.id for c in containers(vm_agent, state=pb.ContainerStateValue(state=pb.CONTAINER_RUNNING))] == \
        [vm.container_id]
    assert containers(vm_agent, state=pb.ContainerStateValue(state=pb.CONTAINER_EXITED)) == []

    stats = vm_agent.agent.runtime.ContainerStats(pb.ContainerStatsRequest(container_id=vm.container_id),
                                                  timeout=30).stats
    assert stats.cpu.usage_core_nano_seconds.value > 0
    assert stats.memory.rss_bytes.value > 16 << 20
    assert stats.writable_layer.used_bytes.value > 0
    pod_stats = vm_agent.agent.runtime.ListPodSandboxStats(pb.ListPodSandboxStatsRequest(), timeout=30).stats
    assert [s.attributes.id for s in pod_stats] == [vm.sandbox_id]

    # A second VM in the same sandbox is refused.
    with pytest.raises(grpc.RpcError) as err:
        vm_agent.agent.runtime.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=vm.sandbox_id,
            config=pb.ContainerConfig(metadata=pb.ContainerMetadata(name="second"),
                                      image=pb.ImageSpec(image=vm_agent.image))), timeout=60)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    vm_agent.agent.runtime.StopContainer(pb.StopContainerRequest(container_id=vm.container_id, timeout=60),
                                         timeout=120)
    st = vm_agent.status(vm).status
    assert st.state == pb.CONTAINER_EXITED and st.exit_code == 0 and st.finished_at >= st.started_at
    directory = Path(info["directory"])
    domain = info["domain"]
    vm_agent.remove_pod(vm)
    assert containers(vm_agent) == []
    assert not directory.exists()
    assert domain not in virsh("list", "--all", "--name").stdout
    assert vm_agent.agent.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items == []
    deadline = time.monotonic() + 10
    while len(events) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    watcher.stream.cancel()  # type: ignore[attr-defined]
    mine = [e for e in events if e.container_id == vm.container_id]
    assert [e.container_event_type for e in mine] == [
        pb.CONTAINER_CREATED_EVENT, pb.CONTAINER_STARTED_EVENT, pb.CONTAINER_STOPPED_EVENT,
        pb.CONTAINER_DELETED_EVENT]
    assert mine[0].pod_sandbox_status.id == vm.sandbox_id
    assert mine[1].containers_statuses[0].state == pb.CONTAINER_RUNNING


def test_user_data_script_runs_and_guest_poweroff_is_completed(vm_agent: VMAgent) -> None:
    script = "#!/bin/sh\necho user-data-ran-$((6*7))\nsleep 1\npoweroff\n"
    vm = vm_agent.create("script", annotations={"podvisor.io/user-data": script})
    vm_agent.start(vm)
    assert vm.log_path.is_file()  # there when StartContainer returns, before any console output is copied
    vm_agent.wait_log(vm, "user-data-ran-42")
    st = vm_agent.wait_state(vm, pb.CONTAINER_EXITED, timeout=120)
    assert (st.exit_code, st.reason) == (0, "Completed")


def test_guest_ignoring_acpi_is_killed_with_137(vm_agent: VMAgent) -> None:
    vm = vm_agent.create("stubborn", annotations={"podvisor.io/user-data": "#podvisor:ignore-acpi\n"})
    vm_agent.start(vm)
    vm_agent.wait_log(vm, "PODVISOR-READY")
    started = time.monotonic()
    vm_agent.agent.runtime.StopContainer(pb.StopContainerRequest(container_id=vm.container_id, timeout=3),
                                         timeout=60)
    assert time.monotonic() - started < 30
    st = vm_agent.status(vm).status
    assert (st.state, st.exit_code, st.reason) == (pb.CONTAINER_EXITED, 137, "Killed")


def test_domain_destroyed_behind_the_agents_back(vm_agent: VMAgent) -> None:
    vm = vm_agent.create("victim")
    vm_agent.start(vm)
    vm_agent.wait_log(vm, "PODVISOR-READY")
    info = json.loads(vm_agent.status(vm, verbose=True).info["info"])
    assert virsh("destroy", info["domain"]).returncode == 0
    st = vm_agent.wait_state(vm, pb.CONTAINER_EXITED, timeout=30)
    assert st.exit_code != 0 and st.reason == "Error" and "outside Podvisor" in st.message


def test_qemu_killed_behind_the_agents_back(vm_agent: VMAgent) -> None:
    vm = vm_agent.create("crashy")
    vm_agent.start(vm)
    vm_agent.wait_log(vm, "PODVISOR-READY")
    domain = json.loads(vm_agent.status(vm, verbose=True).info["info"])["domain"]
    pid = int(Path(f"/run/libvirt/qemu/{domain}.pid").read_text().strip())
    subprocess.run(["kill", "-9", str(pid)], check=True)
    st = vm_agent.wait_state(vm, pb.CONTAINER_EXITED, timeout=30)
    assert st.exit_code != 0 and st.reason == "Error" and st.message


def test_five_vms_start_concurrently(vm_agent: VMAgent) -> None:
    vms = vm_agent.run_many("many", 5, 5)
    for i, vm in enumerate(vms):
        vm_agent.wait_log(vm, f"PODVISOR-READY hostname=many-{i}", timeout=300)
    assert len(containers(vm_agent, state=pb.ContainerStateValue(state=pb.CONTAINER_RUNNING))) == 5


def test_kill9_agent_adopts_running_vm_and_log_continues(vm_agent: VMAgent) -> None:
    ticker = "#!/bin/sh\ni=0\nwhile [ $i -lt 600 ]; do i=$((i+1)); echo tick-$i; sleep 0.5; done\n"
    vm = vm_agent.create("ticker", annotations={"podvisor.io/user-data": ticker})
    vm_agent.start(vm)
    vm_agent.wait_log(vm, "tick-3")
    before = vm_agent.status(vm).status
    vm_agent.agent.kill9()
    time.sleep(3)  # the guest keeps ticking while no agent runs
    vm_agent.agent.start()  # the same config, state and socket
    after = vm_agent.status(vm).status
    assert after.state == pb.CONTAINER_RUNNING
    assert (after.created_at, after.started_at) == (before.created_at, before.started_at)
    last = int(re.findall(r"tick-(\d+)", vm.log_path.read_text())[-1])
    vm_agent.wait_log(vm, f"tick-{last + 4}")
    # (The guest's getty may print on the same line before a tick.)
    ticks = [int(n) for n in re.findall(r"^\S+ stdout F .*?\btick-(\d+)$", vm.log_path.read_text(), re.M)]
    assert ticks == list(range(1, len(ticks) + 1)), "console output lost or duplicated across the restart"
    assert vm.log_path.read_text().count("PODVISOR-READY") == 1

    # Rotation as kubelet does it: move the file away, then ReopenContainerLog.
    rotated = vm.log_path.with_name("0.log.1")
    vm.log_path.rename(rotated)
    vm_agent.agent.runtime.ReopenContainerLog(pb.ReopenContainerLogRequest(container_id=vm.container_id),
                                              timeout=30)
    assert vm.log_path.exists()
    vm_agent.wait_log(vm, "tick-")
    old_last = int(re.findall(r"tick-(\d+)$", rotated.read_text(), re.M)[-1])
    new_first = int(re.findall(r"tick-(\d+)$", vm.log_path.read_text(), re.M)[0])
    assert new_first == old_last + 1


def test_half_done_create_is_rolled_back_and_foreign_domains_untouched(vm_agent: VMAgent,
                                                                      tmp_path: Path) -> None:
    vm = vm_agent.create("half")
    info = json.loads(vm_agent.status(vm, verbose=True).info["info"])
    foreign = f"not-podvisor-{vm.container_id[:8]}"
    xml = tmp_path / "foreign.xml"
    xml.write_text(f"<domain type='qemu'><name>{foreign}</name><memory unit='MiB'>32</memory>"
                   "<os><type arch='x86_64'>hvm</type></os></domain>")
    assert virsh("define", str(xml)).returncode == 0
    try:
        vm_agent.agent.kill9()
        db = sqlite3.connect(vm_agent.agent.state_dir / "podvisor.db")
        db.execute("UPDATE containers SET state = 'creating' WHERE id = ?", (vm.container_id,))
        db.commit()
        db.close()
        vm_agent.agent.start()
        assert containers(vm_agent) == []
        assert info["domain"] not in virsh("list", "--all", "--name").stdout
        assert not Path(info["directory"]).exists()
        assert foreign in virsh("list", "--all", "--name").stdout
    finally:
        virsh("undefine", foreign)


@pytest.mark.slow
def test_libvirtd_restart_under_a_running_vm(vm_agent: VMAgent) -> None:
    vm = vm_agent.create("steady")
    vm_agent.start(vm)
    vm_agent.wait_log(vm, "PODVISOR-READY")
    try:
        hostctl.stop_libvirtd()
    finally:
        hostctl.start_libvirtd()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = vm_agent.agent.runtime.Status(pb.StatusRequest(), timeout=10).status
        cond = {c.type: c.status for c in status.conditions}
        if cond["RuntimeReady"]:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"RuntimeReady did not come back within 60 s after libvirtd restarted: {status}")
    assert vm_agent.status(vm).status.state == pb.CONTAINER_RUNNING
    vm_agent.agent.runtime.StopContainer(pb.StopContainerRequest(container_id=vm.container_id, timeout=60),
                                         timeout=120)
    assert vm_agent.status(vm).status.state == pb.CONTAINER_EXITED


def test_update_resources_within_maxima(vm_agent: VMAgent) -> None:
    vm = vm_agent.create("elastic", annotations={"podvisor.io/vcpus": "1"})
    vm_agent.start(vm)
    vm_agent.wait_log(vm, "PODVISOR-READY")
    st = vm_agent.status(vm, verbose=True)
    info = json.loads(st.info["info"])
    smaller = info["maxMemoryBytes"] - (16 << 20)
    vm_agent.agent.runtime.UpdateContainerResources(pb.UpdateContainerResourcesRequest(
        container_id=vm.container_id, linux=pb.LinuxContainerResources(memory_limit_in_bytes=smaller)), timeout=60)
    assert vm_agent.status(vm).status.resources.linux.memory_limit_in_bytes == smaller
    with pytest.raises(grpc.RpcError) as err:
        vm_agent.agent.runtime.UpdateContainerResources(pb.UpdateContainerResourcesRequest(
            container_id=vm.container_id,
            linux=pb.LinuxContainerResources(memory_limit_in_bytes=info["maxMemoryBytes"] * 4)), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "maximum" in (err.value.details() or "")


def test_remove_image_used_by_a_vm_is_refused(vm_agent: VMAgent) -> None:
    vm_agent.create("holder")
    with pytest.raises(grpc.RpcError) as err:
        vm_agent.agent.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=vm_agent.image)),
                                          timeout=60)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_kubevirt_testvm_example(vm_agent: VMAgent, registry: object, agent_factory: object) -> None:
    """examples/testvm.yaml through podvisor.io/vm, its containerDisk served by a mirror rewrite."""
    manifest = (ROOT / "examples" / "testvm.yaml").read_text()
    doc = yaml.safe_load(manifest)
    volumes = doc["spec"]["template"]["spec"]["volumes"]
    user_data = base64.b64decode(next(v["cloudInitNoCloud"]["userDataBase64"] for v in volumes
                                      if "cloudInitNoCloud" in v)).decode()
    host = vm_agent.image.split("/")[0]
    # Serve docker.io/kubevirt/cirros-registry-disk-demo from the local registry (the tiny guest).
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", "--dest-tls-verify=false",
                    f"docker://{vm_agent.image}", f"docker://{host}/kubevirt/cirros-registry-disk-demo:latest"],
                   check=True, timeout=300)
    text = vm_agent.agent.config_path.read_text()
    vm_agent.agent.stop()
    rewritten = agent_factory(state_dir=vm_agent.agent.state_dir)  # type: ignore[operator]
    rewritten.config_path.write_text(text + "[[registries.rewrite]]\n"
                                     'prefix = "docker.io/kubevirt/"\n'
                                     f'replacement = "{host}/kubevirt/"\n')
    rewritten.socket, rewritten.socket_dir = vm_agent.agent.socket, vm_agent.agent.socket_dir
    rewritten.start()
    vm_agent.agent = rewritten
    # The manifest asks for 64M, which Debian's kernel in the tiny guest cannot
    # boot in (it needs 76 MiB to decompress itself): the CRI memory limit,
    # which wins over the VMI spec, gives it 96Mi here. The agent itself never
    # raises a requested size.
    vm = vm_agent.create("testvm", image="kubevirt/cirros-registry-disk-demo",
                         pod_annotations={"podvisor.io/vm": manifest})
    vm_agent.start(vm)
    text = vm_agent.wait_log(vm, "PODVISOR-USER-DATA-END")
    for line in user_data.strip().splitlines():
        assert line.strip() in text


def test_nothing_left_after_remove_pod_sandbox(vm_agent: VMAgent) -> None:
    vm = vm_agent.create("tidy")
    vm_agent.start(vm)
    vm_agent.wait_log(vm, "PODVISOR-READY")
    state = vm_agent.agent.state_dir
    vm_agent.remove_pod(vm)
    assert containers(vm_agent) == []
    assert not list((state / "sandboxes").iterdir())
    assert not [n for n in virsh("list", "--all", "--name").stdout.split() if vm.container_id in n]
    db = sqlite3.connect(state / "podvisor.db")
    assert db.execute("SELECT count(*) FROM containers").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM sandboxes").fetchone()[0] == 0
    db.close()
    purge_domains(state)


def test_host_network_sandbox_gets_a_user_mode_nic(vm_agent: VMAgent) -> None:
    """hostNetwork (NODE): no pod namespace; the VM gets QEMU's user-mode NIC
    and the sandbox reports the node's address."""
    vm_agent.agent.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=vm_agent.image)), timeout=300)
    sb_cfg = vm_agent.sandbox_config("hostnet", hostname="hostnet")
    sb_cfg.linux.security_context.namespace_options.network = pb.NODE
    sid = vm_agent.agent.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=sb_cfg), timeout=60).pod_sandbox_id
    st = vm_agent.agent.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=30).status
    assert st.linux.namespaces.options.network == pb.NODE
    assert st.network.ip and not st.network.ip.startswith("127.")
    cfg = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name="vm"), image=pb.ImageSpec(image=vm_agent.image), log_path="vm/0.log",
        linux=pb.LinuxContainerConfig(resources=pb.LinuxContainerResources(memory_limit_in_bytes=96 << 20)))
    cid = vm_agent.agent.runtime.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=sid, config=cfg, sandbox_config=sb_cfg), timeout=120).container_id
    vm = VM(sid, cid, vm_agent.logs / "hostnet" / "vm" / "0.log")
    xml = json.loads(vm_agent.status(vm, verbose=True).info["info"])["domainXML"]
    assert "<interface type='user'>" in xml or "<interface type=\"user\">" in xml
    vm_agent.start(vm)
    # QEMU's user-mode DHCP hands out 10.0.2.15; nothing leaves the host.
    vm_agent.wait_log(vm, "ip=10.0.2.15", timeout=240)
    vm_agent.remove_pod(vm)
