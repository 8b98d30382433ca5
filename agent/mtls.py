"""Wiring of the control-plane endpoint ([mtls]): the daemon's part, kept apart.

``MTLSEndpoint.prepare`` runs before the gRPC server is built: it checks the
certificate files (a clear StartupError otherwise), starts the HTTPS
streaming server and hands the daemon the interceptor and the URL router.
``start`` opens the TCP listener once the gRPC socket serves; ``stop`` closes
it after the gRPC drain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog

from agent.adapters.tls_endpoint import Gate, Terminator, TLSFiles, TLSSetupError, on_hup
from agent.api.origin import OriginInterceptor, RoutedURLs
from agent.config import MTLSConfig, StreamingConfig
from agent.domain.tls_identity import split_listen
from agent.services.ports import StreamURLs
from agent.streaming.backend import StreamBackend
from agent.streaming.server import Settings, StreamingServer

log = structlog.get_logger(__name__)


def sighup_handler(endpoint: MTLSEndpoint | None) -> Callable[..., None]:
    """SIGHUP re-reads the endpoint's certificates; without an endpoint it is logged and ignored
    (never the default action, which would end the agent)."""
    if endpoint is not None:
        return on_hup(endpoint.gate)

    def ignore(*_: object) -> None:
        log.info("SIGHUP: nothing to reload ([mtls] is off)")

    return ignore


class MTLSStartupError(Exception):
    """The endpoint cannot start; the message names the [mtls] key."""


@dataclass
class MTLSEndpoint:
    gate: Gate
    terminator: Terminator
    streaming: StreamingServer

    @classmethod
    def prepare(cls, m: MTLSConfig, st: StreamingConfig, backend: StreamBackend, socket: Path) -> MTLSEndpoint:
        try:
            gate = Gate(TLSFiles(m.cert_file, m.key_file, m.client_ca_file), m.allowed_clients)
        except TLSSetupError as exc:
            raise MTLSStartupError(f"[mtls] {exc}") from None
        host, port = split_listen(m.listen)
        terminator = Terminator(gate, host, port, socket, handshake_timeout=m.handshake_timeout_seconds,
                                reload_interval=m.reload_interval_seconds)
        try:
            terminator.bind()
        except OSError as exc:
            raise MTLSStartupError(f"[mtls] listen: cannot listen on {m.listen}: {exc}") from None
        streaming = StreamingServer(
            backend,
            Settings(address=m.streaming_address or host, port=m.streaming_port,
                     idle_timeout_seconds=st.idle_timeout_seconds, max_sessions=st.max_sessions),
            tls_wrap=gate.wrap_blocking, url_host=m.streaming_url_host)
        try:
            streaming.start()
        except OSError as exc:
            terminator.stop()
            raise MTLSStartupError(f"[mtls] streaming_address/streaming_port: cannot serve on "
                                   f"{m.streaming_address or host}:{m.streaming_port}: {exc}") from None
        return cls(gate, terminator, streaming)

    def interceptors(self) -> tuple[grpc.ServerInterceptor, ...]:
        return (OriginInterceptor(self.terminator.identity_of),)

    def urls(self, local: StreamURLs) -> StreamURLs:
        return RoutedURLs(local, self.streaming)

    def start(self) -> None:
        try:
            self.terminator.start()
        except OSError as exc:
            self.streaming.stop()
            raise MTLSStartupError(f"[mtls] listen: cannot listen on {self.terminator.address}: {exc}") from None

    def stop(self) -> None:
        self.terminator.stop()
        self.streaming.stop()
