"""The client side of the CRI streaming URLs, over WebSocket, for podvisorctl.

``exec`` and ``attach`` speak the remotecommand channel protocol
(``v5.channel.k8s.io``, else ``v4.channel.k8s.io``): every binary message
starts with a channel byte (0 stdin, 1 stdout, 2 stderr, 3 the error stream
with the v4 JSON status, 4 terminal resizes); v5 adds ``[255, channel]`` to
close one channel (stdin's end of input). ``port-forward`` speaks the
port-forward channel protocol: channel 0 carries the data of the one port the
URL names, channel 1 its errors, and the first message on each is the port as
a little-endian uint16. docs/streaming-protocols.md has the facts.
"""

from __future__ import annotations

import json
import os
import select
import socket
import ssl
import struct
import sys
import termios
import threading
import tty
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import websocket

REMOTECOMMAND = ("v5.channel.k8s.io", "v4.channel.k8s.io")
PORTFORWARD = ("v4.channel.k8s.io",)
STDIN, STDOUT, STDERR, ERROR, RESIZE = 0, 1, 2, 3, 4
CLOSE = 255
DETACH_KEY = b"\x1d"  # Ctrl-]: leave an attached console, as virsh console does


class StreamError(Exception):
    """The streaming endpoint refused or broke the session."""


def ws_url(url: str) -> str:
    """The streaming URL the runtime returned, with a WebSocket scheme."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None:
        raise StreamError(f"the runtime returned a streaming URL with an unknown scheme: {url}")
    return urlunsplit((scheme, parts.netloc, parts.path, parts.query, parts.fragment))


_client_certificate: tuple[str, str] | None = None


def use_client_certificate(cert_file: str, key_file: str) -> None:
    """Present this certificate to HTTPS streaming servers (URLs from the mTLS endpoint)."""
    global _client_certificate
    _client_certificate = (cert_file, key_file)


def connect(url: str, protocols: tuple[str, ...], ca_file: str | None = None,
            timeout: float = 30.0) -> websocket.WebSocket:
    sslopt: dict[str, Any] = {}
    if ca_file:
        sslopt = {"cert_reqs": ssl.CERT_REQUIRED, "ca_certs": ca_file}
    if _client_certificate is not None:
        sslopt.update(certfile=_client_certificate[0], keyfile=_client_certificate[1])
    try:
        ws = websocket.create_connection(ws_url(url), subprotocols=list(protocols), timeout=timeout,
                                         sslopt=sslopt, enable_multithread=True)
    except websocket.WebSocketBadStatusException as exc:
        raise StreamError(f"the streaming server refused the session: HTTP {exc.status_code}") from None
    except (OSError, websocket.WebSocketException) as exc:
        raise StreamError(f"cannot reach the streaming server at {url}: {exc}") from None
    ws.settimeout(None)
    return ws


def exit_code_of(status: bytes) -> tuple[int, str]:
    """The exit code and message a v4 JSON status on the error stream stands for."""
    try:
        doc = json.loads(status)
    except ValueError:
        return 1, status.decode(errors="replace").strip()  # pre-v4 servers send plain text
    if not isinstance(doc, dict) or doc.get("status") == "Success":
        return 0, ""
    message = str(doc.get("message", ""))
    if doc.get("reason") == "NonZeroExitCode":
        for cause in (doc.get("details") or {}).get("causes") or []:
            if cause.get("reason") == "ExitCode":
                try:
                    return int(cause.get("message", "1")), message
                except ValueError:
                    break
    return 1, message or "the command failed"


# Remote command (exec, attach) ---------------------------------------------


@dataclass
class Session:
    """One remotecommand session: local stdin/stdout/stderr wired to the channels."""

    ws: websocket.WebSocket
    stdin: IO[bytes] | None
    stdout: IO[bytes]
    stderr: IO[bytes]
    detach_key: bytes | None = None

    def run(self) -> tuple[int, str]:
        """Pump until the server closes; the exit code and message of the command."""
        status: tuple[int, str] = (0, "")
        pump: threading.Thread | None = None
        if self.stdin is not None:
            pump = threading.Thread(target=self._send_stdin, name="stdin", daemon=True)
            pump.start()
        try:
            while True:
                try:
                    opcode, data = self.ws.recv_data()
                except (websocket.WebSocketConnectionClosedException, OSError):
                    break
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    break
                if not data:
                    continue
                channel, payload = data[0], data[1:]
                if channel == STDOUT:
                    self._out(self.stdout, payload)
                elif channel == STDERR:
                    self._out(self.stderr, payload)
                elif channel == ERROR and payload:
                    status = exit_code_of(payload)
        finally:
            self.close()
        return status

    @staticmethod
    def _out(stream: IO[bytes], data: bytes) -> None:
        stream.write(data)
        stream.flush()

    def _send_stdin(self) -> None:
        assert self.stdin is not None
        fd = self.stdin.fileno()
        try:
            while True:
                data = os.read(fd, 32768)
                if self.detach_key is not None and self.detach_key in data:
                    data = data.split(self.detach_key, 1)[0]
                    if data:
                        self.ws.send_binary(bytes([STDIN]) + data)
                    self.close()
                    return
                if not data:
                    if self.ws.subprotocol == REMOTECOMMAND[0]:
                        self.ws.send_binary(bytes([CLOSE, STDIN]))
                    return
                self.ws.send_binary(bytes([STDIN]) + data)
        except (websocket.WebSocketException, OSError):
            return

    def resize(self, columns: int, rows: int) -> None:
        doc = json.dumps({"Width": columns, "Height": rows}).encode()
        try:
            self.ws.send_binary(bytes([RESIZE]) + doc)
        except (websocket.WebSocketException, OSError):
            pass

    def close(self) -> None:
        try:
            self.ws.close()
        except (websocket.WebSocketException, OSError):
            pass


def terminal_size(fd: int) -> tuple[int, int] | None:
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return None
    return size.columns, size.lines


@contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """The local terminal in raw mode for the session, restored after."""
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def watch_resizes(session: Session, fd: int) -> Callable[[], None]:
    """Send the terminal's size now and on every SIGWINCH; returns the undo."""
    import signal

    def send(*_: object) -> None:
        size = terminal_size(fd)
        if size is not None:
            session.resize(*size)

    send()
    previous = signal.signal(signal.SIGWINCH, send)

    def undo() -> None:
        signal.signal(signal.SIGWINCH, previous)
    return undo


