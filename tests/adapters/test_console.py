"""The console multiplexer against a real unix socket server that behaves
like QEMU's socket chardev: it serves one connection at a time."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.adapters.console import ConsoleHub, ConsoleSession
from agent.domain.errors import FailedPrecondition, Unavailable

KEY = "c" * 64


class FakeSerial:
    """A listening unix socket serving one connection at a time, as QEMU's
    ``server=on,wait=off`` chardev does; what clients write is kept."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.accepted = 0
        self.received = bytearray()
        self.conn: socket.socket | None = None
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self._lock = threading.Lock()
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            # A multiplexer that stopped reading makes send() fail, not hang.
            conn.settimeout(10)
            with self._lock:
                self.accepted += 1
                self.conn = conn
                self.disconnected.clear()
            self.connected.set()
            while True:
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    break
                with self._lock:
                    self.received += data
            with self._lock:
                self.conn = None
            self.connected.clear()
            self.disconnected.set()
            conn.close()

    def send(self, data: bytes) -> None:
        assert self.connected.wait(5)
        assert self.conn is not None
        self.conn.sendall(data)

    def hang_up(self) -> None:
        """QEMU exits: the connection closes."""
        assert self.conn is not None
        self.conn.shutdown(socket.SHUT_RDWR)

    def got(self, data: bytes, timeout: float = 5) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if data in self.received:
                    return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self._stop = True
        self.listener.close()


@pytest.fixture
def serial(tmp_path: Path) -> Iterator[FakeSerial]:
    s = FakeSerial(tmp_path / "serial.sock")
    yield s
    s.close()


def read_until(session: ConsoleSession, want: bytes, timeout: float = 5) -> bytes:
    got = b""
    deadline = time.monotonic() + timeout
    while want not in got and time.monotonic() < deadline:
        data = session.read(0.1)
        if data == b"":
            break
        got += data or b""
    return got


def test_two_clients_share_one_connection_and_both_see_the_output(serial: FakeSerial) -> None:
    hub = ConsoleHub()
    a = hub.join(KEY, str(serial.path))
    b = hub.join(KEY, str(serial.path))
    serial.send(b"login: ")
    serial.send(b"hello\n")
    assert read_until(a, b"hello\n") == b"login: hello\n"
    assert read_until(b, b"hello\n") == b"login: hello\n"
    assert serial.accepted == 1
    assert hub.connected() == [KEY]
    a.close()
    b.close()


def test_every_clients_input_reaches_the_console(serial: FakeSerial) -> None:
    hub = ConsoleHub()
    a = hub.join(KEY, str(serial.path))
    b = hub.join(KEY, str(serial.path))
    a.write(b"from-a\n")
    b.write(b"from-b\n")
    assert serial.got(b"from-a\n") and serial.got(b"from-b\n")
    a.close()
    b.close()


def test_a_client_sees_output_from_when_it_joined(serial: FakeSerial) -> None:
    hub = ConsoleHub()
    a = hub.join(KEY, str(serial.path))
    serial.send(b"early\n")
    assert read_until(a, b"early\n") == b"early\n"
    b = hub.join(KEY, str(serial.path))
    serial.send(b"late\n")
    assert read_until(b, b"late\n") == b"late\n"
    assert read_until(a, b"late\n") == b"late\n"
    a.close()
    b.close()


def test_the_last_client_to_leave_closes_the_connection_and_a_new_one_reconnects(serial: FakeSerial) -> None:
    hub = ConsoleHub()
    a = hub.join(KEY, str(serial.path))
    b = hub.join(KEY, str(serial.path))
    assert serial.connected.wait(5)
    a.close()
    assert not serial.disconnected.wait(0.3)  # b is still attached
    b.close()
    assert serial.disconnected.wait(5)
    assert hub.connected() == []
    c = hub.join(KEY, str(serial.path))
    serial.send(b"again\n")
    assert read_until(c, b"again\n") == b"again\n"
    assert serial.accepted == 2
    c.close()


