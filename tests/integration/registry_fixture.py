"""A real OCI registry for tests: Debian's ``docker-registry`` on 127.0.0.1.

Each fixture starts ``/usr/bin/docker-registry`` (distribution 2.8) once per
test session with its own generated config: filesystem storage in a temporary
directory, ``127.0.0.1:<free port>``, and optionally

* ``htpasswd`` auth — the bcrypt file is written with the ``bcrypt`` PyPI
  package (distribution accepts ``$2b$`` hashes);
* ``token`` auth — a real Docker token service (:class:`TokenServer`, an
  ``http.server`` on 127.0.0.1 in a thread) issuing RS256 JWTs signed with a
  throw-away key whose self-signed certificate is the registry's
  ``rootcertbundle``; the ``openssl`` CLI makes the key and signs;
* TLS — a self-signed certificate for IP 127.0.0.1, made with ``openssl``.

The process is always killed in a ``finally``. Reuse from another test module
by importing the fixtures (pytest finds them in the module namespace)::

    from tests.integration.registry_fixture import registry  # noqa: F401

Helpers :func:`containerdisk_layer` and :func:`push_image` build and push
small images with the agent's own registry client.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import secrets
import shutil
import socket
import subprocess
import tarfile
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import bcrypt
import httpx
import pytest

from agent.adapters.registry import RegistryClient
from agent.domain import oci
from agent.domain.imageref import RemoteRepository

REGISTRY_BINARY = Path("/usr/bin/docker-registry")
LOOPBACK = "127.0.0.1"
START_TIMEOUT = 20.0
TOKEN_SERVICE = "podvisor-test-registry"
TOKEN_ISSUER = "podvisor-test-token-issuer"


def free_port() -> int:
    """A TCP port nothing listens on right now (on 127.0.0.1 only)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def write_htpasswd(path: Path, users: Mapping[str, str]) -> None:
    """An htpasswd file with bcrypt hashes (the only kind distribution accepts)."""
    lines = [
        f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()}"
        for user, password in users.items()
    ]
    path.write_text("\n".join(lines) + "\n")


def self_signed_certificate(workdir: Path, name: str, *, ip: str | None = None) -> tuple[Path, Path]:
    """(certificate, key) PEM files; with ``ip`` the certificate is valid for that address."""
    cert = workdir / f"{name}.crt"
    key = workdir / f"{name}.key"
    command = [
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
    ]  # fmt: skip
    if ip:
        command += ["-addext", f"subjectAltName=IP:{ip}"]
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    return cert, key


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class QuietHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that does not print clients hanging up."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


@dataclass
class TokenRequest:
    """What the token service saw, for assertions."""

    account: str | None
    scopes: list[str]
    service: str | None
    granted: bool


