"""The CRI streaming server: the HTTP/1.1 endpoint behind the URLs Exec,
Attach and PortForward return. One thread per connection; h11 parses the
request, then the connection is upgraded to SPDY/3.1 (X-Stream-Protocol-Version
negotiation) or to a WebSocket (wsproto, Sec-WebSocket-Protocol) and handed
to the exec/attach or port-forward handler. Paths are /exec/{token},
/attach/{token} and /portforward/{token}, GET or POST; a token is good for
one request (agent.streaming.tokens)."""

from __future__ import annotations

import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

import h11
import structlog

from agent.domain.streaming import AttachRequest, ExecRequest, PortForwardRequest, StreamRequest
from agent.streaming import portforward, remotecommand, websocket
from agent.streaming.backend import StreamBackend
from agent.streaming.session import Session
from agent.streaming.tokens import RequestCache

log = structlog.get_logger(__name__)

HEADER_TIMEOUT = 30.0  # for the request line and headers (and a TLS handshake)
LINGER = 10.0  # after a session's last word, for the client to hang up first
MAX_HEADER_BYTES = 16 * 1024
_KINDS: dict[str, type] = {"exec": ExecRequest, "attach": AttachRequest, "portforward": PortForwardRequest}


@dataclass(frozen=True)
class Settings:
    address: str = "127.0.0.1"
    port: int = 0
    tls_cert_file: str = ""
    tls_key_file: str = ""
    idle_timeout_seconds: float = 4 * 3600.0
    max_sessions: int = 64


