"""Generated and mutated CRI requests over a real agent's socket.

One agent (pod networking off) with one READY sandbox and one pulled image:
every RuntimeService and ImageService method gets random messages (ids
sometimes pointing at that sandbox, image or a container, so requests get
past the lookups), mutated encodings of valid requests, and random bytes, all
through a generic ``unary_unary`` with identity serializers.

Properties: no INTERNAL and no UNKNOWN; the agent keeps answering Version; a
refused request leaves no new file under the state or runtime directory; at
the end no libvirt domain refers to the agent's state and no namespace or
link carries one of its sandbox ids.
"""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.adapters.registry import RegistryClient
from agent.api.gen.runtime.v1 import api_pb2 as pb
from tests.fuzz.messages import request
from tests.integration.agentproc import AgentProcess
from tests.integration.registry_fixture import RunningRegistry, containerdisk_layer, push_image

SERVICES = {name: pb.DESCRIPTOR.services_by_name[name] for name in ("RuntimeService", "ImageService")}
METHODS = [(service, m) for service, d in SERVICES.items() for m in d.methods]
BAD_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
# Files the agent may change for any call: its database (SQLite WAL mode).
_DB_FILE = re.compile(r"\.(db|sqlite3?)(-wal|-shm|-journal)?$")
_ID = re.compile(r"\b[0-9a-f]{64}\b")


def _budget() -> settings:
    """Per method: an eighth of the profile's examples (ci: 5, fuzz: 625); calls are slow."""
    return settings(max_examples=max(3, settings.default.max_examples // 8))


def _identity(data: bytes) -> bytes:
    return data


@dataclass
class Target:
    """The fuzzed agent and the things requests may point at."""

    agent: AgentProcess
    registry: RunningRegistry
    image: str
    sandbox_id: str = ""
    sandbox_ids: set[str] = field(default_factory=set)
    containers: list[str] = field(default_factory=list)

    def run_sandbox(self) -> None:
        cfg = pb.PodSandboxConfig(metadata=pb.PodSandboxMetadata(name="fuzz", namespace="fuzz",
                                                                 uid=uuid.uuid4().hex))
        self.sandbox_id = self.agent.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg),
                                                           timeout=60).pod_sandbox_id
        self.sandbox_ids.add(self.sandbox_id)

    def ensure(self) -> None:
        """Put back what a fuzzed Stop/Remove took away (the sandbox, the image)."""
        try:
            st_ = self.agent.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=self.sandbox_id),
                                                      timeout=30)
            ready = st_.status.state == pb.SANDBOX_READY
        except grpc.RpcError:
            ready = False
        if not ready:
            self.run_sandbox()
        if not self.agent.images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=self.image)),
                                             timeout=30).HasField("image"):
            self.agent.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=self.image)), timeout=120)

    def files(self) -> set[str]:
        found = set()
        for root in (self.agent.state_dir, self.agent.socket_dir):
            for p in root.rglob("*"):
                if not _DB_FILE.search(p.name) and p.name != "agent.sock":
                    found.add(str(p))
        return found

    def call(self, service: str, method: Any, data: bytes) -> grpc.StatusCode:
        path = f"/runtime.v1.{service}/{method.name}"
        channel = self.agent.channel
        try:
            if method.server_streaming:
                stream = channel.unary_stream(path, request_serializer=_identity,
                                              response_deserializer=_identity)(data, timeout=2)
                try:
                    for _ in stream:
                        break
                finally:
                    stream.cancel()
                return grpc.StatusCode.OK
            channel.unary_unary(path, request_serializer=_identity,
                                response_deserializer=_identity)(data, timeout=60)
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.CANCELLED and method.server_streaming:
                return grpc.StatusCode.OK
            if code == grpc.StatusCode.DEADLINE_EXCEEDED and method.server_streaming:
                return grpc.StatusCode.OK  # an event stream with nothing to say
            assert code not in BAD_CODES, f"{method.name}: {code.name} {exc.details()}\n{self.agent.log()[-4000:]}"
            return code  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory, registry: RunningRegistry) -> Iterator[Target]:
    workdir = tmp_path_factory.mktemp("fuzz-agent")
    # docker.io goes nowhere: a fuzzed "busybox" must not reach the internet.
    agent = AgentProcess(workdir, extra_config=(
        '[[registries.rewrite]]\nprefix = "docker.io/"\nreplacement = "127.0.0.1:9/"\n'))
    disk = workdir / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True, timeout=60)
    name = f"podvisor-fuzz/{uuid.uuid4().hex[:12]}"
    with RegistryClient(timeout=30) as client:
        push_image(client, registry.repository(name), "v1",
                   [containerdisk_layer({"disk/disk.qcow2": disk.read_bytes()})])
    t = Target(agent, registry, f"{registry.host}/{name}:v1")
    try:
        agent.start()
        t.ensure()
        yield t
    finally:
        try:
            _assert_nothing_left(t)
        finally:
            for sid in t.sandbox_ids:
                try:
                    agent.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=60)
                    agent.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60)
                except grpc.RpcError:
                    pass
            agent.cleanup()


