"""Attach and PortForward, the runtime side, on a real tiny guest under TCG.

The services are called directly with their real adapters (the console
multiplexer on the VM's real serial socket, the pod dialer on the real pod
network); the streaming server in front of them is tested on its own. The
agent runs as a process, as in production; the services here find its
containers and sandboxes through its gRPC API (a lookup adapter below).

One VM on the pod network serves every test of the module; the last test
stops it.
"""

from __future__ import annotations

import errno
import json
import queue
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.adapters.console import ConsoleHub, ConsoleSession
from agent.adapters.network.dial import PodDialer
from agent.api.gen.runtime.v1 import api_pb2 as pb
from agent.domain.errors import FailedPrecondition
from agent.domain.sandbox import Metadata, NetworkMode, Sandbox, SandboxSpec, SandboxState
from agent.domain.vm import Container, ContainerState
from agent.services.attach import AttachService
from agent.services.port_forward import PortForwardService
from agent.streaming.backend import Streams
from tests.e2e.conftest import VM, VMAgent, purge_domains
from tests.integration.agentproc import AgentProcess
from tests.integration.test_sandbox_network import remove_all_pod_networks

HOSTNAME = "io-vm"


class AgentContainers:
    """The ``ContainerLookup`` port over the agent's gRPC API (its
    ContainerStatus, verbose for the serial socket's path)."""

    _STATES = {pb.CONTAINER_CREATED: ContainerState.CREATED, pb.CONTAINER_RUNNING: ContainerState.RUNNING,
               pb.CONTAINER_EXITED: ContainerState.EXITED, pb.CONTAINER_UNKNOWN: ContainerState.UNKNOWN}

    def __init__(self, agent: AgentProcess) -> None:
        self.agent = agent

    def get(self, container_id: str) -> Container:
        resp = self.agent.runtime.ContainerStatus(
            pb.ContainerStatusRequest(container_id=container_id, verbose=True), timeout=30)
        st, info = resp.status, json.loads(resp.info["info"])
        return Container(id=st.id, sandbox_id="", name=st.metadata.name, attempt=st.metadata.attempt,
                         image=st.image.image, image_id=st.image_id, state=self._STATES[st.state],
                         created_at_ns=st.created_at, domain_name=info["domain"], directory=info["directory"],
                         overlay_path=info["overlay"], seed_path=info["seed"], console_log=info["consoleLog"],
                         serial_socket=info["serialSocket"], log_path=st.log_path, vcpus=info["vcpus"],
                         max_vcpus=info["maxVcpus"], memory_bytes=info["memoryBytes"],
                         max_memory_bytes=info["maxMemoryBytes"])


class AgentSandboxes:
    """The ``SandboxLookup`` port over the agent's gRPC API."""

    def __init__(self, agent: AgentProcess) -> None:
        self.agent = agent

    def get(self, sandbox_id: str) -> Sandbox:
        st = self.agent.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id),
                                                 timeout=30).status
        mode = NetworkMode.NODE if st.linux.namespaces.options.network == pb.NODE else NetworkMode.POD
        return Sandbox(id=st.id, spec=SandboxSpec(metadata=Metadata(st.metadata.name, st.metadata.namespace,
                                                                    st.metadata.uid), network_mode=mode),
                       state=SandboxState.READY if st.state == pb.SANDBOX_READY else SandboxState.NOTREADY,
                       created_at_ns=st.created_at, ip=st.network.ip)

    def hold(self, sandbox_id: str) -> AbstractContextManager[None]:
        return nullcontext()


class CountingConsoles:
    """The real ConsoleHub; counts joins so a test knows a client is in."""

    def __init__(self) -> None:
        self.hub = ConsoleHub()
        self.joins = 0
        self.joined = threading.Condition()

    def join(self, key: str, socket_path: str) -> ConsoleSession:
        session = self.hub.join(key, socket_path)
        with self.joined:
            self.joins += 1
            self.joined.notify_all()
        return session

    def wait_joins(self, n: int, timeout: float = 30) -> None:
        with self.joined:
            assert self.joined.wait_for(lambda: self.joins >= n, timeout), f"{self.joins} joins, not {n}"


