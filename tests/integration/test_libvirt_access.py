"""QEMU's user and the agent's directories (#10 item 14), on a real agent and libvirtd.

A directory QEMU cannot traverse stops the start with a message that names
it; a file made unreachable later is FAILED_PRECONDITION naming its path, not
a lost libvirt connection (no "connection lost", no reconnect).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.api.gen.runtime.v1 import api_pb2 as pb
from tests.integration.agentproc import AgentProcess
from tests.integration.registry_fixture import RunningRegistry
from tests.integration.vmpod import create_pod, purge_domain, push_empty_disk_image, remove_pod


def _refused(agent: AgentProcess) -> str:
    agent.start(wait=False)
    assert agent.wait(60) == 1, agent.log()
    assert not agent.socket.exists()
    return agent.log()


def test_a_state_dir_under_a_private_directory_refuses_to_start(agent_factory: Any) -> None:
    private = Path(tempfile.mkdtemp(prefix="pv-private-", dir="/var/tmp"))  # 0700, like pytest's tmp tree
    try:
        agent: AgentProcess = agent_factory(state_dir=private / "state")
        log = _refused(agent)
        line = next(line for line in log.splitlines() if "cannot start" in line)
        assert f"cannot traverse {private} on the way to state_dir {private / 'state'}" in line
        assert f"chmod o+x {private}" in line
        assert "libvirt-qemu" in line
        # Nothing was built: no database, no serving.
        assert not (private / "state" / "podvisor.db").exists()
    finally:
        shutil.rmtree(private, ignore_errors=True)


def test_a_private_runtime_dir_refuses_to_start(agent_factory: Any) -> None:
    agent: AgentProcess = agent_factory()
    agent.socket_dir.chmod(0o700)  # the runtime_dir: VM serial sockets
    line = next(line for line in _refused(agent).splitlines() if "cannot start" in line)
    assert f"cannot traverse {agent.socket_dir} on the way to runtime_dir {agent.socket_dir}" in line


def test_an_unreachable_disk_is_failed_precondition_not_a_lost_connection(
        agent_factory: Any, registry: RunningRegistry, tmp_path: Path) -> None:
    agent: AgentProcess = agent_factory().start()
    image = push_empty_disk_image(registry, tmp_path)
    pod = create_pod(agent, image, tmp_path / "logs")
    directory = agent.state_dir / "sandboxes" / pod.sandbox_id / "containers" / pod.container_id
    try:
        assert directory.is_dir()
        directory.chmod(0o700)  # after the start-up check: behind the agent's back
        with pytest.raises(grpc.RpcError) as exc_info:
            agent.runtime.StartContainer(pb.StartContainerRequest(container_id=pod.container_id), timeout=120)
        err = exc_info.value
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
        assert str(directory) in err.details()
        assert "Permission denied" in err.details()
        # The connection was never in question: it was neither dropped nor re-opened.
        log = agent.log()
        assert "libvirt connection lost" not in log
        assert log.count('"libvirt connected"') == 1, log
        assert agent.runtime.Version(pb.VersionRequest(), timeout=10).runtime_name == "podvisor"
        status = agent.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=pod.container_id),
                                               timeout=10).status
        assert status.state == pb.CONTAINER_CREATED
        # Once the directory is reachable again the same container starts.
        directory.chmod(0o711)
        agent.runtime.StartContainer(pb.StartContainerRequest(container_id=pod.container_id), timeout=120)
        remove_pod(agent, pod)
    finally:
        purge_domain(pod)
