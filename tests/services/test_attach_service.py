"""AttachService with fakes: checks before anything is joined, output to the
client, input to the console, and each way an attach ends."""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterator

import pytest

from agent.domain.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from agent.domain.vm import Container, ContainerState
from agent.services.attach import AttachService
from agent.streaming.backend import Streams, TermSize

CID = "c" * 64


def container(state: ContainerState = ContainerState.RUNNING) -> Container:
    return Container(id=CID, sandbox_id="a" * 64, name="vm", attempt=0, image="img", image_id="sha256:x",
                     state=state, created_at_ns=1, domain_name=f"podvisor-{CID}", directory="/d",
                     overlay_path="/d/o", seed_path="/d/s", console_log="/d/console.log",
                     serial_socket="/d/serial.sock", log_path="", vcpus=1, max_vcpus=1,
                     memory_bytes=1, max_memory_bytes=1)


class Lookup:
    def __init__(self, c: Container | None) -> None:
        self.c = c

    def get(self, container_id: str) -> Container:
        if self.c is None or container_id != self.c.id:
            raise NotFound(f"container {container_id!r} not found")
        return self.c


class FakeSession:
    def __init__(self) -> None:
        self.out: queue.Queue[bytes | None] = queue.Queue()  # None: the console closes
        self.written: list[bytes] = []
        self.reason = ""
        self.closed = threading.Event()
        self.wrote = threading.Event()

    @property
    def ended_reason(self) -> str:
        return self.reason

    def read(self, timeout: float | None = None) -> bytes | None:
        try:
            item = self.out.get(timeout=timeout)
        except queue.Empty:
            return None
        return b"" if item is None else item

    def write(self, data: bytes) -> None:
        if self.closed.is_set():
            raise Unavailable("the console session has ended")
        self.written.append(data)
        self.wrote.set()

    def close(self) -> None:
        self.closed.set()


class FakeConsoles:
    def __init__(self) -> None:
        self.joined: list[tuple[str, str]] = []
        self.session = FakeSession()

    def join(self, key: str, socket_path: str) -> FakeSession:
        self.joined.append((key, socket_path))
        return self.session


class Client:
    """A client's streams: stdin fed by the test, stdout collected."""

    def __init__(self, *, fail_after: int | None = None) -> None:
        self.stdin_q: queue.Queue[bytes] = queue.Queue()
        self.chunks: list[bytes] = []
        self.fail_after = fail_after
        self.resizes: queue.Queue[TermSize | None] = queue.Queue()

    def read(self, n: int = 65536) -> bytes:
        return self.stdin_q.get()

    def write(self, data: bytes) -> None:
        if self.fail_after is not None and len(self.chunks) >= self.fail_after:
            raise BrokenPipeError("client gone")
        self.chunks.append(data)

    def get(self, timeout: float | None = None) -> TermSize | None:
        try:
            return self.resizes.get(timeout=timeout)
        except queue.Empty:
            return None


@pytest.fixture
def consoles() -> FakeConsoles:
    return FakeConsoles()


def service(consoles: FakeConsoles, c: Container | None = None) -> AttachService:
    return AttachService(Lookup(c if c is not None else container()), consoles, poll_s=0.05)


def run(svc: AttachService, streams: Streams, tty: bool = False) -> Iterator[threading.Thread]:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            svc.attach(CID, tty, streams)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    yield t
    t.join(10)
    assert not t.is_alive()
    if errors:
        raise errors[0]


def test_unknown_container_is_not_found_and_nothing_is_joined(consoles: FakeConsoles) -> None:
    with pytest.raises(NotFound):
        AttachService(Lookup(None), consoles).attach("nope", False, Streams(None, Client(), None, None))
    assert consoles.joined == []


@pytest.mark.parametrize("state", [ContainerState.CREATED, ContainerState.EXITED])
def test_a_container_not_running_is_refused(consoles: FakeConsoles, state: ContainerState) -> None:
    with pytest.raises(FailedPrecondition, match=f"{state.value}, not running"):
        service(consoles, container(state)).attach(CID, False, Streams(None, Client(), None, None))
    assert consoles.joined == []


def test_no_stream_at_all_is_invalid(consoles: FakeConsoles) -> None:
    with pytest.raises(InvalidArgument):
        service(consoles).attach(CID, False, Streams(None, None, None, None))
    assert consoles.joined == []


def test_output_reaches_the_client_and_the_attach_ends_when_the_console_closes(consoles: FakeConsoles) -> None:
    client = Client()
    for chunk in (b"boot ", b"line\n", None):
        consoles.session.out.put(chunk)
    for _ in run(service(consoles), Streams(None, client, None, None)):
        pass
    assert b"".join(client.chunks) == b"boot line\n"
    assert consoles.joined == [(CID, "/d/serial.sock")]
    assert consoles.session.closed.is_set()


def test_stderr_alone_gets_the_console(consoles: FakeConsoles) -> None:
    client = Client()
    consoles.session.out.put(b"x")
    consoles.session.out.put(None)
    for _ in run(service(consoles), Streams(None, None, client, None)):
        pass
    assert client.chunks == [b"x"]


def test_stdin_goes_to_the_console_and_its_end_does_not_end_the_attach(consoles: FakeConsoles) -> None:
    client = Client()
    for t in run(service(consoles), Streams(client, client, None, None)):
        client.stdin_q.put(b"echo hi\n")
        assert consoles.session.wrote.wait(5)
        client.stdin_q.put(b"")  # stdin closed: output keeps flowing
        consoles.session.out.put(b"hi\n")
        t.join(0.3)
        assert t.is_alive()
        consoles.session.out.put(None)
    assert consoles.session.written == [b"echo hi\n"]
    assert client.chunks == [b"hi\n"]


def test_a_client_gone_ends_the_attach(consoles: FakeConsoles) -> None:
    client = Client(fail_after=1)
    for _ in run(service(consoles), Streams(None, client, None, None)):
        consoles.session.out.put(b"one")
        consoles.session.out.put(b"two")
    assert client.chunks == [b"one"]
    assert consoles.session.closed.is_set()


def test_stdin_only_ends_with_stdin(consoles: FakeConsoles) -> None:
    client = Client()
    for _ in run(service(consoles), Streams(client, None, None, None)):
        client.stdin_q.put(b"a")
        client.stdin_q.put(b"")
    assert consoles.session.written == [b"a"]


def test_tty_resizes_are_drained_and_the_session_end_ends_the_attach(consoles: FakeConsoles) -> None:
    client = Client()
    for t in run(service(consoles), Streams(None, client, None, client), tty=True):
        client.resizes.put(TermSize(80, 24))
        t.join(0.3)
        assert t.is_alive()
        client.resizes.put(None)  # the session is over
    assert client.resizes.empty()


def test_a_client_dropped_for_being_slow_gets_a_clear_error(consoles: FakeConsoles) -> None:
    consoles.session.reason = "slow"
    consoles.session.out.put(None)
    with pytest.raises(ResourceExhausted, match="too slowly"):
        for _ in run(service(consoles), Streams(None, Client(), None, None)):
            pass


def test_the_console_joined_is_the_containers_serial_socket(consoles: FakeConsoles) -> None:
    c = dataclasses.replace(container(), serial_socket="/other.sock")
    consoles.session.out.put(None)
    for _ in run(service(consoles, c), Streams(None, Client(), None, None)):
        pass
    assert consoles.joined == [(CID, "/other.sock")]
