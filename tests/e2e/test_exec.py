"""ExecSync and Exec in the stock Debian 12 guest (images/debian), under TCG,
through real libvirt, the real guest agent and the guest's real sshd.

One VM pod for the module, on a private pod network. The first ExecSync is
sent right after StartContainer, while the guest still boots: it must wait for
the agent and succeed. ExecSync goes through the agent's gRPC API; streaming
Exec is driven through ``ExecService.exec`` in this process with the real
adapters (libvirt, the VM's keys in the agent's state, paramiko), since the
streaming server is not part of this piece: the container and its sandbox are
read from the running agent's own answers.
"""

from __future__ import annotations

import json
import queue
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.adapters.exec_keys import ExecKeys
from agent.adapters.libvirt import Libvirt
from agent.adapters.ssh import GuestSSH
from agent.api.gen.runtime.v1 import api_pb2 as pb
from agent.domain.sandbox import Sandbox
from agent.domain.vm import Container, ContainerState
from agent.services.exec import ExecService
from agent.streaming.backend import Streams, TermSize
from tests.e2e.conftest import DEBIAN_MEMORY, VM, VMAgent, pod_network_agent
from tests.services.container_fakes import record, sandbox

pytestmark = pytest.mark.e2e

HOSTNAME = f"exec-{secrets.token_hex(3)}"
# The first ExecSync waits for a booting guest's agent within its own timeout.
FIRST_CALL_TIMEOUT_S = 900


@dataclass
class ExecVM:
    vma: VMAgent
    vm: VM
    pod_ip: str
    directory: str
    domain: str
    first: pb.ExecSyncResponse | grpc.RpcError

    def exec_sync(self, cmd: list[str], timeout: int = 60) -> pb.ExecSyncResponse:
        return self.vma.agent.runtime.ExecSync(
            pb.ExecSyncRequest(container_id=self.vm.container_id, cmd=cmd, timeout=timeout),
            timeout=timeout + 60 if timeout else 600)


@pytest.fixture(scope="module")
def exec_vm(debian_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExecVM]:
    workdir = tmp_path_factory.mktemp("exec-vm")
    with pod_network_agent(workdir, debian_image) as (vma, _net):
        vm = vma.create(HOSTNAME, hostname=HOSTNAME, memory=DEBIAN_MEMORY)
        pod_ip = vma.agent.runtime.PodSandboxStatus(
            pb.PodSandboxStatusRequest(pod_sandbox_id=vm.sandbox_id), timeout=30).status.network.ip
        info = json.loads(vma.status(vm, verbose=True).info["info"])
        vma.start(vm)
        first: pb.ExecSyncResponse | grpc.RpcError
        try:
            first = vma.agent.runtime.ExecSync(
                pb.ExecSyncRequest(container_id=vm.container_id, cmd=["hostname"], timeout=FIRST_CALL_TIMEOUT_S),
                timeout=FIRST_CALL_TIMEOUT_S + 60)
        except grpc.RpcError as exc:
            first = exc
        yield ExecVM(vma, vm, pod_ip, info["directory"], info["domain"], first)


def test_exec_sync_right_after_start_waits_for_the_agent(exec_vm: ExecVM) -> None:
    first = exec_vm.first
    assert not isinstance(first, grpc.RpcError), (first.code(), first.details(), exec_vm.vma.agent.log()[-3000:])
    assert (first.exit_code, first.stdout.decode().strip(), first.stderr) == (0, HOSTNAME, b"")


def test_hostname_is_the_sandboxs(exec_vm: ExecVM) -> None:
    r = exec_vm.exec_sync(["hostname"])
    assert (r.exit_code, r.stdout.decode().strip()) == (0, HOSTNAME)


def test_a_failing_command_gives_its_exit_code_and_stderr(exec_vm: ExecVM) -> None:
    r = exec_vm.exec_sync(["sh", "-c", "echo to-out; echo to-err >&2; exit 7"])
    assert (r.exit_code, r.stdout, r.stderr) == (7, b"to-out\n", b"to-err\n")


def test_a_missing_program_exits_127(exec_vm: ExecVM) -> None:
    r = exec_vm.exec_sync(["/no/such/program"])
    assert r.exit_code == 127
    assert b"/no/such/program" in r.stderr


def test_a_timeout_fails_as_deadline_exceeded_and_kills_the_command(exec_vm: ExecVM) -> None:
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as exc:
        exec_vm.exec_sync(["sh", "-c", "sleep 1234; echo never"], timeout=2)
    elapsed = time.monotonic() - start
    assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, exc.value.details()
    assert "timed out" in exc.value.details()
    # Failed long before the command could have ended on its own (1234 s);
    # the kill and its clean-up take a few agent round trips under TCG.
    assert elapsed < 120
    # Neither the shell nor its child survived.
    left = exec_vm.exec_sync(["pgrep", "-f", "sleep 1234"])
    assert (left.exit_code, left.stdout) == (1, b""), left