def _assert_nothing_left(t: Target) -> None:
    """No domain refers to the agent's state unless the agent lists its container; no netns or link of its ids."""
    listed = {c.id for c in t.agent.runtime.ListContainers(pb.ListContainersRequest(), timeout=30).containers}
    names = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"], capture_output=True,
                           text=True, timeout=60).stdout.split()
    for name in names:
        if not name.startswith("podvisor-"):
            continue
        xml = subprocess.run(["virsh", "-c", "qemu:///system", "dumpxml", name], capture_output=True, text=True,
                             timeout=60).stdout
        if str(t.agent.state_dir) in xml:
            assert name.removeprefix("podvisor-") in listed, f"domain {name} left behind"
    ids = set(_ID.findall(t.agent.log_path.read_text(errors="replace"))) | t.sandbox_ids
    netns = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    for i in ids:
        assert f"podvisor-{i}" not in netns
        assert f"pvh{i[:12]}" not in links and f"pvb{i[:12]}" not in links


_MOSTLY = st.sampled_from([True, True, True, False])


def _aim(t: Target, msg: Message, draw: st.DrawFn) -> None:
    """Point most requests at what exists (the sandbox, the image, a container;
    required fields present), so they get past NOT_FOUND and "is required"
    to the checks and the code behind them."""
    names = {f.name for f in msg.DESCRIPTOR.fields}
    if "pod_sandbox_id" in names and draw(_MOSTLY):
        msg.pod_sandbox_id = t.sandbox_id  # type: ignore[attr-defined]
    if "container_id" in names and t.containers and draw(_MOSTLY):
        msg.container_id = draw(st.sampled_from(t.containers))  # type: ignore[attr-defined]
    if "config" in names and draw(_MOSTLY):
        cfg = msg.config  # type: ignore[attr-defined]
        cfg.metadata.SetInParent()
        if "image" in {f.name for f in cfg.DESCRIPTOR.fields}:  # a ContainerConfig
            cfg.image.image = t.image
            cfg.metadata.name = draw(st.sampled_from(["vm", cfg.metadata.name or "vm"]))
            cfg.log_path = draw(st.sampled_from(["vm.log", cfg.log_path]))
            for kv in cfg.envs:
                kv.key = kv.key or "K"
        else:  # a PodSandboxConfig
            md = cfg.metadata
            md.name, md.namespace, md.uid = md.name or "n", md.namespace or "ns", md.uid or uuid.uuid4().hex
        if cfg.log_directory.startswith("/") if hasattr(cfg, "log_directory") else False:
            # Accepted log directories are created: keep them in the agent's workdir.
            cfg.log_directory = str(t.agent.workdir / "logs") + cfg.log_directory
    if "image" in names and draw(_MOSTLY) and msg.DESCRIPTOR.name != "CreateContainerRequest":
        msg.image.image = t.image  # type: ignore[attr-defined]