class Client:
    """One attached client: stdin the test types into, the stdout it saw."""

    def __init__(self) -> None:
        self.typed: queue.Queue[bytes] = queue.Queue()
        self.seen = bytearray()
        self.cond = threading.Condition()
        self.gone = False
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    # Input
    def read(self, n: int = 65536) -> bytes:
        return self.typed.get()

    # Output
    def write(self, data: bytes) -> None:
        if self.gone:
            raise BrokenPipeError("the client left")
        with self.cond:
            self.seen += data
            self.cond.notify_all()

    def type(self, text: str) -> None:
        self.typed.put(text.encode())

    def wait_for(self, text: str, timeout: float = 60) -> str:
        with self.cond:
            ok = self.cond.wait_for(lambda: text.encode() in self.seen, timeout)
            out = self.seen.decode(errors="replace")
        assert ok, f"{text!r} not seen on the console in {timeout}s:\n{out[-3000:]}"
        return out

    def leave(self) -> None:
        """Gone: the next output written to it fails (its stdin stays open,
        so what it typed last still reaches the console)."""
        self.gone = True

    def start(self, svc: AttachService, container_id: str) -> Client:
        def run() -> None:
            try:
                svc.attach(container_id, False, Streams(self, self, None, None))
            except BaseException as exc:  # noqa: BLE001 - checked by the test
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        return self

    def ended(self, timeout: float = 60) -> bool:
        assert self.thread is not None
        self.thread.join(timeout)
        if self.thread.is_alive():
            return False
        self.typed.put(b"")  # let the attach's stdin reader go
        return True


@dataclass
class Pod:
    vma: VMAgent
    vm: VM
    ip: str


