"""Exec, attach and port forward over WebSocket (wsproto does the framing).

Every message carries a channel in its first byte (binary protocols) or as
an ASCII digit in front of base64 text (``base64`` variants). Exec/attach:
0 stdin, 1 stdout, 2 stderr, 3 error, 4 resize; ``v5.channel.k8s.io`` adds
the close signal ``[255, channel]`` (stdin end). Port forward: for the i-th
port, channel 2i is data and 2i+1 error, each opened by the server with the
port as a little-endian uint16."""

from __future__ import annotations

import base64
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog
import wsproto
import wsproto.events as ev
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from agent.domain.errors import PodvisorError
from agent.domain.streaming import PortForwardRequest, StreamRequest
from agent.streaming import command, status
from agent.streaming.backend import StreamBackend, Streams
from agent.streaming.portforward import CONNECT_TIMEOUT, parse_port
from agent.streaming.session import wait_readable

log = structlog.get_logger(__name__)

V5, V4, V4_B64, V1, V1_B64 = ("v5.channel.k8s.io", "v4.channel.k8s.io", "v4.base64.channel.k8s.io",
                              "channel.k8s.io", "base64.channel.k8s.io")
COMMAND_PROTOCOLS = (V5, V4, V4_B64, V1, V1_B64)
PORTFORWARD_PROTOCOLS = (V4, V4_B64)
STDIN, STDOUT, STDERR, ERROR, RESIZE = range(5)
CLOSE_SIGNAL = 255
MAX_MESSAGE = 4 << 20
MAX_BUFFER = 1 << 20
LINGER = 10.0


class Channels:
    """A WebSocket connection seen as numbered channels."""

    def __init__(self, sock: socket.socket, ws: wsproto.WSConnection, protocol: str, idle_timeout: float) -> None:
        self.sock = sock
        self.ws = ws
        self.protocol = protocol
        self.b64 = "base64" in protocol
        self._idle = idle_timeout
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self.closed = threading.Event()

    def _out(self, event: Any) -> None:
        with self._lock:
            if self.closed.is_set() and not isinstance(event, ev.CloseConnection):
                raise BrokenPipeError("the WebSocket is closed")
            try:
                data = self.ws.send(event)
            except LocalProtocolError as exc:
                raise BrokenPipeError(str(exc)) from None
            self.sock.sendall(data)
            self._last = time.monotonic()

    def send(self, channel: int, data: bytes) -> None:
        if self.b64:
            self._out(ev.TextMessage(data=str(channel) + base64.b64encode(data).decode()))
        else:
            self._out(ev.BytesMessage(data=bytes([channel]) + data))

    def close(self, code: int = 1000) -> None:
        try:
            self._out(ev.CloseConnection(code=code))
        except (OSError, LocalProtocolError):
            pass
        self.closed.set()

    def serve(self, on_message: Callable[[int, bytes], None]) -> None:
        """Read until the client closes (or goes idle); calls `on_message`
        with (channel, payload), the close signal as (255, bytes([channel]))."""
        parts: list[bytes | str] = []
        size = 0
        try:
            while True:
                if not wait_readable(self.sock, min(self._idle, 5.0)):
                    if self.closed.is_set() or time.monotonic() - self._last >= self._idle:
                        return
                    continue
                chunk = self.sock.recv(65536)
                if not chunk:
                    return
                self._last = time.monotonic()
                self.ws.receive_data(chunk)
                for event in self.ws.events():
                    if isinstance(event, ev.Ping):
                        self._out(event.response())
                    elif isinstance(event, ev.CloseConnection):
                        if not self.closed.is_set():
                            self._out(event.response())
                        return
                    elif isinstance(event, ev.Message):
                        parts.append(event.data)
                        size += len(event.data)
                        if size > MAX_MESSAGE:
                            self.close(1009)
                            return
                        if event.message_finished:
                            self._dispatch(parts, on_message)
                            parts, size = [], 0
        except (OSError, RemoteProtocolError, LocalProtocolError) as exc:
            log.debug("WebSocket ended", error=str(exc))
        finally:
            self.closed.set()

    def _dispatch(self, parts: list[bytes | str], on_message: Callable[[int, bytes], None]) -> None:
        if parts and isinstance(parts[0], str):
            text = "".join(str(p) for p in parts)
            if not text:
                return
            if self.b64:
                if not text[0].isdigit():
                    return
                try:
                    on_message(int(text[0]), base64.b64decode(text[1:]))
                except ValueError:
                    log.info("WebSocket message is not base64; ignored")
                return
            raw = text.encode("utf-8")
        else:
            raw = b"".join(p for p in parts if isinstance(p, bytes))
        if raw:
            on_message(raw[0], raw[1:])