class _Reject(Exception):
    def __init__(self, status: int, message: str, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or []


def offered(values: list[bytes]) -> list[str]:
    """Header values, repeated or comma-separated, in order."""
    return [p.strip() for v in values for p in v.decode("latin-1").split(",") if p.strip()]


def negotiate(client: list[str], server: tuple[str, ...]) -> str:
    """The first protocol the client offers that the server serves (the
    X-Stream-Protocol-Version rules of docs/streaming-protocols.md)."""
    if not client:
        raise _Reject(400, "unable to upgrade: no X-Stream-Protocol-Version header")
    for proto in client:
        if proto in server:
            return proto
    raise _Reject(403, f"unable to upgrade: none of the protocols {client} is supported (supported: "
                  f"{list(server)})", [("X-Accepted-Stream-Protocol-Versions", p) for p in server])


class StreamingServer:
    def __init__(self, backend: StreamBackend, settings: Settings = Settings(),
                 cache: RequestCache | None = None, *,
                 tls_wrap: Callable[[socket.socket], socket.socket] | None = None,
                 url_host: str = "") -> None:
        """``tls_wrap``: a handshake of the caller's own (the mTLS endpoint's: TLS 1.3,
        client certificate, allow-list), instead of ``settings``' plain certificate;
        ``url_host``: the host written into URLs (default: the listening address)."""
        self._backend = backend
        self.settings = settings
        self.cache = cache if cache is not None else RequestCache()
        self._tls: ssl.SSLContext | None = None
        if settings.tls_cert_file:
            self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._tls.load_cert_chain(settings.tls_cert_file, settings.tls_key_file or None)
        self._tls_wrap = tls_wrap
        self._url_host = url_host
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self._active: dict[socket.socket, Callable[[], None] | None] = {}
        self._threads: set[threading.Thread] = set()
        self._stopping = threading.Event()
        self._accept_thread: threading.Thread | None = None

    # lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        host = self.settings.address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, self.settings.port), family=family, backlog=128)
        self._accept_thread = threading.Thread(target=self._accept_loop, name="streaming-accept", daemon=True)
        self._accept_thread.start()
        log.info("streaming server listening", url=self.base_url)

    @property
    def base_url(self) -> str:
        assert self._listener is not None, "not started"
        host, port = self._listener.getsockname()[:2]
        host = self._url_host or host
        if ":" in host:
            host = f"[{host}]"
        secure = self._tls is not None or self._tls_wrap is not None
        return f"{'https' if secure else 'http'}://{host}:{port}"

    def url_for(self, request: StreamRequest) -> str:
        kind = next(k for k, cls in _KINDS.items() if isinstance(request, cls))
        return f"{self.base_url}/{kind}/{self.cache.insert(request)}"

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        with self._lock:
            active = list(self._active.items())
        # GOAWAY / WebSocket close to every session; a closer stuck behind a
        # client that reads nothing is cut short by the shutdown below.
        closers = [threading.Thread(target=c, daemon=True) for _, c in active if c is not None]
        for t in closers:
            t.start()
        deadline = time.monotonic() + 2.0
        for t in closers:
            t.join(max(0.0, deadline - time.monotonic()))
        for sock, _ in active:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in list(self._threads):
            t.join(timeout)

    def active_sessions(self) -> int:
        with self._lock:
            return len(self._active)

    # connections -----------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, peer = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            t = threading.Thread(target=self._connection, args=(sock,), name="streaming-conn", daemon=True)
            with self._lock:
                self._threads.add(t)
            t.start()

    def _connection(self, raw: socket.socket) -> None:
        sock: socket.socket = raw
        try:
            raw.settimeout(HEADER_TIMEOUT)
            if self._tls_wrap is not None:
                sock = self._tls_wrap(raw)
            elif self._tls is not None:
                sock = self._tls.wrap_socket(raw, server_side=True)
            self._serve(sock)
        except (OSError, ssl.SSLError, h11.ProtocolError) as exc:
            log.debug("streaming connection ended", error=str(exc))
        except Exception:
            log.exception("streaming connection failed")
        finally:
            with self._lock:
                self._active.pop(sock, None)
                self._threads.discard(threading.current_thread())
            try:
                sock.close()
            except OSError:
                pass

    def _register(self, sock: socket.socket, closer: Callable[[], None] | None) -> None:
        with self._lock:
            self._active[sock] = closer

    def _serve(self, sock: socket.socket) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        raw = bytearray()
        request = None
        deadline = time.monotonic() + HEADER_TIMEOUT  # in all, however slowly the bytes come
        while request is None:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                _respond(sock, conn, exc.error_status_hint, f"bad request: {exc}", [])
                return
            if event is h11.NEED_DATA:
                if time.monotonic() > deadline:
                    return
                chunk = sock.recv(65536)
                if not chunk:
                    return
                raw += chunk
                conn.receive_data(chunk)
            elif isinstance(event, h11.Request):
                request = event
            else:
                return
        try:
            self._route(sock, conn, request, bytes(raw))
        except _Reject as rej:
            _respond(sock, conn, rej.status, str(rej), rej.headers)

    def _route(self, sock: socket.socket, conn: h11.Connection, req: h11.Request, raw: bytes) -> None:
        if req.method not in (b"GET", b"POST"):
            raise _Reject(405, "method not allowed", [("Allow", "GET, POST")])
        url = urllib.parse.urlsplit(req.target.decode("latin-1"))
        parts = url.path.strip("/").split("/")
        if len(parts) != 2 or parts[0] not in _KINDS:
            raise _Reject(404, "not found")
        headers: dict[bytes, list[bytes]] = {}
        for name, value in req.headers:
            headers.setdefault(name.lower(), []).append(value)
        upgrade = b" ".join(headers.get(b"upgrade", [])).lower()
        connection = b" ".join(headers.get(b"connection", [])).lower()
        if b"upgrade" not in connection or not (b"spdy/3.1" in upgrade or b"websocket" in upgrade):
            raise _Reject(400, "unable to upgrade: missing upgrade headers in request")
        with self._lock:
            if len(self._active) >= self.settings.max_sessions:
                raise _Reject(429, f"too many streaming sessions (at most {self.settings.max_sessions}); "
                              "try again later", [("Retry-After", "1")])
            self._active[sock] = None  # counted from here
        stream_request = self.cache.consume(parts[1])
        if stream_request is None or not isinstance(stream_request, _KINDS[parts[0]]):
            raise _Reject(404, "not found: the streaming URL is unknown, used or expired")
        sock.settimeout(None)
        if b"websocket" in upgrade:
            query = urllib.parse.parse_qs(url.query)
            websocket.serve(sock, raw, stream_request, query, self._backend,
                            self.settings.idle_timeout_seconds, lambda close: self._register(sock, close))
            return
        self._spdy(sock, conn, stream_request, headers)

    def _spdy(self, sock: socket.socket, conn: h11.Connection, request: StreamRequest,
              headers: dict[bytes, list[bytes]]) -> None:
        is_pf = isinstance(request, PortForwardRequest)
        server_protos = (portforward.PROTOCOL,) if is_pf else remotecommand.PROTOCOLS
        proto = negotiate(offered(headers.get(b"x-stream-protocol-version", [])), server_protos)
        while conn.next_event() not in (h11.PAUSED, h11.NEED_DATA):
            pass
        sock.sendall(conn.send(h11.InformationalResponse(status_code=101, reason=b"Switching Protocols", headers=[
            ("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1"), ("X-Stream-Protocol-Version", proto)])) or b"")
        initial = conn.trailing_data[0]
        idle = self.settings.idle_timeout_seconds
        if isinstance(request, PortForwardRequest):
            forwarder = portforward.PortForwarder(request, self._backend)
            session = Session(sock, forwarder.on_stream, idle, initial)
            self._register(sock, session.close)
            session.serve()
            session.close()
            return
        collector = remotecommand.StreamCollector(remotecommand.expected_streams(request, proto))
        session = Session(sock, collector.on_stream, idle, initial)
        self._register(sock, session.close)
        reader = threading.Thread(target=session.serve, name="spdy-reader", daemon=True)
        reader.start()
        remotecommand.serve(request, proto, self._backend, collector, session.done)
        session.done.wait(LINGER)  # the client hangs up once it has read everything
        session.close()
        reader.join(LINGER)


def _respond(sock: socket.socket, conn: h11.Connection, status: int, message: str,
             headers: list[tuple[str, str]]) -> None:
    body = (message + "\n").encode()
    try:
        out = conn.send(h11.Response(status_code=status, headers=[
            ("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
            ("Connection", "close"), *headers]))
        out = (out or b"") + (conn.send(h11.Data(data=body)) or b"") + (conn.send(h11.EndOfMessage()) or b"")
        sock.sendall(out)
    except (h11.LocalProtocolError, OSError) as exc:
        log.debug("could not answer a streaming request", error=str(exc))
