"""The SSH adapter against a real SSH server on loopback (paramiko's server side,
speaking the real protocol): host key check, key login, streams both ways,
stdin EOF, tty + resize, exit codes.

The server runs no shell: it knows a few commands of its own, so the test runs
nothing on this host. The guest's real sshd is exercised end to end on the
Debian guest (tests/e2e/test_exec.py).
"""

from __future__ import annotations

import io
import json
import queue
import shlex
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.adapters.ssh import GuestSSH
from agent.domain.errors import FailedPrecondition, GuestNotReady
from agent.domain.vm import ExecCredentials
from agent.streaming.backend import Streams, TermSize


def _ed25519() -> tuple[paramiko.Ed25519Key, bytes, str]:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                            serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    return paramiko.Ed25519Key.from_private_key(io.StringIO(pem.decode())), pem, public


class _Server(paramiko.ServerInterface):
    def __init__(self, allowed: paramiko.PKey, log: list[str]) -> None:
        self.allowed = allowed
        self.log = log
        self.sizes: queue.Queue[tuple[int, int]] = queue.Queue()

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        ok = username == "root" and key == self.allowed
        return paramiko.AUTH_SUCCESSFUL if ok else paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return paramiko.OPEN_SUCCEEDED if kind == "session" else paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_pty_request(self, channel: paramiko.Channel, term: bytes, width: int, height: int,
                                  pixelwidth: int, pixelheight: int, modes: bytes) -> bool:
        self.log.append(f"pty {width}x{height}")
        return True

    def check_channel_window_change_request(self, channel: paramiko.Channel, width: int, height: int,
                                            pixelwidth: int, pixelheight: int) -> bool:
        self.sizes.put((width, height))
        return True

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        self.log.append(command.decode())
        threading.Thread(target=self._run, args=(channel, shlex.split(command.decode())), daemon=True).start()
        return True

    def _run(self, chan: paramiko.Channel, argv: list[str]) -> None:
        # paramiko's server answers the exec request only after this method's
        # caller returns; a command that closed the channel before would look
        # like a rejected request. sshd replies first, then runs the command.
        time.sleep(0.2)
        if argv[0] == "echo-stdin":
            data = b""
            while chunk := chan.recv(65536):
                data += chunk
            chan.sendall(b"got:" + data)
            chan.send_exit_status(0)
        elif argv[0] == "fail":
            chan.sendall(b"some out\n")
            chan.sendall_stderr(b"bad\n")
            chan.send_exit_status(3)
        elif argv[0] == "size":
            w, h = self.sizes.get(timeout=10)
            chan.sendall(f"{w}x{h}\n".encode())
            chan.send_exit_status(0)
        elif argv[0] == "argv":
            chan.sendall(json.dumps(argv[1:]).encode())
            chan.send_exit_status(0)
        chan.close()


@dataclass
class SSHServer:
    port: int
    host_public: str
    client_pem: bytes
    log: list[str] = field(default_factory=list)

    def credentials(self, host_public: str | None = None, client_pem: bytes | None = None) -> ExecCredentials:
        return ExecCredentials(client_private_key=client_pem or self.client_pem,
                               host_public_key=host_public or self.host_public)


@pytest.fixture
def server() -> Iterator[SSHServer]:
    host_key, _, host_public = _ed25519()
    client_key, client_pem, _ = _ed25519()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    srv = SSHServer(listener.getsockname()[1], host_public, client_pem)
    transports: list[paramiko.Transport] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            t = paramiko.Transport(conn)
            t.add_server_key(host_key)
            t.start_server(server=_Server(client_key, srv.log))
            transports.append(t)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield srv
    finally:
        listener.close()
        for t in transports:
            t.close()


class Out:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


class In:
    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)

    def read(self, n: int = 65536) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""


class Sizes:
    def __init__(self, *sizes: TermSize) -> None:
        self.q: queue.Queue[TermSize] = queue.Queue()
        for s in sizes:
            self.q.put(s)

    def get(self, timeout: float | None = None) -> TermSize | None:
        try:
            return self.q.get(timeout=timeout)
        except queue.Empty:
            return None


def _run(server: SSHServer, command: str, *, tty: bool = False, stdin: In | None = None,
         resize: Sizes | None = None) -> tuple[int, bytes, bytes]:
    out, err = Out(), Out()
    session = GuestSSH(port=server.port).connect("127.0.0.1", server.credentials(), 5)
    try:
        status = session.run(command, tty, Streams(stdin=stdin, stdout=out, stderr=None if tty else err,
                                                   resize=resize))
    finally:
        session.close()
    assert not status.message, status.message
    return status.code, out.data, err.data


def test_stdout_stderr_and_exit_code(server: SSHServer) -> None:
    assert _run(server, "fail") == (3, b"some out\n", b"bad\n")


def test_stdin_is_pumped_and_its_end_reaches_the_command(server: SSHServer) -> None:
    code, out, _ = _run(server, "echo-stdin", stdin=In(b"hello ", b"world"))
    assert (code, out) == (0, b"got:hello world")


def test_a_tty_gets_a_pty_and_its_resizes(server: SSHServer) -> None:
    code, out, _ = _run(server, "size", tty=True, resize=Sizes(TermSize(width=132, height=43)))
    assert (code, out) == (0, b"132x43\n")
    assert "pty 80x24" in server.log


def test_the_command_line_arrives_as_sent(server: SSHServer) -> None:
    argv = ["argv", "two words", "it's", "$HOME", ";rm"]
    code, out, _ = _run(server, shlex.join(argv))
    assert (code, json.loads(out)) == (0, argv[1:])


def test_another_host_key_is_refused(server: SSHServer) -> None:
    _, _, other = _ed25519()
    with pytest.raises(FailedPrecondition, match="not the one Podvisor gave"):
        GuestSSH(port=server.port).connect("127.0.0.1", server.credentials(host_public=other), 5)


def test_a_refused_login_says_what_the_guest_needs(server: SSHServer) -> None:
    _, other_pem, _ = _ed25519()
    with pytest.raises(FailedPrecondition, match="refused root's login.*disable_root"):
        GuestSSH(port=server.port).connect("127.0.0.1", server.credentials(client_pem=other_pem), 5)


def test_nothing_listening_is_not_ready(server: SSHServer) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(GuestNotReady, match="does not answer"):
        GuestSSH(port=port).connect("127.0.0.1", server.credentials(), 2)


def test_a_listener_that_never_speaks_ssh_is_not_ready(server: SSHServer) -> None:
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(1)
    try:
        with pytest.raises(GuestNotReady, match="not ready"):
            GuestSSH(port=mute.getsockname()[1]).connect("127.0.0.1", server.credentials(), 1)
    finally:
        mute.close()