def test_the_vm_stopping_ends_every_session(serial: FakeSerial) -> None:
    hub = ConsoleHub()
    a = hub.join(KEY, str(serial.path))
    b = hub.join(KEY, str(serial.path))
    serial.send(b"bye\n")
    assert read_until(a, b"bye\n") == b"bye\n"
    serial.hang_up()
    assert read_until(a, b"never") == b""
    assert read_until(b, b"never") == b"bye\n"  # what was buffered first, then the end
    assert b.read(1) == b""
    assert a.ended_reason == b.ended_reason == "eof"
    with pytest.raises(Unavailable):
        a.write(b"x")
    deadline = time.monotonic() + 5
    while hub.connected() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert hub.connected() == []
    a.close()
    b.close()


def test_a_slow_client_is_dropped_and_the_others_and_the_console_keep_going(serial: FakeSerial) -> None:
    hub = ConsoleHub(client_buffer=64 * 1024)
    slow = hub.join(KEY, str(serial.path))
    fast = hub.join(KEY, str(serial.path))
    chunk = bytes(range(256)) * 64  # 16 KiB
    count = 64  # 1 MiB in all
    got = bytearray()
    for _ in range(count):
        # The console writes while `slow` reads nothing; `fast` keeps up.
        serial.send(chunk)
        want = len(got) + len(chunk)
        while len(got) < want:
            data = fast.read(5)
            assert data, "the fast client's session ended or stalled"
            got.extend(data)
    assert bytes(got) == chunk * count
    assert slow.read(1) == b""
    assert slow.ended_reason == "slow"
    assert fast.ended_reason == ""
    fast.write(b"still-here\n")
    assert serial.got(b"still-here\n")
    assert serial.accepted == 1
    slow.close()
    fast.close()
    assert serial.disconnected.wait(5)


def test_nothing_listening_is_a_failed_precondition(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match="is the VM running"):
        ConsoleHub().join(KEY, str(tmp_path / "missing.sock"))
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "stale.sock"))
    stale.close()  # a socket file nobody listens on (QEMU gone)
    with pytest.raises(FailedPrecondition):
        ConsoleHub().join(KEY, str(tmp_path / "stale.sock"))


def test_consoles_of_different_vms_are_separate(tmp_path: Path) -> None:
    one, two = FakeSerial(tmp_path / "one.sock"), FakeSerial(tmp_path / "two.sock")
    try:
        hub = ConsoleHub()
        a = hub.join("a" * 64, str(one.path))
        b = hub.join("b" * 64, str(two.path))
        one.send(b"one\n")
        two.send(b"two\n")
        assert read_until(a, b"one\n") == b"one\n"
        assert read_until(b, b"two\n") == b"two\n"
        assert sorted(hub.connected()) == ["a" * 64, "b" * 64]
        a.close()
        b.close()
    finally:
        one.close()
        two.close()


def test_close_ends_every_session(serial: FakeSerial) -> None:
    hub = ConsoleHub()
    a = hub.join(KEY, str(serial.path))
    hub.close()
    assert a.read(5) == b""
    assert serial.disconnected.wait(5)


def test_clients_joining_at_the_same_moment_end_up_on_one_connection(serial: FakeSerial) -> None:
    hub = ConsoleHub()
    start = threading.Barrier(8)
    sessions: list[ConsoleSession] = []
    lock = threading.Lock()

    def join() -> None:
        start.wait()
        s = hub.join(KEY, str(serial.path))
        with lock:
            sessions.append(s)

    threads = [threading.Thread(target=join) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(sessions) == 8
    assert hub.connected() == [KEY]
    serial.send(b"to-all\n")
    assert [read_until(s, b"to-all\n") for s in sessions] == [b"to-all\n"] * 8
    for s in sessions:
        s.close()
    assert serial.disconnected.wait(5)


def test_a_client_outside_the_agent_holding_the_console_delays_but_does_not_break_a_join(
        serial: FakeSerial) -> None:
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.connect(str(serial.path))  # a socat on the host, say
    assert serial.connected.wait(5)
    session = ConsoleHub().join(KEY, str(serial.path))  # waits in the backlog
    assert session.read(0.3) is None
    other.close()  # the other client leaves: the agent's connection is served
    deadline = time.monotonic() + 5
    while serial.accepted < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    serial.send(b"now\n")
    assert read_until(session, b"now\n") == b"now\n"
    session.close()
