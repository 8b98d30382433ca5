"""Real certificates for the mTLS tests, made with agent.cli.certs (cryptography)."""

from __future__ import annotations

import datetime as dt
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from agent.cli.certs import Issued, issue, make_ca, server_sans


@dataclass
class Generation:
    """One CA with a server certificate and clients signed by it, written to ``directory``."""

    directory: Path
    ca: Issued
    server: Issued

    def path(self, name: str) -> str:
        return str(self.directory / name)

    def client(self, name: str, *, expired: bool = False, sans: list[str] | None = None) -> tuple[str, str]:
        now = dt.datetime.now(dt.UTC)
        c = issue(self.ca, name, [name] if sans is None else sans, server=False,
                  not_before=now - dt.timedelta(days=10) if expired else None,
                  not_after=now - dt.timedelta(days=1) if expired else None)
        return write(self.directory, f"client-{name}", c)

    def pem(self, name: str) -> bytes:
        return (self.directory / name).read_bytes()


def write(directory: Path, stem: str, issued: Issued) -> tuple[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert.write_bytes(issued.cert_pem())
    key.write_bytes(issued.key_pem())
    key.chmod(0o600)
    return str(cert), str(key)


def generation(directory: Path, ca_name: str = "test CA") -> Generation:
    ca = make_ca(ca_name)
    server = issue(ca, "podvisor-test-server", server_sans([]), server=True)
    write(directory, "ca", ca)
    write(directory, "server", server)
    return Generation(directory, ca, server)


def install(gen: Generation, target: Path) -> None:
    """Replace server.crt, server.key and ca.crt in ``target`` (each by an atomic rename)."""
    for name in ("server.key", "server.crt", "ca.crt"):
        tmp = target / f".{name}.new"
        tmp.write_bytes(gen.pem(name))
        os.replace(tmp, target / name)


def client_context(ca: str, cert: str | None = None, key: str | None = None, *,
                   max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)
    if cert:
        ctx.load_cert_chain(cert, key)
    if max_version is not None:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.maximum_version = max_version
    return ctx


def server_serial(port: int, ca: str, cert: str, key: str) -> int:
    """The serial number of the certificate the endpoint presents now (a fresh connection)."""
    import socket

    from cryptography import x509

    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            client_context(ca, cert, key).wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number