def _check(t: Target, service: str, method: Any, data: bytes) -> None:
    before = t.files()
    code = t.call(service, method, data)
    if code != grpc.StatusCode.OK:
        left = t.files() - before
        assert not left, f"{method.name} refused ({code.name}) but left {sorted(left)}"
    elif method.name == "CreateContainer":
        # Free the sandbox's one VM slot for the next example; remember nothing else.
        for c in t.agent.runtime.ListContainers(pb.ListContainersRequest(), timeout=30).containers:
            t.agent.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=c.id), timeout=60)
    elif method.name == "RunPodSandbox":
        for sb in t.agent.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items:
            t.sandbox_ids.add(sb.id)
    t.agent.runtime.Version(pb.VersionRequest(), timeout=30)
    assert t.agent.proc is not None and t.agent.proc.poll() is None, "the agent exited"


@pytest.mark.parametrize(("service", "method"), METHODS, ids=[m.name for _, m in METHODS])
def test_generated_requests(target: Target, service: str, method: Any) -> None:
    cls = getattr(pb, method.input_type.name)

    @_budget()
    @given(st.data())
    def run(data: st.DataObject) -> None:
        target.ensure()
        msg = data.draw(request(cls))
        _aim(target, msg, data.draw)
        _check(target, service, method, msg.SerializeToString())

    run()


@st.composite
def mutated_encoding(draw: st.DrawFn, cls: type[Message]) -> bytes:
    data = bytearray(draw(request(cls)).SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "varint"]))
        pos = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            data[min(pos, len(data) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(max_size=8))
        else:  # a field with an absurd length prefix
            data[pos:pos] = bytes([0x0A, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F])
    return bytes(data)


@pytest.mark.parametrize(("service", "method"), METHODS, ids=[m.name for _, m in METHODS])
def test_mutated_and_random_bytes(target: Target, service: str, method: Any) -> None:
    cls = getattr(pb, method.input_type.name)

    @_budget()
    @given(st.one_of(mutated_encoding(cls), st.binary(max_size=256)))
    def run(data: bytes) -> None:
        _check(target, service, method, data)

    run()


# Found by this fuzzer: grpc answers INTERNAL ("Exception deserializing
# request!") when a request's bytes do not decode; they are the client's mistake.
UNDECODABLE = [
    pytest.param("RuntimeService", "Attach", b"\x0a\x01\xff", id="bad-utf8"),
    pytest.param("RuntimeService", "RunPodSandbox", b"\x0a\xff\xff\xff\xff\x0f", id="length-past-end"),
    pytest.param("ImageService", "PullImage", b"\x0a" * 3 + b"\xff", id="truncated"),
    pytest.param("RuntimeService", "GetContainerEvents", b"\x07", id="stream-bad-tag"),
    pytest.param("RuntimeService", "CreateContainer", b"\x12\x02\x0a" * 200, id="garbled-fields"),
]


@pytest.mark.parametrize(("service", "name", "data"), UNDECODABLE)
def test_undecodable_requests_are_invalid_argument(target: Target, service: str, name: str, data: bytes) -> None:
    method = SERVICES[service].methods_by_name[name]
    assert target.call(service, method, data) == grpc.StatusCode.INVALID_ARGUMENT
    t = target.agent.runtime.Version(pb.VersionRequest(), timeout=30)
    assert t.runtime_name == "podvisor"


@pytest.mark.parametrize("shares", [1, 262145])
def test_cpu_shares_outside_libvirts_range_leave_nothing(target: Target, shares: int) -> None:
    """Found by this fuzzer: INTERNAL from libvirt after the overlay was written."""
    target.ensure()
    req = pb.CreateContainerRequest(pod_sandbox_id=target.sandbox_id, config=pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name="vm"), image=pb.ImageSpec(image=target.image),
        linux=pb.LinuxContainerConfig(resources=pb.LinuxContainerResources(cpu_shares=shares))))
    before = target.files()
    method = SERVICES["RuntimeService"].methods_by_name["CreateContainer"]
    assert target.call("RuntimeService", method, req.SerializeToString()) == grpc.StatusCode.INVALID_ARGUMENT
    assert target.files() - before == set()