class TokenServer:
    """A Docker token-auth service for distribution's ``auth: token``.

    Users with the right password get every action they ask for; anonymous
    requests get a token without access (so the registry still refuses);
    wrong passwords get 401. Tokens are RS256 JWTs whose ``x5c`` header
    carries the signing certificate, which the registry trusts through
    ``rootcertbundle``.
    """

    def __init__(self, workdir: Path, users: Mapping[str, str], *, lifetime: int = 300) -> None:
        self.users = dict(users)
        self.lifetime = lifetime
        self.requests: list[TokenRequest] = []
        self.cert, self.key = self_signed_certificate(workdir, "token-signer")
        der = subprocess.run(
            ["openssl", "x509", "-in", str(self.cert), "-outform", "DER"],
            check=True,
            capture_output=True,
            timeout=30,
        ).stdout
        self._x5c = base64.b64encode(der).decode()
        self._server = QuietHTTPServer((LOOPBACK, 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def realm(self) -> str:
        """The token endpoint URL the registry sends clients to."""
        return f"http://{LOOPBACK}:{self._server.server_address[1]}/token"

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()

    def issue(self, account: str, scopes: list[str]) -> str:
        """A signed token granting ``account`` the actions in ``scopes``."""
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {
            "iss": TOKEN_ISSUER,
            "sub": account,
            "aud": TOKEN_SERVICE,
            "exp": now + self.lifetime,
            "nbf": now - 30,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(),
            check=True,
            capture_output=True,
            timeout=30,
        ).stdout
        return f"{signing_input}.{_b64url(signature)}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                url = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(url.query)
                scopes = query.get("scope", [])
                account = None
                granted = False
                header = self.headers.get("Authorization", "")
                if header.startswith("Basic "):
                    user, _, password = base64.b64decode(header[6:]).decode().partition(":")
                    if server.users.get(user) != password:
                        server.requests.append(TokenRequest(user, scopes, None, False))
                        self._reply(401, {"details": "incorrect username or password"})
                        return
                    account, granted = user, True
                service = query.get("service", [""])[0] or None
                server.requests.append(TokenRequest(account, scopes, service, granted))
                token = server.issue(account or "", scopes if granted else [])
                self._reply(200, {"token": token, "access_token": token, "expires_in": server.lifetime})

            def _reply(self, status: int, payload: dict[str, Any]) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        return Handler


@dataclass
class RunningRegistry:
    """A started docker-registry and what tests need to reach and inspect it."""

    host: str
    root: Path
    config_path: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    users: dict[str, str] = field(default_factory=dict)
    token_server: TokenServer | None = None
    tls_cert: Path | None = None

    @property
    def url(self) -> str:
        """Base URL, ``http://127.0.0.1:<port>`` (``https`` with TLS)."""
        return f"{'https' if self.tls_cert else 'http'}://{self.host}"

    def repository(self, name: str) -> RemoteRepository:
        """A repository on this registry, as the client addresses it."""
        return RemoteRepository(registry=self.host, host=self.host, name=name)

    def blob_data_path(self, digest: str) -> Path:
        """Where the registry keeps a blob's bytes (tests tamper with it)."""
        hex_digest = oci.digest_hex(digest)
        return self.root / "docker/registry/v2/blobs/sha256" / hex_digest[:2] / hex_digest / "data"

    def log_tail(self, lines: int = 40) -> str:
        """The end of the registry's log, for failure messages."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def _write_config(
    path: Path,
    *,
    storage: Path,
    addr: str,
    htpasswd: Path | None,
    token_server: TokenServer | None,
    tls: tuple[Path, Path] | None,
) -> None:
    # JSON is YAML, so no YAML writer is needed.
    http: dict[str, Any] = {"addr": addr, "secret": secrets.token_hex(16)}
    if tls is not None:
        http["tls"] = {"certificate": str(tls[0]), "key": str(tls[1])}
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "info", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage)},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": http,
    }
    if htpasswd is not None:
        config["auth"] = {"htpasswd": {"realm": "podvisor-test", "path": str(htpasswd)}}
    elif token_server is not None:
        config["auth"] = {
            "token": {
                "realm": token_server.realm,
                "service": TOKEN_SERVICE,
                "issuer": TOKEN_ISSUER,
                "rootcertbundle": str(token_server.cert),
            }
        }
    path.write_text(json.dumps(config, indent=2))


def _wait_ready(process: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"docker-registry exited with {process.returncode}: {log_path.read_text()[-2000:]}")
        try:
            response = httpx.get(f"{url}/v2/", timeout=1.0, verify=False)
        except httpx.TransportError:
            time.sleep(0.1)
            continue
        if response.status_code in (200, 401):
            return
        time.sleep(0.1)
    raise RuntimeError(f"docker-registry did not answer on {url} within {START_TIMEOUT} s")


@contextmanager
def run_registry(
    workdir: Path,
    *,
    users: Mapping[str, str] | None = None,
    token_server: TokenServer | None = None,
    tls: bool = False,
) -> Iterator[RunningRegistry]:
    """Run docker-registry in ``workdir`` until the block exits.

    ``users`` turns on htpasswd auth; ``token_server`` turns on token auth
    (the caller starts and stops it); ``tls`` serves HTTPS with a fresh
    self-signed certificate for 127.0.0.1.
    """
    if not REGISTRY_BINARY.exists():
        pytest.skip(f"{REGISTRY_BINARY} is missing: apt-get install docker-registry")
    if shutil.which("openssl") is None and (tls or token_server is not None):
        pytest.skip("openssl is missing")
    workdir.mkdir(parents=True, exist_ok=True)
    storage = workdir / "storage"
    storage.mkdir(exist_ok=True)
    htpasswd = None
    if users:
        htpasswd = workdir / "htpasswd"
        write_htpasswd(htpasswd, users)
    tls_files = self_signed_certificate(workdir, "registry", ip=LOOPBACK) if tls else None
    config_path = workdir / "config.yml"
    log_path = workdir / "registry.log"

    last_error: Exception | None = None
    for _ in range(3):  # a free port can be taken between probing and binding
        host = f"{LOOPBACK}:{free_port()}"
        _write_config(
            config_path,
            storage=storage,
            addr=host,
            htpasswd=htpasswd,
            token_server=token_server,
            tls=tls_files,
        )
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                [str(REGISTRY_BINARY), "serve", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        try:
            scheme = "https" if tls else "http"
            try:
                _wait_ready(process, f"{scheme}://{host}", log_path)
            except RuntimeError as exc:
                last_error = exc
                continue
            yield RunningRegistry(
                host=host,
                root=storage,
                config_path=config_path,
                log_path=log_path,
                process=process,
                users=dict(users or {}),
                token_server=token_server,
                tls_cert=tls_files[0] if tls_files else None,
            )
            return
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
    raise RuntimeError(f"docker-registry would not start: {last_error}")


# --- fixtures ------------------------------------------------------------------


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    """An open registry (no auth, plain HTTP) on 127.0.0.1."""
    with run_registry(tmp_path_factory.mktemp("registry-open")) as running:
        yield running


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    """A registry with htpasswd (Basic) auth; user ``podvisor``, a random password."""
    users = {"podvisor": secrets.token_urlsafe(12)}
    with run_registry(tmp_path_factory.mktemp("registry-htpasswd"), users=users) as running:
        yield running


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    """A registry with Docker token (Bearer) auth backed by a :class:`TokenServer`."""
    workdir = tmp_path_factory.mktemp("registry-token")
    users = {"podvisor": secrets.token_urlsafe(12)}
    if shutil.which("openssl") is None:
        pytest.skip("openssl is missing")
    token_server = TokenServer(workdir, users)
    token_server.start()
    try:
        with run_registry(workdir, users=None, token_server=token_server) as running:
            running.users = users
            yield running
    finally:
        token_server.stop()


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    """An open registry serving HTTPS with a self-signed certificate for 127.0.0.1."""
    with run_registry(tmp_path_factory.mktemp("registry-tls"), tls=True) as running:
        yield running


# --- building and pushing test images -------------------------------------------------


def containerdisk_layer(files: Mapping[str, bytes], *, compress: bool = True) -> bytes:
    """A layer tarball (gzip by default) holding ``files`` (paths like ``disk/disk.img``).

    Parent directories are added; files are owned by uid/gid 107 like
    KubeVirt's containerDisks. Timestamps are fixed so the bytes are stable.
    """
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directories: set[str] = set()
        for name in sorted(files):
            parts = name.split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                directory = "/".join(parts[:depth])
                if directory not in directories:
                    directories.add(directory)
                    info = tarfile.TarInfo(directory)
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o555
                    info.uid = info.gid = 107
                    tar.addfile(info)
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            info.mode = 0o444
            info.uid = info.gid = 107
            tar.addfile(info, io.BytesIO(files[name]))
    if not compress:
        return raw.getvalue()
    return gzip.compress(raw.getvalue(), mtime=0)


@dataclass(frozen=True)
class PushedImage:
    """What :func:`push_image` pushed."""

    repository: RemoteRepository
    tag: str | None
    digest: str
    manifest: bytes
    media_type: str
    config: bytes
    layers: tuple[bytes, ...]


def push_image(
    client: RegistryClient,
    repository: RemoteRepository,
    tag: str | None,
    layers: list[bytes],
    *,
    architecture: str = "amd64",
    docker: bool = False,
    annotations: Mapping[str, str] | None = None,
) -> PushedImage:
    """Push a single-platform image (OCI by default, Docker schema 2 with ``docker``).

    Layers are taken as gzip tarballs (as :func:`containerdisk_layer` makes).
    Without a tag the manifest is pushed by digest only.
    """
    diff_ids = [oci.sha256_digest(gzip.decompress(layer)) for layer in layers]
    config = json.dumps(
        {
            "architecture": architecture,
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "config": {},
        },
        separators=(",", ":"),
    ).encode()
    layer_type = oci.DOCKER_LAYER_GZIP if docker else oci.OCI_LAYER_GZIP
    config_type = oci.DOCKER_CONFIG if docker else oci.OCI_CONFIG
    media_type = oci.DOCKER_MANIFEST_V2 if docker else oci.OCI_MANIFEST
    for blob in [config, *layers]:
        client.push_blob(repository, blob)
    manifest = oci.ImageManifest(
        media_type=media_type,
        config=oci.Descriptor(config_type, oci.sha256_digest(config), len(config)),
        layers=tuple(oci.Descriptor(layer_type, oci.sha256_digest(layer), len(layer)) for layer in layers),
        annotations=dict(annotations or {}),
    )
    data = oci.encode_manifest(manifest)
    digest = client.push_manifest(repository, tag or oci.sha256_digest(data), data, media_type)
    return PushedImage(repository, tag, digest, data, media_type, config, tuple(layers))
