"""podvisorctl against a real podvisor-agent process.

The agent runs as a child process on its own socket and state directory; a
sandbox is made over gRPC (as kubelet would), then every podvisorctl command
is run as the operator would run it, checking output and exit status.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agent.api.gen.runtime.v1 import api_pb2, api_pb2_grpc

pytestmark = pytest.mark.integration


def _ctl_command() -> list[str]:
    """The installed console script when there is one, else the module."""
    script = Path(sys.executable).parent / "podvisorctl"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "agent.cli.main"]


class Agent:
    def __init__(self, socket: Path, log_path: Path, proc: subprocess.Popen[bytes]) -> None:
        self.socket = socket
        self.log_path = log_path
        self.proc = proc

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-10000:]


@pytest.fixture
def running_agent(tmp_path: Path) -> Iterator[Agent]:
    # A unix socket path must stay under 108 bytes: keep it out of tmp_path.
    sock_dir = Path(tempfile.mkdtemp(prefix="pvctl-", dir="/tmp"))
    # QEMU's user must traverse the state and runtime directories (checked at
    # start); pytest's tmp tree is private, so both live in sock_dir.
    sock_dir.chmod(0o711)
    sock = sock_dir / "agent.sock"
    cni_dir = tmp_path / "cni"  # empty: the test touches no host network config
    cni_dir.mkdir()
    config = tmp_path / "agent.toml"
    config.write_text(
        f'state_dir = "{sock_dir / "state"}"\n'
        f'runtime_dir = "{sock_dir}"\n'
        f'[server]\nsocket = "{sock}"\nshutdown_grace_seconds = 2.0\n'
        # No pod networking: with none configured the agent would use its
        # built-in bridge on the host, which this test must not touch.
        f'[cni]\nenabled = false\nconf_dirs = ["{cni_dir}"]\n'
        '[log]\nformat = "json"\nlevel = "debug"\n'
        '[metrics]\nport = 0\n'  # never the fixed port another agent may hold
    )
    log_path = tmp_path / "agent.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "--config", str(config)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    agent = Agent(sock, log_path, proc)
    try:
        deadline = time.monotonic() + 90
        while not sock.exists():
            if proc.poll() is not None:
                pytest.fail(f"agent exited with {proc.returncode}:\n{agent.log()}")
            if time.monotonic() > deadline:
                pytest.fail(f"agent did not create its socket:\n{agent.log()}")
            time.sleep(0.05)
        yield agent
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(sock_dir, ignore_errors=True)


def ctl(
    agent: Agent | None, *args: str, sock_path: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run podvisorctl against the agent (or an explicit socket path)."""
    sock = sock_path if sock_path is not None else str(agent.socket if agent else "")
    env = {k: v for k, v in os.environ.items() if k != "PODVISOR_SOCKET"}
    return subprocess.run(
        [*_ctl_command(), "--socket", sock, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def _run_sandbox(sock: Path, log_dir: Path) -> str:
    with grpc.insecure_channel(f"unix:{sock}") as channel:
        runtime = api_pb2_grpc.RuntimeServiceStub(channel)
        config = api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(
                name="ctl-vm", namespace="ctl-ns", uid="ctl-uid-1", attempt=0
            ),
            hostname="ctl-vm",
            log_directory=str(log_dir),
            labels={"app": "ctl", "tier": "test"},
            annotations={"podvisor.io/vcpus": "1"},
        )
        resp = runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config), timeout=30)
        return str(resp.pod_sandbox_id)


