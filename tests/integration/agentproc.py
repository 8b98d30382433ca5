"""Run the real podvisor-agent as a child process with its own socket and state.

Every test gets its own state directory, socket and CNI config directory, so
runs never collide; the fixture kills the process even when the test fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2_grpc

from agent.api.gen.podvisor.v1 import podvisor_pb2_grpc
from agent.api.gen.runtime.v1 import api_pb2, api_pb2_grpc

AGENT = [sys.executable, "-m", "agent"]


class AgentProcess:
    def __init__(self, workdir: Path, *, state_dir: Path | None = None,
                 cni_conf_dir: Path | None = None, extra_config: str = "",
                 env: dict[str, str] | None = None, network: bool = False,
                 command: list[str] | None = None) -> None:
        self.workdir = workdir
        self.command = command or AGENT  # another installation's podvisor-agent, say
        # Unix socket paths are limited to 107 bytes: keep it short.
        self.socket_dir = Path(tempfile.mkdtemp(prefix="pv-", dir="/tmp"))
        # It is also the runtime_dir, and QEMU's user must traverse both it and
        # the state directory (the agent checks at start): pytest's tmp tree
        # is private (0700), so a default state lives in a 0711 directory.
        self.socket_dir.chmod(0o711)
        self.socket = self.socket_dir / "agent.sock"
        self._own_state: Path | None = None
        if state_dir is None:
            self._own_state = Path(tempfile.mkdtemp(prefix="pv-state-", dir="/var/tmp"))
            self._own_state.chmod(0o711)
            state_dir = self._own_state / "state"
        self.state_dir = state_dir
        self.cni_conf_dir = cni_conf_dir or workdir / "cni"
        self.cni_conf_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"agent-{int(time.time() * 1000)}.log"
        self.config_path = workdir / "agent.toml"
        self.config_path.write_text(
            f'state_dir = "{self.state_dir}"\n'
            f'runtime_dir = "{self.socket_dir}"\n'
            f"[server]\nsocket = \"{self.socket}\"\nshutdown_grace_seconds = 5\n"
            f"[libvirt]\nreconnect_interval_seconds = 0.5\n"
            f"[cni]\nenabled = {'true' if network else 'false'}\nconf_dirs = [\"{self.cni_conf_dir}\"]\n"
            f"[log]\nformat = \"json\"\nlevel = \"debug\"\n"
            # Agents of parallel runs must not fight over the fixed metrics port.
            + ("" if "[metrics]" in extra_config else "[metrics]\nport = 0\n")
            + extra_config
        )
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._channel: grpc.Channel | None = None

    def start(self, timeout: float = 60.0, wait: bool = True) -> AgentProcess:
        env = dict(os.environ)
        env.update(self.env or {})
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([*self.command, "--config", str(self.config_path)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            if self.socket.exists():
                try:
                    self.runtime.Version(api_pb2.VersionRequest(), timeout=2)
                    return
                except grpc.RpcError:
                    # A channel that failed once backs off for seconds: renew it.
                    self.close_channel()
            time.sleep(0.05)
        raise AssertionError(f"agent did not come up in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-20000:]
        except OSError:
            return ""

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            # A local subchannel pool: grpc otherwise shares connection state
            # (and reconnect backoff) between channels to the same socket.
            self._channel = grpc.insecure_channel(
                f"unix:{self.socket}", options=[("grpc.use_local_subchannel_pool", 1)]
            )
        return self._channel

    @property
    def runtime(self) -> Any:
        return api_pb2_grpc.RuntimeServiceStub(self.channel)

    @property
    def images(self) -> Any:
        return api_pb2_grpc.ImageServiceStub(self.channel)

    @property
    def host(self) -> Any:
        return podvisor_pb2_grpc.HostStub(self.channel)

    @property
    def health(self) -> Any:
        return health_pb2_grpc.HealthStub(self.channel)

    def close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill9(self) -> None:
        """SIGKILL: what a crash or the OOM killer does."""
        self.close_channel()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        """Graceful stop, then SIGKILL if it hangs; never raises."""
        self.close_channel()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if hasattr(self, "_log"):
            self._log.close()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.socket_dir, ignore_errors=True)
        if self._own_state is not None:
            shutil.rmtree(self._own_state, ignore_errors=True)


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[Any]:
    """Make agents (started or not); all are stopped and cleaned at teardown."""
    made: list[AgentProcess] = []

    def make(**kwargs: Any) -> AgentProcess:
        a = AgentProcess(tmp_path, **kwargs)
        made.append(a)
        return a

    try:
        yield make
    finally:
        for a in made:
            a.cleanup()


@pytest.fixture
def running_agent(agent_factory: Any) -> AgentProcess:
    agent: AgentProcess = agent_factory().start()
    return agent
