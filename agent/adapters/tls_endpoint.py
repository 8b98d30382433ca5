"""The control-plane endpoint: a mutual-TLS 1.3 terminator in front of the gRPC server.

grpcio's server credentials can neither pin TLS 1.3 nor refuse a client
identity during the handshake, so the agent terminates TLS itself (the
``ssl`` module, OpenSSL underneath) and relays the plaintext HTTP/2 bytes to
its own unix socket. Per connection:

1. TLS 1.3 handshake (nothing older is offered or accepted) with a required
   client certificate that must chain to the configured client CA and be
   within its validity period — OpenSSL refuses otherwise, in the handshake.
2. The verified certificate's identities (SAN DNS/URI/IP, subject CN) are
   matched against the allow-list; a client not on it is cut off at the end
   of the handshake, before a single byte it sent is read or relayed.
3. Only then a unix connection to the gRPC server is opened. It is bound to a
   private abstract address (``@podvisor-mtls-<pid>-<random>/<n>.<random>``) so the gRPC
   layer can tell from ``context.peer()`` that a call came over mTLS, and
   from whom (``identity_of``).

Every refusal is logged with the peer address, the identity when known and
the reason; key material never is. ``reload()`` (SIGHUP, or a change of the
files, polled every ``reload_interval`` seconds) builds a fresh SSL context for new connections;
established connections keep theirs and are never dropped.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.domain.tls_identity import AllowList, describe, identities

log = structlog.get_logger(__name__)

_RELAY_CHUNK = 256 * 1024


class TLSSetupError(Exception):
    """The certificate files cannot make a server context; the message names the file."""


class Refused(Exception):
    """A client the endpoint does not let in."""

    def __init__(self, reason: str, identity: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.identity = identity


@dataclass(frozen=True)
class TLSFiles:
    cert_file: str
    key_file: str
    client_ca_file: str


# Contexts -------------------------------------------------------------------


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TLSSetupError(f"{what} {path}: {exc.strerror or exc}") from None


def check_files(files: TLSFiles) -> None:
    """Every file there, parseable, and the key the certificate's: a clear error otherwise."""
    cert_pem = _read(files.cert_file, "cert_file")
    try:
        cert = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError:
        raise TLSSetupError(f"cert_file {files.cert_file}: no PEM certificate in it") from None
    key_pem = _read(files.key_file, "key_file")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        # The message never quotes the file: it is a secret.
        raise TLSSetupError(f"key_file {files.key_file}: not an unencrypted PEM private key") from None
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if key.public_key().public_bytes(enc, fmt) != cert.public_key().public_bytes(enc, fmt):
        raise TLSSetupError(f"key_file {files.key_file}: does not match the certificate in {files.cert_file}")
    try:
        cas = x509.load_pem_x509_certificates(_read(files.client_ca_file, "client_ca_file"))
    except ValueError:
        raise TLSSetupError(f"client_ca_file {files.client_ca_file}: no PEM certificate in it") from None
    if not cas:  # pragma: no cover - cryptography raises on an empty bundle
        raise TLSSetupError(f"client_ca_file {files.client_ca_file}: no PEM certificate in it")


def server_context(files: TLSFiles) -> ssl.SSLContext:
    """TLS 1.3 only, client certificate required and verified against the client CA."""
    check_files(files)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    try:
        ctx.load_cert_chain(files.cert_file, files.key_file)
        ctx.load_verify_locations(cafile=files.client_ca_file)
    except (ssl.SSLError, OSError) as exc:
        raise TLSSetupError(f"cannot load the certificates ({files.cert_file}, {files.client_ca_file}): "
                            f"{exc}") from None
    return ctx


def _refusal_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"client certificate rejected: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"):
            return "no client certificate"
        if reason in ("UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION", "WRONG_VERSION_NUMBER",
                      "NO_SHARED_CIPHER", "VERSION_TOO_LOW"):
            return f"not TLS 1.3 ({reason})"
        return f"TLS handshake failed: {reason or exc}"
    if isinstance(exc, TimeoutError):
        return "TLS handshake timed out"
    return f"TLS handshake failed: {exc}"