def test_podvisorctl_drives_a_real_agent(running_agent: Agent, tmp_path: Path) -> None:
    sandbox_id = _run_sandbox(running_agent.socket, tmp_path / "pod-logs")
    assert len(sandbox_id) == 64
    short = sandbox_id[:13]

    r = ctl(running_agent, "version")
    assert r.returncode == 0, r.stderr
    assert "podvisor" in r.stdout
    r = ctl(running_agent, "--output", "json", "version")
    assert r.returncode == 0, r.stderr
    version = json.loads(r.stdout)
    assert version["runtime_name"] == "podvisor"
    assert version["runtime_api_version"] == "v1"

    r = ctl(running_agent, "host-info")
    assert r.returncode == 0, r.stderr
    assert "virt_type" in r.stdout
    r = ctl(running_agent, "-o", "json", "host-info")
    assert r.returncode == 0, r.stderr
    host = json.loads(r.stdout)
    assert host["virt_type"] in ("kvm", "qemu")
    assert host["virt_type_reason"]

    r = ctl(running_agent, "status")
    assert r.returncode == 0, r.stderr
    assert "RuntimeReady" in r.stdout and "NetworkReady" in r.stdout

    # The table: short id, name, namespace and state of the sandbox.
    r = ctl(running_agent, "pods")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:2] == ["POD", "ID"]
    row = next(line for line in lines if line.startswith(short))
    assert sandbox_id not in row  # truncated to 13 characters
    assert row.split()[1:5] == ["ctl-vm", "ctl-ns", "0", "Ready"]

    assert short in ctl(running_agent, "pods", "--label", "app=ctl").stdout
    assert short not in ctl(running_agent, "pods", "--label", "app=other").stdout
    assert short in ctl(running_agent, "pods", "--state", "ready").stdout
    assert short not in ctl(running_agent, "pods", "--state", "notready").stdout
    r = ctl(running_agent, "-o", "json", "pods")
    assert r.returncode == 0, r.stderr
    items = json.loads(r.stdout)["items"]
    assert [i["id"] for i in items] == [sandbox_id]
    assert items[0]["state"] == "SANDBOX_READY"

    # inspect-pod accepts a prefix and expands the verbose info document.
    r = ctl(running_agent, "inspect-pod", short)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["status"]["id"] == sandbox_id
    assert doc["status"]["metadata"]["name"] == "ctl-vm"
    assert doc["info"]["info"]["hostname"] == "ctl-vm"

    r = ctl(running_agent, "inspect-pod", "0" * 64)
    assert r.returncode == 1
    assert r.stderr.startswith("podvisorctl: NOT_FOUND: ")
    assert r.stdout == ""

    r = ctl(running_agent, "stop-pod", sandbox_id)
    assert r.returncode == 0, r.stderr
    assert short in ctl(running_agent, "pods", "--state", "notready").stdout

    r = ctl(running_agent, "rm-pod", short)
    assert r.returncode == 0, r.stderr
    assert short not in ctl(running_agent, "pods").stdout
    # CRI: removing what is already gone succeeds.
    assert ctl(running_agent, "rm-pod", sandbox_id).returncode == 0
    r = ctl(running_agent, "inspect-pod", sandbox_id)
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr

    # Invalid ids are the agent's INVALID_ARGUMENT, reported in one line.
    r = ctl(running_agent, "rm-pod", "a/b")
    assert r.returncode == 1
    assert r.stderr.startswith("podvisorctl: INVALID_ARGUMENT: pod_sandbox_id")
    assert "Traceback" not in r.stderr


def test_unreachable_socket_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.sock"
    r = ctl(None, "pods", sock_path=str(missing))
    assert r.returncode == 1
    assert r.stderr.startswith("podvisorctl: ")
    assert str(missing) in r.stderr
    assert "Traceback" not in r.stderr

    not_a_socket = tmp_path / "file"
    not_a_socket.write_text("")
    r = ctl(None, "version", sock_path=str(not_a_socket))
    assert r.returncode == 1
    assert "not a unix socket" in r.stderr

    # A socket left behind by a killed agent: bound, nobody listening.
    stale_dir = Path(tempfile.mkdtemp(prefix="pvctl-", dir="/tmp"))
    try:
        stale = stale_dir / "stale.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(str(stale))
            r = ctl(None, "status", sock_path=str(stale))
        assert r.returncode == 1
        assert "stale" in r.stderr and str(stale) in r.stderr
    finally:
        shutil.rmtree(stale_dir, ignore_errors=True)
