"""Exec's SSH client (paramiko): one session into a guest, streams pumped both ways.

The agent connects from the host's network namespace to the pod IP, port 22
(docs/exec.md says why), accepts only the host key Podvisor gave the VM
(ed25519, negotiated as the only host key type), logs in as root with the
VM's own client key, and runs one command. Failures become domain errors:
nothing answering yet is ``GuestNotReady`` (the service waits on it); a wrong
host key or a refused login is ``FailedPrecondition``.
"""

from __future__ import annotations

import base64
import binascii
import io
import socket
import threading

import paramiko
import structlog

from agent.domain.errors import FailedPrecondition, GuestNotReady
from agent.domain.vm import ExecCredentials
from agent.streaming.backend import ExitStatus, Streams, TermSize

log = structlog.get_logger(__name__)

SSH_PORT = 22
CHUNK = 65536
DEFAULT_TERM = TermSize(width=80, height=24)


def _host_key(line: str) -> paramiko.PKey:
    parts = line.split()
    try:
        if len(parts) < 2 or parts[0] != "ssh-ed25519":
            raise ValueError(parts[0] if parts else "empty")
        return paramiko.Ed25519Key(data=base64.b64decode(parts[1], validate=True))
    except (ValueError, binascii.Error, paramiko.SSHException):
        raise FailedPrecondition("the VM's recorded SSH host key is not an ed25519 key") from None


class SSHSession:
    """One authenticated SSH connection to a guest (the ``ShellSession`` port)."""

    def __init__(self, transport: paramiko.Transport, where: str) -> None:
        self._transport = transport
        self._where = where

    def close(self) -> None:
        self._transport.close()

    def run(self, command: str, tty: bool, streams: Streams) -> ExitStatus:
        """Run ``command`` (a shell command line) until it ends, pumping the streams."""
        try:
            chan = self._transport.open_session(timeout=30)
        except (paramiko.SSHException, OSError) as exc:
            raise GuestNotReady(f"cannot open an SSH session on {self._where}: {exc}") from None
        done = threading.Event()
        threads: list[threading.Thread] = []
        try:
            if tty:
                chan.get_pty(term="xterm", width=DEFAULT_TERM.width, height=DEFAULT_TERM.height)
            chan.exec_command(command)
            if streams.stdin is not None:
                threads.append(_thread("exec-stdin", _pump_stdin, chan, streams, done))
            elif not tty:
                # No stdin: the command reads EOF at once. (Not with a tty: paramiko
                # sends nothing on a channel after EOF, resizes included.)
                chan.shutdown_write()
            if tty and streams.resize is not None:
                threads.append(_thread("exec-resize", _pump_resizes, chan, streams, done))
            if not tty:
                threads.append(_thread("exec-stderr", _pump_stderr, chan, streams, done))
            _pump_stdout(chan, streams)
            for t in threads:
                if t.name == "exec-stderr":
                    t.join()
            code = chan.recv_exit_status()
        except OSError:
            # The client went away (its stream raised): end the command's session.
            return ExitStatus(code=1, message="the client closed the stream")
        except paramiko.SSHException as exc:
            return ExitStatus(code=1, message=f"SSH session on {self._where} failed: {exc}")
        finally:
            done.set()
            chan.close()
        if code < 0:
            # The command ended without an exit status (killed by a signal, sshd gone).
            return ExitStatus(code=137, message="the command ended without an exit status (killed?)")
        return ExitStatus(code=code)


def _thread(name: str, fn: object, *args: object) -> threading.Thread:
    t = threading.Thread(target=fn, args=args, name=name, daemon=True)  # type: ignore[arg-type]
    t.start()
    return t


def _pump_stdout(chan: paramiko.Channel, streams: Streams) -> None:
    while True:
        data = chan.recv(CHUNK)
        if not data:
            return
        if streams.stdout is not None:
            streams.stdout.write(data)


def _pump_stderr(chan: paramiko.Channel, streams: Streams, done: threading.Event) -> None:
    try:
        while True:
            data = chan.recv_stderr(CHUNK)
            if not data:
                return
            if streams.stderr is not None:  # not asked for: read and dropped
                streams.stderr.write(data)
    except OSError:
        chan.close()


def _pump_stdin(chan: paramiko.Channel, streams: Streams, done: threading.Event) -> None:
    assert streams.stdin is not None
    try:
        while not done.is_set():
            data = streams.stdin.read(CHUNK)
            if not data:
                break
            chan.sendall(data)
        if not done.is_set():
            chan.shutdown_write()  # EOF reaches the command
    except (OSError, paramiko.SSHException):
        pass


def _pump_resizes(chan: paramiko.Channel, streams: Streams, done: threading.Event) -> None:
    assert streams.resize is not None
    while not done.is_set():
        size = streams.resize.get(timeout=0.5)
        if size is None:
            if done.is_set():
                return
            continue
        try:
            chan.resize_pty(width=max(1, size.width), height=max(1, size.height))
        except (OSError, paramiko.SSHException):
            return


class GuestSSH:
    """The ``GuestShell`` port: SSH sessions into guests (``port``: tests only)."""

    def __init__(self, port: int = SSH_PORT) -> None:
        self._port = port

    def connect(self, host: str, credentials: ExecCredentials, timeout_s: float) -> SSHSession:
        where = f"{host}:{self._port}"
        expected = _host_key(credentials.host_public_key)
        try:
            client_key = paramiko.Ed25519Key.from_private_key(
                io.StringIO(credentials.client_private_key.decode("ascii")))
        except (paramiko.SSHException, UnicodeDecodeError, ValueError):
            raise FailedPrecondition("the VM's exec client key cannot be read") from None
        timeout = max(0.5, timeout_s)
        try:
            sock = socket.create_connection((host, self._port), timeout=timeout)
        except OSError as exc:
            raise GuestNotReady(f"SSH on {where} does not answer: {exc.strerror or exc}") from None
        transport = paramiko.Transport(sock)
        try:
            transport.get_security_options().key_types = ("ssh-ed25519",)
            transport.banner_timeout = timeout
            transport.start_client(timeout=timeout)
            got = transport.get_remote_server_key()
            if got != expected:
                raise FailedPrecondition(
                    f"the SSH server on {where} shows a host key that is not the one Podvisor gave this VM: "
                    "the pod IP answers for another machine, or the user-data set its own ssh_keys")
            transport.auth_publickey("root", client_key)
        except paramiko.BadAuthenticationType as exc:
            transport.close()
            raise FailedPrecondition(
                f"the guest's sshd on {where} does not take keys for root ({exc.allowed_types})") from None
        except paramiko.AuthenticationException:
            transport.close()
            raise FailedPrecondition(
                f"the guest's sshd on {where} refused root's login with Podvisor's key: interactive exec needs "
                "root login by key (the user-data must not set disable_root: true, sshd must allow "
                "PermitRootLogin prohibit-password)") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            transport.close()
            raise GuestNotReady(f"SSH on {where} is not ready: {exc}") from None
        except BaseException:
            transport.close()
            raise
        log.debug("ssh session opened", host=host)
        return SSHSession(transport, where)
