"""``podvisorctl certs init``: a CA, a server and a client certificate for a lab mTLS set-up.

Made with ``cryptography`` (ECDSA P-256, SHA-256). Keys are written mode 0600,
certificates 0644; existing files are never overwritten. The functions are
also what the tests use to make their certificates (expired ones included).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_DAYS = 365
DEFAULT_CLIENT = "podvisor-shim"


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _general_name(text: str) -> x509.GeneralName:
    """``1.2.3.4``/``::1`` → IP, ``scheme://…`` → URI, anything else → DNS."""
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        pass
    if "://" in text:
        return x509.UniformResourceIdentifier(text)
    return x509.DNSName(text)


def make_ca(name: str = "podvisor lab CA", days: int = DEFAULT_DAYS) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return Issued(cert, key)


def issue(ca: Issued, common_name: str, sans: list[str], *, server: bool, days: int = DEFAULT_DAYS,
          not_before: dt.datetime | None = None, not_after: dt.datetime | None = None) -> Issued:
    """A leaf certificate signed by ``ca`` (server or client use)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    start = not_before or now - dt.timedelta(minutes=5)
    end = not_after or now + dt.timedelta(days=days)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
               .issuer_name(ca.cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(
                   [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                   critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                              critical=False))
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(s) for s in dict.fromkeys(sans)]), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def write_pair(directory: Path, stem: str, issued: Issued, *, key: bool = True) -> None:
    """``stem``.crt (0644) and ``stem``.key (0600); refuses to overwrite."""
    _write(directory / f"{stem}.crt", issued.cert_pem(), 0o644)
    if key:
        _write(directory / f"{stem}.key", issued.key_pem(), 0o600)


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # whatever the umask


def server_sans(extra: list[str]) -> list[str]:
    return ["localhost", "127.0.0.1", "::1", socket.gethostname(), *extra]


def init(directory: Path, *, server_name: str, sans: list[str], client_name: str, days: int) -> list[Path]:
    """ca.crt/ca.key, server.crt/server.key, client.crt/client.key in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    names = ["ca.crt", "ca.key", "server.crt", "server.key", "client.crt", "client.key"]
    present = [n for n in names if (directory / n).exists()]
    if present:
        raise FileExistsError(f"{directory} already holds {', '.join(present)}; choose an empty directory")
    ca = make_ca(days=days)
    server = issue(ca, server_name, server_sans([server_name, *sans]), server=True, days=days)
    client = issue(ca, client_name, [client_name], server=False, days=days)
    write_pair(directory, "ca", ca)
    write_pair(directory, "server", server)
    write_pair(directory, "client", client)
    return [directory / n for n in names]


def cmd_init(args: argparse.Namespace) -> str:
    if args.days < 1:
        raise SystemExit("podvisorctl: certs init --days: must be at least 1")
    try:
        paths = init(Path(args.dir), server_name=args.server_name, sans=args.san,
                     client_name=args.client_name, days=args.days)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"podvisorctl: certs init: {exc}") from None
    d = Path(args.dir).resolve()
    return "\n".join([
        *(f"wrote {p}" for p in paths),
        "",
        "agent config ([mtls] in agent.toml):",
        '  listen = "0.0.0.0:10010"',
        f'  cert_file = "{d}/server.crt"',
        f'  key_file = "{d}/server.key"',
        f'  client_ca_file = "{d}/ca.crt"',
        f'  allowed_clients = ["dns:{args.client_name}"]',
        '  streaming_url_host = "<this host\'s name or address>"',
        "client:",
        f"  podvisorctl --endpoint tcp://{args.server_name}:10010 --ca {d}/ca.crt "
        f"--cert {d}/client.crt --key {d}/client.key version",
        "keep ca.key offline (it signs clients); client.key belongs to the client only.",
    ])


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    certs = sub.add_parser("certs", help="certificates for the mTLS endpoint")
    csub = certs.add_subparsers(dest="certs_command", required=True, metavar="COMMAND")
    p = csub.add_parser("init", help="make a lab CA, a server and a client certificate in DIR")
    p.add_argument("dir", metavar="DIR", help="directory for ca/server/client .crt and .key (made 0700)")
    p.add_argument("--server-name", default=socket.gethostname(),
                   help="the server certificate's CN and first name (default: this host's name)")
    p.add_argument("--san", action="append", default=[], metavar="NAME",
                   help="another name or IP the agent is reached by (repeatable); localhost, "
                        "127.0.0.1, ::1 and the host name are always in")
    p.add_argument("--client-name", default=DEFAULT_CLIENT,
                   help=f"the client certificate's CN and DNS SAN (default: {DEFAULT_CLIENT})")
    p.add_argument("--days", type=int, default=DEFAULT_DAYS, help=f"validity in days (default: {DEFAULT_DAYS})")
    p.set_defaults(local=cmd_init)
