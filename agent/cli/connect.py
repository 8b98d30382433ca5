"""How podvisorctl reaches the agent: its unix socket, or the mTLS endpoint over TCP.

``--endpoint unix:///path`` (the default, the same as ``--socket``) or
``--endpoint tcp://host:port`` with ``--cert``, ``--key`` and ``--ca`` (each
also from the environment: PODVISOR_ENDPOINT, PODVISOR_CERT, PODVISOR_KEY,
PODVISOR_CA). Over TCP the client presents its certificate and checks the
agent's against the CA; the streaming URLs that calls return are then HTTPS
and the same client certificate opens them.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from urllib.parse import urlsplit

import grpc

from agent.cli import streams

ENDPOINT_ENV = "PODVISOR_ENDPOINT"
CERT_ENV = "PODVISOR_CERT"
KEY_ENV = "PODVISOR_KEY"
CA_ENV = "PODVISOR_CA"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class EndpointError(Exception):
    """A bad --endpoint or missing certificate flags; the message says which."""


def add_arguments(p: argparse.ArgumentParser, socket_env: str, default_socket: str) -> None:
    p.add_argument("--socket", default=os.environ.get(socket_env) or default_socket,
                   help=f"agent socket (default: ${socket_env} or {default_socket})")
    p.add_argument("--endpoint", default=os.environ.get(ENDPOINT_ENV) or "",
                   help=f"unix:///PATH or tcp://HOST:PORT (mutual TLS; needs --cert, --key, --ca); "
                        f"default: ${ENDPOINT_ENV}, else --socket")
    p.add_argument("--cert", default=os.environ.get(CERT_ENV) or "", metavar="FILE",
                   help=f"client certificate (PEM) for tcp:// (default: ${CERT_ENV})")
    p.add_argument("--key", default=os.environ.get(KEY_ENV) or "", metavar="FILE",
                   help=f"client private key (PEM) for tcp:// (default: ${KEY_ENV})")
    p.add_argument("--ca", default=os.environ.get(CA_ENV) or "", metavar="FILE",
                   help=f"CA bundle that signed the agent's certificate, for tcp:// (default: ${CA_ENV})")


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise EndpointError(f"{flag} {path}: {exc.strerror or exc}") from None


def tcp_target(endpoint: str) -> str | None:
    """``host:port`` of a tcp:// endpoint; None for unix://; EndpointError otherwise."""
    parts = urlsplit(endpoint)
    if parts.scheme == "unix":
        return None
    if parts.scheme != "tcp" or not parts.hostname or parts.path not in ("", "/"):
        raise EndpointError(f"--endpoint {endpoint!r}: expected unix:///PATH or tcp://HOST:PORT")
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        raise EndpointError(f"--endpoint {endpoint!r}: tcp:// needs a port (tcp://HOST:PORT)")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{port}"


def remote_channel(args: argparse.Namespace) -> grpc.Channel | None:
    """The mTLS channel for a tcp:// endpoint, or None (then ``args.socket`` is the unix socket)."""
    endpoint = args.endpoint
    if not endpoint:
        return None
    target = tcp_target(endpoint)
    if target is None:
        path = urlsplit(endpoint).path
        if not path.startswith("/"):
            raise EndpointError(f"--endpoint {endpoint!r}: unix:// needs an absolute path (unix:///run/…)")
        args.socket = path
        return None
    missing = [f for f, v in (("--cert", args.cert), ("--key", args.key), ("--ca", args.ca)) if not v]
    if missing:
        raise EndpointError(f"--endpoint {endpoint}: mutual TLS needs {', '.join(missing)} "
                            f"(or ${CERT_ENV}, ${KEY_ENV}, ${CA_ENV})")
    creds = grpc.ssl_channel_credentials(root_certificates=_read(args.ca, "--ca"),
                                         private_key=_read(args.key, "--key"),
                                         certificate_chain=_read(args.cert, "--cert"))
    # HTTPS streaming URLs from this endpoint: same CA, same client certificate.
    streams.use_client_certificate(args.cert, args.key)
    if getattr(args, "stream_ca", "") is None:
        args.stream_ca = args.ca
    return grpc.secure_channel(target, creds, options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ])
