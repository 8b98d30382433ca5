"""The mTLS endpoint in front of a real gRPC server on a unix socket, in process.

Real certificates (tests/mtls/certfiles.py), real TLS on 127.0.0.1, a real
grpcio server behind; a counting interceptor shows whether a call ever
reached a handler. Refusals must happen in the handshake and be logged.
"""

from __future__ import annotations

import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agent.adapters.tls_endpoint import Gate, Terminator, TLSFiles, TLSSetupError, on_hup
from agent.api.origin import OriginInterceptor, mtls_client
from tests.mtls.certfiles import Generation, client_context, generation, install, server_serial


@dataclass
class Calls(grpc.ServerInterceptor):  # type: ignore[misc]
    """Counts calls that reach a handler, with the mTLS identity they carried."""

    seen: list[str | None] = field(default_factory=list)

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        def behavior(request: Any, context: Any) -> Any:
            self.seen.append(mtls_client.get())
            return inner(request, context)

        return handler._replace(unary_unary=behavior)


@dataclass
class Endpoint:
    gen: Generation
    terminator: Terminator
    health: health.HealthServicer
    calls: Calls
    socket: Path

    @property
    def port(self) -> int:
        return self.terminator.address[1]

    def channel(self, cert: tuple[str, str] | None, ca: str | None = None) -> grpc.Channel:
        ca_pem = Path(ca or self.gen.path("ca.crt")).read_bytes()
        if cert is None:
            creds = grpc.ssl_channel_credentials(ca_pem)
        else:
            creds = grpc.ssl_channel_credentials(ca_pem, Path(cert[1]).read_bytes(), Path(cert[0]).read_bytes())
        return grpc.secure_channel(f"localhost:{self.port}", creds,
                                   options=[("grpc.use_local_subchannel_pool", 1)])


def check(channel: grpc.Channel) -> Any:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[Endpoint]:
    gen = generation(tmp_path / "live")
    calls = Calls()
    sock_dir = Path(tempfile.mkdtemp(prefix="pv-mtls-", dir="/tmp"))
    sock = sock_dir / "grpc.sock"
    gate = Gate(TLSFiles(gen.path("server.crt"), gen.path("server.key"), gen.path("ca.crt")),
                ["dns:shim", "uri:spiffe://lab/shim2", "cn:by-cn-only", "ip:10.1.2.3"])
    term = Terminator(gate, "127.0.0.1", 0, sock, reload_interval=0.1)
    server = grpc.server(futures.ThreadPoolExecutor(8),
                         interceptors=[OriginInterceptor(term.identity_of), calls])
    hs = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    server.add_insecure_port(f"unix:{sock}")
    server.start()
    term.start()
    try:
        yield Endpoint(gen, term, hs, calls, sock)
    finally:
        term.stop()
        server.stop(0).wait(5)
        sock.unlink(missing_ok=True)
        sock_dir.rmdir()


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield captured


def refusals(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "TLS client refused"]


def wait_for(cond: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def test_a_listed_client_is_served_and_named(endpoint: Endpoint) -> None:
    ch = endpoint.channel(endpoint.gen.client("shim"))
    assert check(ch).status == health_pb2.HealthCheckResponse.SERVING
    assert endpoint.calls.seen == ["dns:shim,cn:shim"]
    # the unix socket itself still serves, and its calls carry no mTLS identity
    with grpc.insecure_channel(f"unix:{endpoint.socket}") as local:
        check(local)
    assert endpoint.calls.seen[-1] is None
    ch.close()


@pytest.mark.parametrize("cert_sans, cn", [(["spiffe://lab/shim2"], "x"), ([], "by-cn-only"), (["10.1.2.3"], "y")])
def test_uri_cn_and_ip_identities(endpoint: Endpoint, cert_sans: list[str], cn: str) -> None:
    with endpoint.channel(endpoint.gen.client(cn, sans=cert_sans)) as ch:
        check(ch)
    assert len(endpoint.calls.seen) == 1


def refused_in_handshake(endpoint: Endpoint, logs: list[dict[str, Any]], ctx: ssl.SSLContext) -> dict[str, Any]:
    """A raw TLS client: the handshake (or the first read after it) fails, no call runs, one refusal logged."""
    with socket.create_connection(("127.0.0.1", endpoint.port), timeout=10) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError, EOFError)):
            tls = ctx.wrap_socket(raw, server_hostname="localhost")
            # TLS 1.3: the client finishes first; the server's verdict comes with the next read
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            if tls.recv(1) == b"":
                raise EOFError("closed")
    wait_for(lambda: refusals(logs), "the refusal in the log")
    assert endpoint.calls.seen == []
    (entry,) = refusals(logs)
    return entry


def test_no_client_certificate_is_refused(endpoint: Endpoint, logs: list[dict[str, Any]]) -> None:
    entry = refused_in_handshake(endpoint, logs, client_context(endpoint.gen.path("ca.crt")))
    assert entry["reason"] == "no client certificate"
    with endpoint.channel(None) as ch, pytest.raises(grpc.RpcError) as err:
        check(ch)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert endpoint.calls.seen == []


def test_another_ca_is_refused(endpoint: Endpoint, logs: list[dict[str, Any]], tmp_path: Path) -> None:
    other = generation(tmp_path / "other", "another CA")
    cert, key = other.client("shim")  # the right name, the wrong issuer
    entry = refused_in_handshake(endpoint, logs, client_context(endpoint.gen.path("ca.crt"), cert, key))
    assert "unable to get local issuer certificate" in entry["reason"]
    with endpoint.channel((cert, key)) as ch, pytest.raises(grpc.RpcError):
        check(ch)
    assert endpoint.calls.seen == []