def test_a_probe_like_loop_of_20_calls_succeeds(exec_vm: ExecVM) -> None:
    codes = [exec_vm.exec_sync(["cat", "/etc/hostname"], timeout=10) for _ in range(20)]
    assert [(r.exit_code, r.stdout.decode().strip()) for r in codes] == [(0, HOSTNAME)] * 20


def test_a_stopped_or_unknown_container_is_refused_clearly(exec_vm: ExecVM) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        exec_vm.vma.agent.runtime.ExecSync(pb.ExecSyncRequest(container_id="f" * 64, cmd=["true"]), timeout=30)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as exc:
        exec_vm.vma.agent.runtime.ExecSync(pb.ExecSyncRequest(container_id=exec_vm.vm.container_id, cmd=[]),
                                           timeout=30)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cmd" in exc.value.details()


# -- streaming exec through ExecService.exec ------------------------------------------------


class AgentContainers:
    """The running agent's view of the module's container, as a ContainerLookup."""

    def __init__(self, ev: ExecVM) -> None:
        self.ev = ev

    def get(self, container_id: str) -> Container:
        st = self.ev.vma.status(self.ev.vm).status
        assert st.state == pb.CONTAINER_RUNNING
        c = record(container_id, ContainerState.RUNNING, sandbox_id=self.ev.vm.sandbox_id)
        return replace(c, domain_name=self.ev.domain, directory=self.ev.directory)


class AgentSandboxes:
    def __init__(self, ev: ExecVM) -> None:
        self.ev = ev

    def get(self, sandbox_id: str) -> Sandbox:
        return replace(sandbox(sandbox_id), ip=self.ev.pod_ip)

    def hold(self, sandbox_id: str) -> Any:
        raise AssertionError("exec never holds a sandbox")


@pytest.fixture(scope="module")
def service(exec_vm: ExecVM) -> Iterator[ExecService]:
    libvirt = Libvirt("qemu:///system")
    libvirt.start()
    try:
        yield ExecService(AgentContainers(exec_vm), libvirt, sandboxes=AgentSandboxes(exec_vm), keys=ExecKeys(),
                          shell=GuestSSH(), guest_ready_timeout_s=600)
    finally:
        libvirt.close()


class Out:
    def __init__(self) -> None:
        self.data = b""
        self.lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self.lock:
            self.data += data


class In:
    """Gives its chunks once ``ready`` is set (or at once), then EOF."""

    def __init__(self, *chunks: bytes, ready: threading.Event | None = None) -> None:
        self.chunks = list(chunks)
        self.ready = ready

    def read(self, n: int = 65536) -> bytes:
        if self.ready is not None:
            assert self.ready.wait(120), "the resize was never taken"
        return self.chunks.pop(0) if self.chunks else b""


class Sizes:
    def __init__(self, size: TermSize) -> None:
        self.q: queue.Queue[TermSize] = queue.Queue()
        self.q.put(size)
        self.taken = threading.Event()

    def get(self, timeout: float | None = None) -> TermSize | None:
        try:
            size = self.q.get(timeout=timeout)
        except queue.Empty:
            return None
        self.taken.set()
        return size


def test_exec_without_tty_streams_stdin_stdout_stderr_and_the_exit_code(exec_vm: ExecVM,
                                                                          service: ExecService) -> None:
    out, err = Out(), Out()
    status = service.exec(exec_vm.vm.container_id, ["sh", "-c", "cat; echo done-err >&2; exit 3"], False,
                          Streams(stdin=In(b"hello ", b"guest\n"), stdout=out, stderr=err, resize=None))
    assert (status.code, out.data, err.data) == (3, b"hello guest\n", b"done-err\n")


def test_exec_with_tty_is_an_interactive_shell_with_resize(exec_vm: ExecVM, service: ExecService) -> None:
    out = Out()
    sizes = Sizes(TermSize(width=111, height=33))
    # Typed once the resize was taken; the shell waits a moment so the
    # window change is in before it asks the terminal.
    typed = In(b"sleep 2; stty size; echo answer-$((6*7)); tty; exit 5\n", ready=sizes.taken)
    status = service.exec(exec_vm.vm.container_id, ["/bin/bash", "-i"], True,
                          Streams(stdin=typed, stdout=out, stderr=None, resize=sizes))
    text = out.data.decode(errors="replace")
    assert status.code == 5, text
    assert "33 111" in text
    assert "answer-42" in text
    assert "/dev/pts/" in text


def test_exec_arguments_reach_the_guest_as_one_argv(exec_vm: ExecVM, service: ExecService) -> None:
    out = Out()
    argv = ["printf", "%s|", "two words", "it's", "$HOME", ";true"]
    status = service.exec(exec_vm.vm.container_id, argv, False,
                          Streams(stdin=None, stdout=out, stderr=Out(), resize=None))
    assert (status.code, out.data) == (0, b"two words|it's|$HOME|;true|")


def test_exec_keys_are_private_files_of_the_container(exec_vm: ExecVM) -> None:
    key = Path(exec_vm.directory) / "exec_ssh_key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert b"PRIVATE KEY" not in exec_vm.vma.agent.log().encode()