class _Pipe:
    """stdin fed by messages: `Input` for the backend."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._buf = bytearray()
        self._eof = False

    def feed(self, data: bytes) -> None:
        with self._cond:
            while len(self._buf) > MAX_BUFFER and not self._eof:
                self._cond.wait(1.0)
            if not self._eof:
                self._buf += data
            self._cond.notify_all()

    def end(self) -> None:
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def read(self, n: int = 65536) -> bytes:
        with self._cond:
            self._cond.wait_for(lambda: self._buf or self._eof)
            out = bytes(self._buf[:n])
            del self._buf[:n]
            self._cond.notify_all()
            return out


class _ChannelOut:
    def __init__(self, channels: Channels, channel: int) -> None:
        self._c = channels
        self._n = channel

    def write(self, data: bytes) -> None:
        for off in range(0, len(data), 32 * 1024):
            self._c.send(self._n, data[off:off + 32 * 1024])


def handshake(sock: socket.socket, raw: bytes, offered_ok: tuple[str, ...]) -> tuple[wsproto.WSConnection, str] | None:
    ws = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
    ws.receive_data(raw)
    for event in ws.events():
        if isinstance(event, ev.Request):
            chosen = next((p for p in event.subprotocols if p in offered_ok), None)
            if chosen is None and event.subprotocols:
                sock.sendall(ws.send(ev.RejectConnection(status_code=400, has_body=False)))
                log.info("WebSocket subprotocols not supported", offered=event.subprotocols)
                return None
            sock.sendall(ws.send(ev.AcceptConnection(subprotocol=chosen)))
            return ws, chosen or ""
    sock.sendall(ws.send(ev.RejectConnection(status_code=400, has_body=False)))
    return None


def serve(sock: socket.socket, raw: bytes, request: StreamRequest, query: dict[str, list[str]],
          backend: StreamBackend, idle_timeout: float, register: Callable[[Callable[[], None]], None]) -> None:
    is_pf = isinstance(request, PortForwardRequest)
    shook = handshake(sock, raw, PORTFORWARD_PROTOCOLS if is_pf else COMMAND_PROTOCOLS)
    if shook is None:
        return
    ws, protocol = shook
    channels = Channels(sock, ws, protocol or V1, idle_timeout)
    register(channels.close)
    if isinstance(request, PortForwardRequest):
        _port_forward(channels, request, query, backend)
    else:
        _command(channels, request, backend)


def _command(channels: Channels, request: Any, backend: StreamBackend) -> None:
    stdin = _Pipe() if request.stdin else None
    resizes = command.ResizeQueue() if request.tty else None

    def on_message(channel: int, payload: bytes) -> None:
        if channel == STDIN and stdin is not None:
            stdin.feed(payload)
        elif channel == RESIZE and resizes is not None:
            resizes.feed(payload)
        elif channel == CLOSE_SIGNAL and channels.protocol == V5 and payload[:1] == bytes([STDIN]) and stdin:
            stdin.end()

    def reader() -> None:
        channels.serve(on_message)
        if stdin is not None:
            stdin.end()
        if resizes is not None:
            resizes.end()

    t = threading.Thread(target=reader, name="ws-reader", daemon=True)
    t.start()
    stdout = _ChannelOut(channels, STDOUT) if request.stdout else None
    stderr = _ChannelOut(channels, STDERR) if request.stderr and not request.tty else None
    try:
        channels.send(STDOUT if stdout else STDERR if stderr else ERROR, b"")  # ready
    except OSError:
        return
    result = command.run(backend, request, Streams(stdin=stdin, stdout=stdout, stderr=stderr, resize=resizes))
    v4 = channels.protocol in (V5, V4, V4_B64)
    try:
        report = status.status_json(result) if v4 else status.status_text(result)
        if report:
            channels.send(ERROR, report)
    except OSError:
        pass
    channels.close()
    t.join(LINGER)


def _ports(request: PortForwardRequest, query: dict[str, list[str]]) -> list[int] | None:
    texts = [p for key in ("port", "ports") for v in query.get(key, []) for p in v.split(",") if p]
    if not texts:
        return list(request.ports)
    ports = [parse_port(t.strip()) for t in texts]
    if None in ports:
        return None
    return [p for p in ports if p is not None]


def _port_forward(channels: Channels, request: PortForwardRequest, query: dict[str, list[str]],
                  backend: StreamBackend) -> None:
    ports = _ports(request, query)
    if not ports or (request.ports and any(p not in request.ports for p in ports)):
        channels.close(1008)
        return
    conns: dict[int, socket.socket] = {}
    for i, port in enumerate(ports):
        prefix = struct.pack("<H", port)
        try:
            channels.send(2 * i, prefix)
            channels.send(2 * i + 1, prefix)
        except OSError:
            return
    for i, port in enumerate(ports):
        try:
            conns[i] = backend.port_forward(request.sandbox_id, port, CONNECT_TIMEOUT)
            conns[i].settimeout(None)
        except (PodvisorError, OSError) as exc:
            why = exc.message if isinstance(exc, PodvisorError) else str(exc)
            try:
                channels.send(2 * i + 1, f"error forwarding port {port} to pod sandbox {request.sandbox_id}: "
                              f"{why}".encode())
            except OSError:
                pass

    def on_message(channel: int, payload: bytes) -> None:
        conn = conns.get(channel // 2)
        if conn is not None and channel % 2 == 0 and payload:
            try:
                conn.sendall(payload)
            except OSError:
                pass

    pumps = [threading.Thread(target=_pump, args=(conn, channels, 2 * i), daemon=True) for i, conn in conns.items()]
    for p in pumps:
        p.start()
    if pumps:
        # The pod closed every connection: the session ends, as kubelet's
        # does once the runtime's forwards return (a WebSocket port forward
        # has no half-close, so the client learns the end only this way).
        threading.Thread(target=_close_when_done, args=(pumps, channels), daemon=True).start()
    channels.serve(on_message)
    for conn in conns.values():
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        conn.close()
    for p in pumps:
        p.join(LINGER)
    channels.close()


def _close_when_done(pumps: list[threading.Thread], channels: Channels) -> None:
    for p in pumps:
        p.join()
    channels.close()


def _pump(conn: socket.socket, channels: Channels, channel: int) -> None:
    try:
        while chunk := conn.recv(32 * 1024):
            channels.send(channel, chunk)
    except OSError:
        pass
