"""systemd's watchdog, as systemd would see it: a real AF_UNIX datagram socket
passed as NOTIFY_SOCKET with WATCHDOG_USEC set. WATCHDOG=1 keeps coming while
the agent's loops turn, and stops once one of them is wedged
(``PODVISOR_WEDGE=<loop>@<trigger file>``, agent/faults.py)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import faults
from agent.api.gen.runtime.v1 import api_pb2 as pb
from tests.integration.agentproc import AgentProcess

INTERVAL_S = 4.0  # WATCHDOG_USEC: pings every 2 s
PERIOD_S = INTERVAL_S / 2


class NotifySocket:
    """What systemd listens on: every datagram received, with when it came."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pv-notify-", dir="/tmp"))
        self.path = self.dir / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.append((time.monotonic(), data.decode()))

    def pings(self) -> int:
        with self._lock:
            return sum(1 for _, m in self.messages if "WATCHDOG=1" in m.splitlines())

    def saw(self, line: str) -> bool:
        with self._lock:
            return any(line in m.splitlines() for _, m in self.messages)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    ns = NotifySocket()
    try:
        yield ns
    finally:
        ns.close()


def wait_for(what: str, check: Any, agent: AgentProcess, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        assert agent.proc is not None and agent.proc.poll() is None, f"agent exited:\n{agent.log()}"
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout} s:\n{agent.log()[-6000:]}")


def start_agent(agent_factory: Any, ns: NotifySocket, **env: str) -> AgentProcess:
    agent: AgentProcess = agent_factory(env={"NOTIFY_SOCKET": str(ns.path),
                                             "WATCHDOG_USEC": str(int(INTERVAL_S * 1_000_000)), **env})
    agent.config_path.write_text(agent.config_path.read_text().replace(
        "[libvirt]\n", '[libvirt]\nvirt_type = "qemu"\n'))
    return agent.start()


@pytest.mark.parametrize("loop", faults.LOOPS)
def test_pings_stop_when_a_loop_is_wedged(agent_factory: Any, notify_socket: NotifySocket, tmp_path: Path,
                                          loop: str) -> None:
    trigger = tmp_path / "wedge-now"
    agent = start_agent(agent_factory, notify_socket, **{faults.WEDGE_ENV: f"{loop}@{trigger}"})
    wait_for("READY=1", lambda: notify_socket.saw("READY=1"), agent)
    # Pings while every loop turns (the test hook is armed, not triggered).
    wait_for("three WATCHDOG=1", lambda: notify_socket.pings() >= 3, agent)
    agent.runtime.Version(pb.VersionRequest(), timeout=10)

    trigger.touch()
    wait_for(f"the {loop} loop wedged", lambda: f"loop {loop} wedged" in agent.log(), agent)
    wait_for("the watchdog's verdict", lambda: "WATCHDOG=1 withheld" in agent.log(), agent)
    assert f'"loops": ["{loop}"]' in agent.log()
    time.sleep(0.5)  # a ping sent just before the verdict may still be on its way
    seen = notify_socket.pings()
    time.sleep(3 * PERIOD_S)  # three rounds of the watchdog's thread
    assert notify_socket.pings() == seen, "WATCHDOG=1 was sent although a loop is wedged"
    assert agent.proc is not None and agent.proc.poll() is None  # systemd, not the agent, restarts it


def test_no_pings_when_the_watchdog_belongs_to_another_process(agent_factory: Any,
                                                               notify_socket: NotifySocket) -> None:
    agent = start_agent(agent_factory, notify_socket, WATCHDOG_PID=str(os.getpid()))
    wait_for("READY=1", lambda: notify_socket.saw("READY=1"), agent)
    time.sleep(3 * PERIOD_S)
    assert notify_socket.pings() == 0
    assert "watchdog on" not in agent.log()


def test_pings_keep_coming_while_every_loop_turns(agent_factory: Any, notify_socket: NotifySocket) -> None:
    """No WATCHDOG_PID (systemd may leave it out): the agent pings, and keeps pinging."""
    agent = start_agent(agent_factory, notify_socket)
    wait_for("five WATCHDOG=1", lambda: notify_socket.pings() >= 5, agent)
    agent.runtime.Version(pb.VersionRequest(), timeout=10)
    assert "WATCHDOG=1 withheld" not in agent.log()
    assert '"watchdog on"' in agent.log()