class Gate:
    """The current server context, the allow-list, reloads and the refusal log."""

    def __init__(self, files: TLSFiles, allowed: Iterable[str], *, endpoint: str = "mtls") -> None:
        self.files = files
        self.allow = AllowList(allowed)
        self.endpoint = endpoint
        self._lock = threading.Lock()
        self._ctx = server_context(files)
        self._stamp = self._file_stamp()
        self.reloads = 0

    @property
    def context(self) -> ssl.SSLContext:
        with self._lock:
            return self._ctx

    def _file_stamp(self) -> tuple[tuple[int, int, int, int], ...]:
        out = []
        for path in (self.files.cert_file, self.files.key_file, self.files.client_ca_file):
            try:
                st = os.stat(path)
                out.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
            except OSError:
                out.append((0, 0, 0, 0))
        return tuple(out)

    def reload(self, why: str = "SIGHUP") -> bool:
        """A new context for new connections; on failure the old one stays."""
        stamp = self._file_stamp()
        try:
            ctx = server_context(self.files)
        except TLSSetupError as exc:
            log.error("TLS certificates not reloaded; the previous ones stay in use", endpoint=self.endpoint,
                      trigger=why, error=str(exc))
            with self._lock:
                self._stamp = stamp  # do not retry the same broken files every poll
            return False
        with self._lock:
            self._ctx = ctx
            self._stamp = stamp
            self.reloads += 1
        log.info("TLS certificates reloaded", endpoint=self.endpoint, trigger=why)
        return True

    def changed(self) -> bool:
        with self._lock:
            return self._file_stamp() != self._stamp

    def check_peer(self, peercert: dict[str, Any] | None) -> str:
        """The identity string of an admitted, verified peer; raises Refused."""
        names = identities(peercert or {})
        who = describe(names)
        if not self.allow.admits(names):
            raise Refused("identity not on the allow-list", who)
        return who

    def refused(self, peer: str, exc: BaseException) -> None:
        if isinstance(exc, Refused):
            log.warning("TLS client refused", endpoint=self.endpoint, peer=peer, identity=exc.identity,
                        reason=exc.reason)
        else:
            log.warning("TLS client refused", endpoint=self.endpoint, peer=peer, identity="(unverified)",
                        reason=_refusal_reason(exc))

    def wrap_blocking(self, raw: socket.socket) -> ssl.SSLSocket:
        """Handshake on a blocking socket (the streaming server's threads); raises on refusal."""
        peer = _peer_of(raw)
        try:
            tls = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.refused(peer, exc)
            raise
        try:
            self.check_peer(tls.getpeercert())
        except Refused as exc:
            self.refused(peer, exc)
            tls.close()
            raise ConnectionRefusedError(f"TLS client refused: {exc.reason}") from None
        return tls


def _peer_of(sock: socket.socket) -> str:
    try:
        addr = sock.getpeername()
    except OSError:
        return "?"
    return f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)


# The terminator ---------------------------------------------------------------