def test_an_expired_certificate_is_refused(endpoint: Endpoint, logs: list[dict[str, Any]]) -> None:
    cert, key = endpoint.gen.client("shim", expired=True)
    entry = refused_in_handshake(endpoint, logs, client_context(endpoint.gen.path("ca.crt"), cert, key))
    assert "certificate has expired" in entry["reason"]
    with endpoint.channel((cert, key)) as ch, pytest.raises(grpc.RpcError):
        check(ch)
    assert endpoint.calls.seen == []


def test_an_identity_not_on_the_list_is_refused(endpoint: Endpoint, logs: list[dict[str, Any]]) -> None:
    cert, key = endpoint.gen.client("intruder")
    entry = refused_in_handshake(endpoint, logs, client_context(endpoint.gen.path("ca.crt"), cert, key))
    assert entry["reason"] == "identity not on the allow-list"
    assert entry["identity"] == "dns:intruder,cn:intruder"
    with endpoint.channel((cert, key)) as ch, pytest.raises(grpc.RpcError) as err:
        check(ch)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert endpoint.calls.seen == []
    assert all("PRIVATE KEY" not in str(e) for e in logs)


def test_a_tls12_only_client_is_refused(endpoint: Endpoint, logs: list[dict[str, Any]]) -> None:
    cert, key = endpoint.gen.client("shim")
    ctx = client_context(endpoint.gen.path("ca.crt"), cert, key, max_version=ssl.TLSVersion.TLSv1_2)
    entry = refused_in_handshake(endpoint, logs, ctx)
    assert entry["reason"].startswith("not TLS 1.3")


def test_rotation_keeps_open_connections_and_serves_new_ones_the_new_certificate(
        endpoint: Endpoint, tmp_path: Path) -> None:
    old_client = endpoint.gen.client("shim")
    old_ca = str(tmp_path / "old-ca.crt")
    Path(old_ca).write_bytes(endpoint.gen.pem("ca.crt"))
    old_serial = server_serial(endpoint.port, old_ca, *old_client)
    ch = endpoint.channel(old_client, old_ca)
    watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service="svc"))
    endpoint.health.set("svc", health_pb2.HealthCheckResponse.SERVING)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    check(ch)

    new = generation(tmp_path / "next", "next CA")
    new_client = new.client("shim")
    install(new, endpoint.gen.directory)  # the files change under the running endpoint
    gate = endpoint.terminator.gate
    wait_for(lambda: gate.reloads == 1, "the reload after the files changed")

    # the open stream and connection go on
    endpoint.health.set("svc", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    check(ch)
    # new connections: the new server certificate; old-CA clients are strangers now
    assert server_serial(endpoint.port, new.path("ca.crt"), *new_client) == new.server.cert.serial_number != old_serial
    with endpoint.channel(new_client, new.path("ca.crt")) as ch2:
        check(ch2)
    with endpoint.channel(old_client, new.path("ca.crt")) as ch3, pytest.raises(grpc.RpcError):
        check(ch3)

    # SIGHUP's handler: a reload of the same files again; a broken file keeps the current context
    on_hup(gate)()
    wait_for(lambda: gate.reloads == 2, "the SIGHUP reload")
    Path(endpoint.gen.path("server.key")).write_text("not a key\n")
    assert gate.reload("test") is False
    with endpoint.channel(new_client, new.path("ca.crt")) as ch4:
        check(ch4)
    endpoint.health.set("svc", health_pb2.HealthCheckResponse.SERVING)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    ch.close()


def test_many_calls_and_large_messages_pass_intact(endpoint: Endpoint) -> None:
    """The relay under concurrency: parallel calls on one connection, big payloads both ways."""
    ch = endpoint.channel(endpoint.gen.client("shim"))
    name = "x" * (3 * 1024 * 1024)  # a 3 MiB request; NOT_FOUND echoes nothing back, so check ordering too
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(20):
                check(ch)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    with pytest.raises(grpc.RpcError) as err:
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=name), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(endpoint.calls.seen) == 121
    ch.close()


def test_bad_files_are_clear_errors(tmp_path: Path) -> None:
    gen = generation(tmp_path / "g")
    other = generation(tmp_path / "o", "other")
    files = TLSFiles(gen.path("server.crt"), other.path("server.key"), gen.path("ca.crt"))
    with pytest.raises(TLSSetupError, match="does not match the certificate"):
        Gate(files, ["*"])
    with pytest.raises(TLSSetupError, match="client_ca_file .*No such file"):
        Gate(TLSFiles(gen.path("server.crt"), gen.path("server.key"), str(tmp_path / "nope.crt")), ["*"])
    Path(tmp_path / "junk.key").write_text("-----BEGIN PRIVATE KEY-----\nsecret\n")
    with pytest.raises(TLSSetupError) as err:
        Gate(TLSFiles(gen.path("server.crt"), str(tmp_path / "junk.key"), gen.path("ca.crt")), ["*"])
    assert "secret" not in str(err.value)


def test_a_stalled_handshake_is_dropped(tmp_path: Path, logs: list[dict[str, Any]]) -> None:
    gen = generation(tmp_path / "g")
    gate = Gate(TLSFiles(gen.path("server.crt"), gen.path("server.key"), gen.path("ca.crt")), ["*"])
    term = Terminator(gate, "127.0.0.1", 0, tmp_path / "unused.sock", handshake_timeout=0.3, reload_interval=0)
    term.start()
    try:
        with socket.create_connection(("127.0.0.1", term.address[1]), timeout=30) as raw:
            assert raw.recv(1) == b""  # the endpoint hung up on a client that says nothing
        wait_for(lambda: refusals(logs), "the refusal")
        assert refusals(logs)[0]["reason"] == "TLS handshake timed out"
    finally:
        term.stop()
