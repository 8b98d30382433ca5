"""A hostile OCI registry for tests: a small threaded HTTP server on 127.0.0.1.

It serves scripted answers per path (:class:`Reply`): any status and
headers, and bodies that are cut off mid-way (``drop_after``), trickle one
byte at a time (``trickle``), never end (``endless``, chunked) or claim a
length they do not have. :meth:`HostileRegistry.publish` lays out a valid
image (manifest by tag and digest, config, layers) whose routes a test then
replaces with the attack it wants. Every request is recorded (method, path,
headers). Nothing here connects anywhere: it only answers on 127.0.0.1.
"""

from __future__ import annotations

import gzip
import json
import secrets
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import zstandard

from agent.domain import oci
from tests.integration.registry_fixture import containerdisk_layer


@dataclass
class Reply:
    """One scripted answer."""

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    # Content-Length to announce (default: len(body)); ignored when chunked.
    content_length: int | None = None
    # Send only this many body bytes, then drop the connection.
    drop_after: int | None = None
    # Seconds between single body bytes (a slow-loris body).
    trickle: float = 0.0
    # Chunked transfer; with ``endless`` the body is followed by this chunk forever.
    chunked: bool = False
    endless: bytes = b""


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]


Route = Reply | Callable[[Seen], Reply]


@dataclass(frozen=True)
class Layer:
    """A layer blob as served, with the uncompressed digest the config lists."""

    blob: bytes
    media_type: str
    diff_id: str

    @property
    def digest(self) -> str:
        return oci.sha256_digest(self.blob)


def disk_tar(size: int = 1 << 20) -> bytes:
    """An uncompressed containerDisk layer: one raw disk of ``size`` bytes, unique
    (so no pull finds its layer already stored)."""
    marker = secrets.token_bytes(32)
    return containerdisk_layer({"disk/disk.img": marker + b"\x01" * (size - len(marker))}, compress=False)


def gzip_layer(tar: bytes) -> Layer:
    return Layer(gzip.compress(tar, mtime=0), oci.OCI_LAYER_GZIP, oci.sha256_digest(tar))


def zstd_layer(tar: bytes) -> Layer:
    return Layer(zstandard.ZstdCompressor().compress(tar), oci.OCI_LAYER_ZSTD, oci.sha256_digest(tar))


def manifest_reply(data: bytes, media_type: str = oci.OCI_MANIFEST, digest: str | None = None) -> Reply:
    """A manifest answer with its Content-Type and Docker-Content-Digest."""
    return Reply(headers={"Content-Type": media_type,
                          "Docker-Content-Digest": digest or oci.sha256_digest(data)}, body=data)


def index_bytes(entries: list[tuple[str, int, str]]) -> bytes:
    """An OCI index of linux/amd64 entries (digest, size, media type)."""
    return json.dumps({
        "schemaVersion": 2,
        "mediaType": oci.OCI_INDEX,
        "manifests": [{"mediaType": media_type, "digest": digest, "size": size,
                       "platform": {"os": "linux", "architecture": "amd64"}}
                      for digest, size, media_type in entries],
    }).encode()


@dataclass
class Published:
    """A valid image laid out on the hostile registry."""

    name: str  # repository name, e.g. "hostile/abc"
    tag: str
    manifest: bytes
    config: bytes
    layers: list[Layer]

    @property
    def digest(self) -> str:
        return oci.sha256_digest(self.manifest)

    @property
    def config_digest(self) -> str:
        return oci.sha256_digest(self.config)

    def manifest_path(self, reference: str | None = None) -> str:
        return f"/v2/{self.name}/manifests/{reference or self.tag}"

    def blob_path(self, digest: str) -> str:
        return f"/v2/{self.name}/blobs/{digest}"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    registry: HostileRegistry

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up on an attack is the point


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._answer()

    def do_HEAD(self) -> None:
        self._answer()

    def _answer(self) -> None:
        registry = self.server.registry
        path = self.path.split("?", 1)[0]
        seen = Seen(self.command, path, {k.lower(): v for k, v in self.headers.items()})
        registry.record(seen)
        route = registry.route(path)
        reply = route(seen) if callable(route) else route
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if reply.chunked or reply.endless:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            length = reply.content_length if reply.content_length is not None else len(reply.body)
            self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command == "HEAD":
            return
        try:
            self._body(reply, registry.stopping)
        except OSError:
            self.close_connection = True  # the client hung up

    def _body(self, reply: Reply, stopping: threading.Event) -> None:
        chunked = reply.chunked or bool(reply.endless)
        body = reply.body if reply.drop_after is None else reply.body[: reply.drop_after]

        def send(data: bytes) -> None:
            if not data:
                return
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            self.wfile.flush()

        if reply.trickle:
            for i in range(len(body)):
                if stopping.wait(reply.trickle):
                    raise OSError("server stopping")
                send(body[i:i + 1])
        else:
            send(body)
        if reply.drop_after is not None:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        while reply.endless and not stopping.is_set():
            if reply.trickle and stopping.wait(reply.trickle):
                break
            send(reply.endless)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()


class HostileRegistry:
    """The server; routes by exact path, 404 (distribution's JSON error) otherwise."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._routes: dict[str, Route] = {}
        self.requests: list[Seen] = []
        self.stopping = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.registry = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def serve(self, path: str, route: Route) -> None:
        with self._lock:
            self._routes[path] = route

    def route(self, path: str) -> Route:
        with self._lock:
            found = self._routes.get(path)
        if found is not None:
            return found
        error = {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "unknown"}]}
        return Reply(status=404, headers={"Content-Type": "application/json"}, body=json.dumps(error).encode())

    def record(self, seen: Seen) -> None:
        with self._lock:
            self.requests.append(seen)

    def seen(self, path: str) -> list[Seen]:
        with self._lock:
            return [s for s in self.requests if s.path == path]

    def image_ref(self, published: Published, reference: str | None = None) -> str:
        reference = reference or published.tag
        sep = "@" if reference.startswith("sha256:") else ":"
        return f"{self.host}/{published.name}{sep}{reference}"

    def publish(self, name: str, layers: list[Layer], tag: str = "v1",
                descriptor_sizes: Mapping[str, int] | None = None) -> Published:
        """Serve a valid image (``descriptor_sizes`` overrides what the manifest says of a blob)."""
        sizes = dict(descriptor_sizes or {})
        config = json.dumps({
            "architecture": "amd64", "os": "linux", "config": {},
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        }, separators=(",", ":")).encode()
        manifest = json.dumps({
            "schemaVersion": 2,
            "mediaType": oci.OCI_MANIFEST,
            "config": {"mediaType": oci.OCI_CONFIG, "digest": oci.sha256_digest(config), "size": len(config)},
            "layers": [{"mediaType": layer.media_type, "digest": layer.digest,
                        "size": sizes.get(layer.digest, len(layer.blob))} for layer in layers],
        }, separators=(",", ":")).encode()
        published = Published(name, tag, manifest, config, layers)
        self.serve(published.manifest_path(), manifest_reply(manifest))
        self.serve(published.manifest_path(published.digest), manifest_reply(manifest))
        for blob in [config, *(layer.blob for layer in layers)]:
            self.serve(published.blob_path(oci.sha256_digest(blob)), Reply(body=blob))
        return published