class Terminator:
    """Listens on TCP, admits mTLS 1.3 clients, relays them to the gRPC unix socket.

    One thread per connection does the handshake, then relays both ways with
    non-blocking sockets and a selector: one thread owns the SSL object (OpenSSL
    objects must not be read and written from two threads at once) and a
    small call costs two system calls per hop, not an event loop's round.
    """

    def __init__(self, gate: Gate, host: str, port: int, backend: Path, *,
                 handshake_timeout: float = 10.0, reload_interval: float = 2.0) -> None:
        self.gate = gate
        self._host = host
        self._port = port
        self._backend = str(backend)
        self._handshake_timeout = handshake_timeout
        self._reload_interval = reload_interval
        self._prefix = f"podvisor-mtls-{os.getpid()}-{secrets.token_hex(6)}/"
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._peers: dict[str, str] = {}  # abstract backend address → client identity
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.address: tuple[str, int] = (host, port)

    # lifecycle -------------------------------------------------------------
    def bind(self) -> None:
        """Take the address (OSError if it cannot); clients wait in the backlog until ``start``."""
        if self._listener is None:
            self._listener = socket.create_server(
                (self._host, self._port), family=socket.AF_INET6 if ":" in self._host else socket.AF_INET,
                backlog=128)
            self.address = self._listener.getsockname()[:2]

    def start(self) -> None:
        self.bind()
        self._threads = [threading.Thread(target=self._accept_loop, name="mtls-accept", daemon=True)]
        if self._reload_interval > 0:
            self._threads.append(threading.Thread(target=self._watch, name="mtls-reload", daemon=True))
        for t in self._threads:
            t.start()
        log.info("mTLS endpoint listening", address=f"{self.address[0]}:{self.address[1]}",
                 tls="1.3 only, client certificate required")

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener and every relayed connection (after the gRPC drain)."""
        self._stopping.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        with self._lock:
            conns = list(self._conns.items())
        for sock, _ in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout  # for all of them: relays notice within a second
        for t in [*self._threads, *(t for _, t in conns)]:
            t.join(max(0.0, deadline - time.monotonic()))

    def _watch(self) -> None:
        while not self._stopping.wait(self._reload_interval):
            if self.gate.changed():
                self.gate.reload("files changed")

    def identity_of(self, peer: str) -> str | None:
        """The client identity of a relayed connection, from the gRPC peer string."""
        name = peer.removeprefix("unix-abstract:")
        if name == peer or not name.startswith(self._prefix):
            return None
        with self._lock:
            return self._peers.get(name)

    def connections(self) -> int:
        with self._lock:
            return len(self._peers)

    # connections -------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                raw, _ = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            t = threading.Thread(target=self._connection, args=(raw,), name="mtls-conn", daemon=True)
            with self._lock:
                self._conns[raw] = t
            t.start()

    def _connection(self, raw: socket.socket) -> None:
        peer = _peer_of(raw)
        name = ""
        tls: ssl.SSLSocket | None = None
        up: socket.socket | None = None
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # A client that vanishes without a FIN (a dead machine, a cut link) frees its thread.
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6)
            raw.settimeout(self._handshake_timeout)
            try:
                tls = self.gate.context.wrap_socket(raw, server_side=True)
                who = self.gate.check_peer(tls.getpeercert())
            except (Refused, ssl.SSLError, OSError) as exc:
                self.gate.refused(peer, exc)
                return
            # Abstract names are visible in /proc/net/unix: a random part per connection keeps
            # anyone from binding a name before the endpoint does.
            name = f"{self._prefix}{next(self._ids)}.{secrets.token_hex(6)}"
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                up.bind("\0" + name)
                with self._lock:
                    self._peers[name] = who
                up.settimeout(self._handshake_timeout)
                up.connect(self._backend)
            except OSError as exc:
                log.error("mTLS endpoint cannot reach the gRPC socket", socket=self._backend, error=str(exc))
                return
            log.debug("mTLS client admitted", peer=peer, identity=who)
            _relay(tls, up, self._stopping)
        except Exception:  # noqa: BLE001 - one connection's bug must not end the endpoint
            log.exception("mTLS connection failed", peer=peer)
        finally:
            with self._lock:
                self._peers.pop(name, None)
                self._conns.pop(raw, None)
            for s in (up, tls, raw):
                if s is not None:
                    with contextlib.suppress(OSError):
                        s.close()


def _relay(tls: ssl.SSLSocket, up: socket.socket, stopping: threading.Event) -> None:
    """Both directions until either side ends; this thread alone touches ``tls``."""
    tls.setblocking(False)
    up.setblocking(False)
    to_up = bytearray()  # read from the client, not yet written to the gRPC socket
    to_tls = bytearray()  # the other way
    tls_eof = up_eof = False
    sel = selectors.DefaultSelector()
    try:
        while not stopping.is_set():
            tls_events = 0
            if not tls_eof and len(to_up) < _RELAY_CHUNK:
                tls_events |= selectors.EVENT_READ
            if to_tls:
                tls_events |= selectors.EVENT_WRITE
            up_events = 0
            if not up_eof and len(to_tls) < _RELAY_CHUNK:
                up_events |= selectors.EVENT_READ
            if to_up:
                up_events |= selectors.EVENT_WRITE
            if tls_eof and up_eof and not to_up and not to_tls:
                return
            if (tls_eof and not to_up and not up_events) or (up_eof and not to_tls and not tls_events):
                return
            _register(sel, tls, tls_events)
            _register(sel, up, up_events)
            # Bytes OpenSSL already decrypted wait in its buffer, not in the socket.
            ready = [] if tls.pending() and tls_events & selectors.EVENT_READ else sel.select(1.0)
            readable = {key.fileobj for key, ev in ready if ev & selectors.EVENT_READ}
            if (tls in readable or tls.pending()) and not tls_eof and len(to_up) < _RELAY_CHUNK:
                try:
                    data = tls.recv(_RELAY_CHUNK)
                    if data:
                        to_up += data
                    else:
                        tls_eof = True
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
                except (ssl.SSLError, OSError):
                    return
            if up in readable and not up_eof:
                try:
                    data = up.recv(_RELAY_CHUNK)
                    if data:
                        to_tls += data
                    else:
                        up_eof = True
                except BlockingIOError:
                    pass
                except OSError:
                    return
            if to_up:
                try:
                    del to_up[:up.send(to_up)]
                except BlockingIOError:
                    pass
                except OSError:
                    return
            if to_tls:
                try:
                    del to_tls[:tls.send(to_tls)]
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
                except (ssl.SSLError, OSError):
                    return
            if tls_eof and not to_up:
                with contextlib.suppress(OSError):
                    up.shutdown(socket.SHUT_WR)
            if up_eof and not to_tls:
                return  # the gRPC server hung up: so does the client's connection
    finally:
        sel.close()


def _register(sel: selectors.BaseSelector, sock: socket.socket, events: int) -> None:
    try:
        key = sel.get_key(sock)
    except KeyError:
        if events:
            sel.register(sock, events)
        return
    if not events:
        sel.unregister(sock)
    elif key.events != events:
        sel.modify(sock, events)


def on_hup(gate: Gate) -> Callable[..., None]:
    """A SIGHUP handler: the reload runs in a thread, never inside the signal handler."""
    def handler(*_: object) -> None:
        threading.Thread(target=gate.reload, args=("SIGHUP",), name="mtls-sighup", daemon=True).start()
    return handler