@pytest.fixture(scope="module")
def pod(tiny_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    work = tmp_path_factory.mktemp("io")
    state = Path(tempfile.mkdtemp(prefix="pv-e2e-io-", dir="/var/tmp"))
    state.chmod(0o711)
    suffix = secrets.token_hex(3)
    bridge, subnet = f"pvt{suffix}", f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}.0/24"
    conf = work / "net.d"
    conf.mkdir()
    (conf / "10-e2e.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": f"e2e-{suffix}",
        "plugins": [{"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False, "hairpinMode": True,
                     "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                              "dataDir": str(work / "ipam"), "routes": [{"dst": "0.0.0.0/0"}]}}]}))
    agent = AgentProcess(work, state_dir=state / "state", cni_conf_dir=conf, network=True)
    agent.config_path.write_text(agent.config_path.read_text().replace(
        "[libvirt]\n", '[libvirt]\nvirt_type = "qemu"\n'))
    vma = VMAgent(agent, tiny_image, work / "pods")
    try:
        agent.start()
        vm = vma.create("io", hostname=HOSTNAME)
        vma.start(vm)
        ip = vma.agent.runtime.PodSandboxStatus(
            pb.PodSandboxStatusRequest(pod_sandbox_id=vm.sandbox_id), timeout=30).status.network.ip
        vma.wait_log(vm, "PODVISOR-READY", timeout=240)
        vma.wait_log(vm, f"ip={ip}", timeout=240)
        yield Pod(vma, vm, ip)
    finally:
        try:
            for sb in agent.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items:
                vma.remove_pod(VM(sb.id, "", Path()))
        except Exception:  # noqa: BLE001 - virsh and ip clean below
            pass
        purge_domains(agent.state_dir)
        remove_all_pod_networks(agent)
        agent.cleanup()
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        shutil.rmtree(state, ignore_errors=True)


def http_get(sock: Any) -> str:
    with sock:
        sock.sendall(b"GET / HTTP/1.0\r\nHost: pod\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.decode(errors="replace")


def port_forward(pod: Pod, port: int, timeout: float = 10) -> Any:
    return PortForwardService(AgentSandboxes(pod.vma.agent), PodDialer()).port_forward(
        pod.vm.sandbox_id, port, timeout)


def test_port_forward_reaches_the_guests_http_server(pod: Pod) -> None:
    deadline = time.monotonic() + 60
    while True:  # the guest's httpd starts around its ready line
        try:
            reply = http_get(port_forward(pod, 80))
            break
        except FailedPrecondition:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    assert reply.startswith("HTTP/1.")
    assert reply.rstrip().splitlines()[-1] == HOSTNAME


def test_port_forward_serves_concurrent_connections(pod: Pod) -> None:
    conns = [port_forward(pod, 80) for _ in range(5)]  # all open at once
    replies: list[str] = [""] * len(conns)

    def fetch(i: int) -> None:
        replies[i] = http_get(conns[i])

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(len(conns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r.rstrip().splitlines()[-1] if r else "" for r in replies] == [HOSTNAME] * len(conns)


def test_port_forward_to_a_closed_port_is_refused_clearly(pod: Pod) -> None:
    with pytest.raises(FailedPrecondition, match="port 81 of pod sandbox .*connection refused"):
        port_forward(pod, 81)


def test_the_pod_namespace_itself_has_no_route_to_the_vm(pod: Pod) -> None:
    """Why the dialer connects from the host (docs/networking.md#port-forward):
    inside the pod's namespace the pod IP is unreachable."""
    probe = ("import socket,sys\n"
             "try:\n"
             f"    socket.create_connection(({pod.ip!r}, 80), timeout=5)\n"
             "    print('connected')\n"
             "except OSError as e:\n"
             "    print(type(e).__name__, e.errno)\n")
    out = subprocess.run(["ip", "netns", "exec", f"podvisor-{pod.vm.sandbox_id}", sys.executable, "-c", probe],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["OSError", str(errno.ENETUNREACH)], out.stdout


def test_two_clients_attach_at_once_and_the_log_keeps_growing(pod: Pod) -> None:
    consoles = CountingConsoles()
    svc = AttachService(AgentContainers(pod.vma.agent), consoles)
    cid = pod.vm.container_id
    log_before = pod.vm.log_path.read_text(errors="replace")
    a = Client().start(svc, cid)
    consoles.wait_joins(1)
    b = Client().start(svc, cid)
    consoles.wait_joins(2)
    assert consoles.hub.connected() == [cid]  # one connection to QEMU for both
    # busybox init offers a shell on ttyS0 after Enter ("askfirst"). The
    # markers are computed by the guest's shell, so the echo of what was
    # typed does not contain them. Typed again until the shell answers (the
    # first lines may reach the guest before the shell is there).
    for _ in range(20):
        a.type("\necho PV-FROM-A-$((6*7))\n")
        try:
            a.wait_for("PV-FROM-A-42", timeout=5)
            break
        except AssertionError:
            continue
    a.wait_for("PV-FROM-A-42")
    b.wait_for("PV-FROM-A-42")
    b.type("echo PV-FROM-B-$((2+3))\n")
    a.wait_for("PV-FROM-B-5")
    b.wait_for("PV-FROM-B-5")
    # virtlogd kept copying the console to the raw log while the agent held
    # the socket: the container log has the output of the attached session.
    text = pod.vma.wait_log(pod.vm, "PV-FROM-B-5", timeout=60)
    assert "PV-FROM-A-42" in text and len(text) > len(log_before)
    assert not a.ended(0) and not b.ended(0)

    # A leaves; it notices at the next output, B stays.
    a.leave()
    b.type("echo PV-AFTER-$((1+1))\n")
    b.wait_for("PV-AFTER-2")
    assert a.ended(30) and a.error is None
    b.type("echo PV-STILL-$((3+4))\n")
    b.wait_for("PV-STILL-7")
    # B leaves too (it notices at the next output); a new client still gets
    # the console, and once it leaves too the connection is closed.
    b.leave()
    c = Client().start(svc, cid)
    consoles.wait_joins(3)
    c.type("echo PV-C-$((4+5))\n")
    c.wait_for("PV-C-9")
    assert b.ended(30) and b.error is None
    c.leave()
    c.type("\n")
    assert c.ended(30) and c.error is None
    deadline = time.monotonic() + 10
    while consoles.hub.connected() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert consoles.hub.connected() == []
    assert pod.vma.wait_log(pod.vm, "PV-C-9", timeout=60)


def test_attach_ends_when_the_vm_stops(pod: Pod) -> None:
    """Last in the module: it stops the shared VM."""
    consoles = CountingConsoles()
    svc = AttachService(AgentContainers(pod.vma.agent), consoles)
    client = Client().start(svc, pod.vm.container_id)
    consoles.wait_joins(1)
    pod.vma.agent.runtime.StopContainer(pb.StopContainerRequest(container_id=pod.vm.container_id, timeout=60),
                                        timeout=120)
    assert client.ended(60), "attach still running after the VM stopped"
    assert client.error is None
    assert "PODVISOR-SHUTDOWN" in client.seen.decode(errors="replace")
    # A stopped container is refused before any connection is tried.
    with pytest.raises(FailedPrecondition, match="not running"):
        svc.attach(pod.vm.container_id, False, Streams(None, Client(), None, None))