def run_remotecommand(url: str, *, stdin: bool, tty_mode: bool, ca_file: str | None = None,
                      detach_key: bytes | None = None) -> tuple[int, str]:
    """Connect to an exec or attach URL and run the session on this process's stdio."""
    ws = connect(url, REMOTECOMMAND, ca_file)
    session = Session(ws, sys.stdin.buffer if stdin else None, sys.stdout.buffer, sys.stderr.buffer,
                      detach_key if tty_mode else None)
    fd = sys.stdin.fileno()
    if not tty_mode:
        return session.run()
    if not os.isatty(fd):
        return session.run()
    undo = watch_resizes(session, fd)
    try:
        if not stdin:
            return session.run()
        with raw_terminal(fd):
            return session.run()
    finally:
        undo()


# Port forward -----------------------------------------------------------------


def forward_connection(url: str, port: int, conn: socket.socket, ca_file: str | None = None) -> str:
    """Carry one local TCP connection over a port-forward URL until either side ends.

    Returns "" or the error the server reported on the error channel.
    """
    sep = "&" if "?" in url else "?"
    ws = connect(f"{url}{sep}port={port}", PORTFORWARD, ca_file)
    error: list[str] = []
    seen_prefix = {0: False, 1: False}
    done = threading.Event()

    def upstream() -> None:
        try:
            while not done.is_set():
                data = conn.recv(65536)
                if not data:
                    # The local side's end of input (maybe a half-close):
                    # its reply may still come. The protocol has no
                    # half-close; the server ends the session once the pod
                    # closed the connection.
                    return
                ws.send_binary(b"\x00" + data)
        except (OSError, websocket.WebSocketException):
            pass
        done.set()
        try:
            ws.close()
        except (OSError, websocket.WebSocketException):
            pass

    pump = threading.Thread(target=upstream, name="port-forward-up", daemon=True)
    pump.start()
    try:
        while True:
            try:
                opcode, data = ws.recv_data()
            except (websocket.WebSocketConnectionClosedException, OSError):
                break
            if opcode == websocket.ABNF.OPCODE_CLOSE or not data:
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    break
                continue
            channel, payload = data[0], data[1:]
            if channel in seen_prefix and not seen_prefix[channel]:
                seen_prefix[channel] = True
                if len(payload) >= 2 and struct.unpack("<H", payload[:2])[0] == port:
                    payload = payload[2:]
            if channel == 0 and payload:
                conn.sendall(payload)
            elif channel == 1 and payload:
                error.append(payload.decode(errors="replace"))
    except OSError:
        pass
    finally:
        done.set()
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        conn.close()
        ws.close()
        pump.join(5)
    return "".join(error).strip()


def serve_forwards(listeners: list[tuple[socket.socket, int]], new_url: Callable[[int], str],
                   ca_file: str | None = None, report: Callable[[str], None] = print,
                   stop: threading.Event | None = None) -> None:
    """Accept on every listener; each connection gets a new streaming URL (tokens are single use)."""
    stop = stop or threading.Event()
    by_fd = {s.fileno(): (s, port) for s, port in listeners}

    def handle(conn: socket.socket, port: int) -> None:
        try:
            url = new_url(port)
            why = forward_connection(url, port, conn, ca_file)
        except Exception as exc:  # one failed connection must not end the others
            why = str(exc)
            conn.close()
        if why:
            report(f"error forwarding port {port}: {why}")

    while not stop.is_set():
        ready, _, _ = select.select(list(by_fd), [], [], 0.5)
        for fd in ready:
            listener, port = by_fd[fd]
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            report(f"Handling connection for {listener.getsockname()[1]}")
            threading.Thread(target=handle, args=(conn, port), daemon=True).start()
