"""Registry client: the only module that speaks the distribution HTTP API.

Pulls (manifests, configs, blobs streamed to disk with SHA-256 verification)
and pushes (blobs with cross-repository mount, manifests) over httpx.

Behaviour, after containerd's remotes/docker resolver:

* Auth: every request goes out anonymously until a registry answers 401; its
  ``WWW-Authenticate`` challenge is remembered per endpoint. ``Basic`` sends
  the credentials; ``Bearer`` fetches a token from the realm (with basic auth
  when there are credentials, or an OAuth2 refresh-token grant with an
  identity token), cached per (realm, service, scope, credentials) until it
  expires. Credentials come from a lookup by registry name.
* TLS: system CAs; a per-registry CA file; ``insecure`` registries skip
  verification and may be spoken to over plain HTTP. Loopback registries
  (``localhost:*``, ``127.0.0.1:*``) try HTTPS first and fall back to HTTP.
* Failures: connection errors, 5xx and 429 are retried with bounded
  exponential backoff; a registry still failing is ``Unavailable``; 404 is
  ``NotFound`` naming the image; refused credentials are ``Unauthenticated``
  naming the registry; content that does not match its digest is
  ``FailedPrecondition`` and never left on disk.
"""

from __future__ import annotations

import base64
import hashlib
import io
import ipaddress
import json
import os
import random
import ssl
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import httpx
import structlog

from agent.adapters.blobstream import BlobProgress
from agent.domain.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PodvisorError,
    Unauthenticated,
    Unavailable,
)
from agent.domain.imageref import (
    ImageRef,
    Mirror,
    RemoteRepository,
    RewriteRule,
    normalise_registry,
    pull_candidates,
)
from agent.domain.oci import (
    MANIFEST_ACCEPT,
    AuthChallenge,
    Descriptor,
    ImageIndex,
    ImageManifest,
    is_digest,
    parse_digest,
    parse_manifest_document,
    parse_www_authenticate,
    pull_scope,
    push_scope,
    select_platform,
    sha256_digest,
    strip_media_type_parameters,
)

log = structlog.get_logger(__name__)

# distribution refuses manifests over 4 MiB; so do we, before parsing.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_CONFIG_BYTES = 16 * 1024 * 1024
CHUNK_SIZE = 1024 * 1024
DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=60.0, write=60.0, pool=30.0)
DEFAULT_TOKEN_LIFETIME = 60.0
# Refresh tokens a little early so a request never leaves with one about to expire.
TOKEN_EXPIRY_MARGIN = 5.0
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
USER_AGENT = "podvisor-agent/0.1"
_MAX_INDEX_DEPTH = 2
_TAG_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


# --- configuration values --------------------------------------------------------


@dataclass(frozen=True)
class RegistryCredentials:
    """Credentials for one registry, shaped like CRI's ``AuthConfig``.

    ``auth`` is base64 ``user:password`` (used when username/password are
    empty); ``identity_token`` is an OAuth2 refresh token exchanged at the
    token endpoint; ``registry_token`` is a bearer token sent as is. Secrets
    are kept out of ``repr`` so they never reach a log line.
    """

    username: str = ""
    password: str = field(default="", repr=False)
    auth: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)

    @classmethod
    def from_auth_config(cls, auth_config: Any) -> RegistryCredentials:
        """Build from a CRI ``AuthConfig`` message (or anything with its fields)."""
        return cls(
            username=getattr(auth_config, "username", "") or "",
            password=getattr(auth_config, "password", "") or "",
            auth=getattr(auth_config, "auth", "") or "",
            identity_token=getattr(auth_config, "identity_token", "") or "",
            registry_token=getattr(auth_config, "registry_token", "") or "",
        )

    def basic(self) -> tuple[str, str] | None:
        """(username, password) from the explicit fields or the ``auth`` string."""
        if self.username or self.password:
            return self.username, self.password
        if self.auth:
            try:
                decoded = base64.b64decode(self.auth, validate=False).decode()
            except (ValueError, UnicodeDecodeError):
                return None
            user, sep, password = decoded.partition(":")
            if sep:
                return user, password
        return None

    def is_empty(self) -> bool:
        """True when there is nothing to authenticate with."""
        return not (self.basic() or self.identity_token or self.registry_token)

    def fingerprint(self) -> str:
        """A stable hash identifying these credentials, for cache keys."""
        material = "\0".join([self.username, self.password, self.auth, self.identity_token, self.registry_token])
        return hashlib.sha256(material.encode()).hexdigest()


CredentialLookup = Callable[[str], RegistryCredentials | None]


def credentials_for(registry: str, credentials: RegistryCredentials | None) -> CredentialLookup:
    """A lookup returning ``credentials`` for ``registry`` only (Docker Hub aliases match).

    ``registry`` may be written as CRI's ``server_address``: with a scheme or
    a ``/v1/`` path (``https://index.docker.io/v1/``). It must not be empty:
    CRI's ``server_address`` is optional, and credentials meant for the
    image's registry must not reach a mirror, so pass
    ``server_address or ref.registry``.
    """
    wanted = normalise_registry(_strip_server_address(registry))
    if not wanted:
        raise ValueError("credentials_for needs the registry the credentials belong to")

    def lookup(name: str) -> RegistryCredentials | None:
        if credentials is not None and normalise_registry(name) == wanted:
            return credentials
        return None

    return lookup


def _strip_server_address(address: str) -> str:
    host = address.split("://", 1)[-1]
    return host.split("/", 1)[0]


@dataclass(frozen=True)
class RegistryHostConfig:
    """TLS settings for one registry (keyed by its name, e.g. ``127.0.0.1:5000``)."""

    ca_file: str | None = None
    insecure: bool = False


@dataclass(frozen=True)
class FetchedManifest:
    """A manifest or index as served: its digest, media type and exact bytes."""

    digest: str
    media_type: str
    data: bytes


@dataclass(frozen=True)
class ResolvedImage:
    """A reference resolved to one linux/amd64 image manifest.

    ``digest``/``media_type``/``manifest_bytes`` describe the platform manifest;
    ``reference_digest`` is what the reference itself points at (the index when
    the image is multi-platform) — the digest shown in RepoDigests.
    """

    ref: ImageRef
    repository: RemoteRepository
    digest: str
    media_type: str
    manifest_bytes: bytes
    manifest: ImageManifest
    reference_digest: str
    index: ImageIndex | None = None


class _Sink(Protocol):
    """Where a download goes: a file or a buffer that can be rewound."""

    def write(self, data: bytes, /) -> int: ...

    def seek(self, offset: int, /) -> int: ...

    def truncate(self, size: int | None = None, /) -> int: ...


class _MemorySink(io.BytesIO):
    pass


class _ProgressSink:
    """Writes through to the file and tells a follower how far it got."""

    def __init__(self, out: Any, progress: BlobProgress) -> None:
        self._out = out
        self._progress = progress

    def write(self, data: bytes, /) -> int:
        n = int(self._out.write(data))
        self._progress.wrote(n)
        return n

    def seek(self, offset: int, /) -> int:
        if offset == 0 and self._progress.written:
            self._progress.restarted()
        return int(self._out.seek(offset))

    def truncate(self, size: int | None = None, /) -> int:
        return int(self._out.truncate(size))


@dataclass
class _Token:
    value: str
    expires_at: float


# --- the client ---------------------------------------------------------------


class RegistryClient:
    """A thread-safe client for OCI distribution registries.

    One instance is shared by the whole agent so connections, learnt auth
    challenges and tokens are reused. Every method that talks to a registry
    accepts ``credentials`` to override the constructor's lookup for that call
    (CRI passes an ``AuthConfig`` per ``PullImage``).
    """

    def __init__(
        self,
        *,
        credentials: CredentialLookup | None = None,
        hosts: Mapping[str, RegistryHostConfig] | None = None,
        rewrites: Sequence[RewriteRule] = (),
        mirrors: Sequence[Mirror] = (),
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        max_attempts: int = 4,
        backoff_initial: float = 0.5,
        backoff_max: float = 8.0,
        platform: tuple[str, str, str | None] = ("linux", "amd64", None),
        user_agent: str = USER_AGENT,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self._credentials = credentials
        self._hosts = {normalise_registry(k): v for k, v in (hosts or {}).items()}
        self._rewrites = tuple(rewrites)
        self._mirrors = tuple(mirrors)
        self._timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self._max_attempts = max_attempts
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._platform = platform
        self._user_agent = user_agent
        self._sleep = sleep
        self._clock = clock
        self._lock = threading.Lock()
        self._clients: dict[str, httpx.Client] = {}
        self._schemes: dict[str, str] = {}
        self._challenges: dict[str, AuthChallenge] = {}
        self._tokens: dict[tuple[str, str, str, str], _Token] = {}

    # -- lifecycle

    def close(self) -> None:
        """Close every pooled connection."""
        with self._lock:
            clients = list(self._clients.values())
            self._clients.clear()
        for client in clients:
            client.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- pulling

    def candidates(self, ref: ImageRef) -> list[RemoteRepository]:
        """Where ``ref`` would be pulled from, in order (rewrites and mirrors applied)."""
        return pull_candidates(ref, self._rewrites, self._mirrors)

    def resolve(self, ref: ImageRef, *, credentials: CredentialLookup | None = None) -> ResolvedImage:
        """Resolve ``ref`` to its linux/amd64 manifest, trying mirrors then the registry.

        A mirror that fails in any way is skipped (and logged); the error of the
        last candidate is raised.
        """
        candidates = self.candidates(ref)
        for position, repo in enumerate(candidates):
            try:
                return self.resolve_in(repo, ref, credentials=credentials)
            except PodvisorError as exc:
                if position == len(candidates) - 1:
                    raise
                log.warning(
                    "registry.candidate_failed",
                    image=str(ref),
                    endpoint=str(repo),
                    error=exc.message,
                )
        raise AssertionError("pull_candidates always returns the upstream")  # pragma: no cover

    def resolve_in(
        self,
        repo: RemoteRepository,
        ref: ImageRef,
        *,
        credentials: CredentialLookup | None = None,
    ) -> ResolvedImage:
        """Resolve ``ref``'s tag or digest in ``repo``, following an index to linux/amd64."""
        source = str(ref)
        top = self.fetch_manifest(repo, ref.reference, credentials=credentials, image=source)
        document = parse_manifest_document(top.data, top.media_type, source=source)
        current = top
        index: ImageIndex | None = None
        depth = 0
        while isinstance(document, ImageIndex):
            depth += 1
            if depth > _MAX_INDEX_DEPTH:
                raise FailedPrecondition(f"{source}: indexes are nested too deeply")
            index = document
            os_name, architecture, variant = self._platform
            entry = select_platform(document, os_name, architecture, variant, source=source)
            current = self.fetch_manifest(repo, entry.digest, credentials=credentials, image=source)
            if len(current.data) != entry.size:
                raise FailedPrecondition(
                    f"{source}: manifest {entry.digest} is {len(current.data)} bytes, the index says {entry.size}"
                )
            document = parse_manifest_document(current.data, current.media_type or entry.media_type, source=source)
        log.info(
            "registry.resolved",
            image=source,
            endpoint=str(repo),
            digest=current.digest,
            reference_digest=top.digest,
        )
        return ResolvedImage(
            ref=ref,
            repository=repo,
            digest=current.digest,
            media_type=document.media_type,
            manifest_bytes=current.data,
            manifest=document,
            reference_digest=top.digest,
            index=index,
        )

    def fetch_manifest(
        self,
        repo: RemoteRepository,
        reference: str,
        *,
        credentials: CredentialLookup | None = None,
        image: str | None = None,
    ) -> FetchedManifest:
        """GET a manifest or index by tag or digest, verifying its digest.

        By digest, the bytes must hash to it. By tag, the registry's
        ``Docker-Content-Digest`` is used when present and must match the bytes
        when it is a sha256 digest; otherwise the digest is computed.
        """
        _check_reference(reference)
        what = image or f"{repo}:{reference}"
        response = self._send(
            repo,
            "GET",
            f"/v2/{repo.name}/manifests/{reference}",
            scopes=(pull_scope(repo.name),),
            credentials=credentials,
            headers={"Accept": MANIFEST_ACCEPT},
            stream=True,
        )
        with closing(response):
            if response.status_code == 404:
                raise NotFound(
                    f"image {what} not found: registry {repo.registry} has no manifest "
                    f"{reference!r} in repository {repo.name}"
                )
            self._check_status(response, repo, f"manifest {reference} of {what}", ok=(200,))
            data = _read_limited(response, MAX_MANIFEST_BYTES, f"manifest of {what}")
        computed = sha256_digest(data)
        if is_digest(reference):
            if computed != reference:
                raise FailedPrecondition(
                    f"image {what}: registry {repo.registry} served a manifest that hashes to "
                    f"{computed}, not the requested {reference}"
                )
            digest = reference
        else:
            header = response.headers.get("docker-content-digest", "").strip()
            if is_digest(header) and header != computed:
                raise FailedPrecondition(
                    f"image {what}: registry {repo.registry} says the manifest is {header} but it hashes to {computed}"
                )
            digest = computed
        media_type = strip_media_type_parameters(response.headers.get("content-type"))
        return FetchedManifest(digest=digest, media_type=media_type, data=data)

    def fetch_config(
        self,
        repo: RemoteRepository,
        config: Descriptor,
        *,
        credentials: CredentialLookup | None = None,
    ) -> bytes:
        """The image config blob (held in memory, size-limited, verified)."""
        if config.size > MAX_CONFIG_BYTES:
            raise FailedPrecondition(
                f"config {config.digest} of {repo} is {config.size} bytes, more than the {MAX_CONFIG_BYTES} allowed"
            )
        return self.fetch_blob_bytes(repo, config.digest, expected_size=config.size, credentials=credentials)

    def fetch_blob_bytes(
        self,
        repo: RemoteRepository,
        digest: str,
        *,
        expected_size: int | None = None,
        limit: int = MAX_CONFIG_BYTES,
        credentials: CredentialLookup | None = None,
    ) -> bytes:
        """A small blob in memory, verified against ``digest`` (and ``expected_size``)."""
        digest = parse_digest(digest)
        sink = _MemorySink()
        self._download(repo, digest, sink, expected_size, limit, credentials)
        return sink.getvalue()

    def fetch_blob(
        self,
        repo: RemoteRepository,
        digest: str,
        dest_path: str | os.PathLike[str],
        *,
        expected_size: int | None = None,
        credentials: CredentialLookup | None = None,
        progress: BlobProgress | None = None,
    ) -> int:
        """Stream a blob to ``dest_path`` and return its size.

        With ``progress``, another thread may follow the file while it is
        written (agent.adapters.blobstream); the digest is still checked before
        the file is renamed into place, and a failure reaches the follower.

        The content goes to a temporary file beside ``dest_path`` while being
        hashed, and is renamed into place only once its SHA-256 (and size, when
        given) match; on any failure the temporary file is removed and
        ``dest_path`` is untouched.
        """
        digest = parse_digest(digest)
        dest = Path(dest_path)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial")
        tmp = Path(tmp_name)
        try:
            if progress is not None:
                progress.started(tmp_name)
            # Unbuffered when followed, so a reader sees every chunk at once.
            with os.fdopen(fd, "wb", buffering=0 if progress is not None else -1) as out:
                sink: _Sink = out if progress is None else _ProgressSink(out, progress)
                size = self._download(repo, digest, sink, expected_size, None, credentials)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if progress is not None:
                progress.finished(exc)
            raise
        if progress is not None:
            progress.finished()
        _fsync_dir(dest.parent)
        log.info("registry.blob_fetched", endpoint=str(repo), digest=digest, size=size)
        return size

    def _download(
        self,
        repo: RemoteRepository,
        digest: str,
        sink: _Sink,
        expected_size: int | None,
        limit: int | None,
        credentials: CredentialLookup | None,
    ) -> int:
        """Copy a blob into ``sink`` while hashing it; return its verified size.

        A stream that breaks off is restarted from scratch (the sink is
        rewound) within the retry budget. What the sink holds is only valid
        when this returns; the caller discards it on an exception.
        """
        for attempt in range(1, self._max_attempts + 1):
            sink.seek(0)
            sink.truncate()
            hasher = hashlib.sha256()
            size = 0
            response = self._send(
                repo,
                "GET",
                f"/v2/{repo.name}/blobs/{digest}",
                scopes=(pull_scope(repo.name),),
                credentials=credentials,
                # Blobs are stored compressed already; a transparent transport
                # encoding would only make the hash check ambiguous.
                headers={"Accept-Encoding": "identity"},
                stream=True,
            )
            try:
                with closing(response):
                    if response.status_code == 404:
                        raise NotFound(f"blob {digest} not found in repository {repo.name} of registry {repo.registry}")
                    self._check_status(response, repo, f"blob {digest}", ok=(200,))
                    # iter_raw avoids a re-chunking copy; a transfer encoding we
                    # did not ask for still gets decoded.
                    encoded = response.headers.get("content-encoding", "identity") not in ("", "identity")
                    chunks = response.iter_bytes(CHUNK_SIZE) if encoded else response.iter_raw()
                    for chunk in chunks:
                        size += len(chunk)
                        if expected_size is not None and size > expected_size:
                            raise FailedPrecondition(
                                f"blob {digest} from registry {repo.registry} ({repo.name}) is "
                                f"larger than the {expected_size} bytes its descriptor says"
                            )
                        if limit is not None and size > limit:
                            raise FailedPrecondition(
                                f"blob {digest} from registry {repo.registry} is larger than the {limit} bytes allowed"
                            )
                        hasher.update(chunk)
                        sink.write(chunk)
            except (httpx.TransportError, httpx.StreamError) as exc:
                if attempt >= self._max_attempts:
                    raise Unavailable(
                        f"registry {repo.registry} broke off the download of blob {digest} "
                        f"after {attempt} attempts: {exc}"
                    ) from None
                self._backoff(attempt, repo.registry, f"blob download interrupted: {exc}")
                continue
            actual = "sha256:" + hasher.hexdigest()
            if actual != digest:
                raise FailedPrecondition(
                    f"blob {digest} from registry {repo.registry} ({repo.name}) failed "
                    f"verification: its content hashes to {actual}"
                )
            if expected_size is not None and size != expected_size:
                raise FailedPrecondition(
                    f"blob {digest} from registry {repo.registry} ({repo.name}) is {size} bytes, "
                    f"its descriptor says {expected_size}"
                )
            return size
        raise AssertionError("unreachable")  # pragma: no cover

    def blob_exists(
        self,
        repo: RemoteRepository,
        digest: str,
        *,
        credentials: CredentialLookup | None = None,
        scopes: Sequence[str] | None = None,
    ) -> bool:
        """HEAD the blob: True when ``repo`` has it."""
        digest = parse_digest(digest)
        response = self._send(
            repo,
            "HEAD",
            f"/v2/{repo.name}/blobs/{digest}",
            scopes=tuple(scopes) if scopes else (pull_scope(repo.name),),
            credentials=credentials,
        )
        with closing(response):
            if response.status_code == 404:
                return False
            self._check_status(response, repo, f"blob {digest}", ok=(200,))
            return True

    # -- pushing

    def push_blob(
        self,
        repo: RemoteRepository,
        content: bytes | str | os.PathLike[str],
        digest: str | None = None,
        *,
        mount_from: str | None = None,
        credentials: CredentialLookup | None = None,
    ) -> str:
        """Upload a blob (bytes or a file path) unless ``repo`` already has it.

        Returns its digest (computed when not given; a given digest is trusted
        to the registry, which verifies it). With ``mount_from`` (a repository
        name on the same registry) a cross-repository mount is tried first.
        """
        if isinstance(content, bytes):
            size = len(content)
            data: bytes | None = content
            path: Path | None = None
        else:
            path = Path(content)
            size = path.stat().st_size
            data = None
        if digest is None:
            digest = sha256_digest(data) if data is not None else _hash_file(path)  # type: ignore[arg-type]
        else:
            digest = parse_digest(digest)
        scopes = [push_scope(repo.name)]
        if mount_from:
            scopes.append(pull_scope(mount_from))
        if self.blob_exists(repo, digest, credentials=credentials, scopes=scopes):
            log.info("registry.blob_exists", endpoint=str(repo), digest=digest)
            return digest

        params: dict[str, str] = {}
        if mount_from:
            params = {"mount": digest, "from": mount_from}
        response = self._send(
            repo,
            "POST",
            f"/v2/{repo.name}/blobs/uploads/",
            scopes=tuple(scopes),
            credentials=credentials,
            params=params,
            headers={"Content-Length": "0"},
        )
        with closing(response):
            if mount_from and response.status_code == 201:
                log.info("registry.blob_mounted", endpoint=str(repo), digest=digest, source=mount_from)
                return digest
            self._check_status(response, repo, f"upload of blob {digest}", ok=(202,))
            location = response.headers.get("location")
            if not location:
                raise Unavailable(f"registry {repo.registry} started an upload without a Location")
            upload_url = urllib.parse.urljoin(str(response.request.url), location)

        put_url = str(httpx.URL(upload_url).copy_merge_params({"digest": digest}))

        def body() -> Iterator[bytes]:
            if data is not None:
                yield data
                return
            assert path is not None
            with path.open("rb") as handle:
                while chunk := handle.read(CHUNK_SIZE):
                    yield chunk

        response = self._send(
            repo,
            "PUT",
            put_url,
            scopes=tuple(scopes),
            credentials=credentials,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            body=body,
        )
        with closing(response):
            self._check_status(response, repo, f"upload of blob {digest}", ok=(201, 204))
        log.info("registry.blob_pushed", endpoint=str(repo), digest=digest, size=size)
        return digest

    def push_manifest(
        self,
        repo: RemoteRepository,
        reference: str,
        data: bytes,
        media_type: str,
        *,
        credentials: CredentialLookup | None = None,
    ) -> str:
        """PUT a manifest or index under a tag or its digest; returns its digest."""
        _check_reference(reference)
        digest = sha256_digest(data)
        if is_digest(reference) and reference != digest:
            raise InvalidArgument("reference", f"manifest bytes hash to {digest}, not to the reference {reference}")
        response = self._send(
            repo,
            "PUT",
            f"/v2/{repo.name}/manifests/{reference}",
            scopes=(push_scope(repo.name),),
            credentials=credentials,
            headers={"Content-Type": media_type},
            body=lambda: iter([data]),
        )
        with closing(response):
            self._check_status(response, repo, f"manifest {reference}", ok=(200, 201, 204))
            header = response.headers.get("docker-content-digest", "").strip()
        if is_digest(header) and header != digest:
            raise FailedPrecondition(
                f"registry {repo.registry} stored manifest {reference} as {header}, expected {digest}"
            )
        log.info("registry.manifest_pushed", endpoint=str(repo), reference=reference, digest=digest)
        return digest

    # -- HTTP plumbing

    def _send(
        self,
        repo: RemoteRepository,
        method: str,
        target: str,
        *,
        scopes: tuple[str, ...],
        credentials: CredentialLookup | None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        body: Callable[[], Iterator[bytes]] | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        """One logical request: scheme fallback, retries and the 401 dance.

        ``target`` is a path (the scheme and host come from ``repo``) or an
        absolute URL (upload locations). Returns any non-401, non-retryable
        response; the caller maps statuses and must close it.
        """
        creds = self._lookup(repo.registry, credentials)
        for auth_round in (0, 1):
            authorization = self._authorization(repo, scopes, creds, fresh=auth_round == 1)
            request_headers = {"User-Agent": self._user_agent, **(headers or {})}
            if authorization:
                request_headers["Authorization"] = authorization

            def attempt(request_headers: Mapping[str, str] = request_headers) -> httpx.Response:
                return self._send_once(repo, method, target, request_headers, params, body, stream)

            response = self._with_retries(attempt, repo.registry, f"{method} {target}")
            if response.status_code != 401:
                return response
            challenge = _pick_challenge(response.headers.get_list("www-authenticate"))
            response.close()
            if auth_round == 1 or challenge is None:
                break
            with self._lock:
                self._challenges[repo.host] = challenge
            log.debug("registry.challenge", endpoint=repo.host, scheme=challenge.scheme)
        if creds is None or creds.is_empty():
            raise Unauthenticated(
                f"registry {repo.registry} requires authentication for {repo.name} and no "
                "credentials were given (or the repository does not exist)"
            )
        raise Unauthenticated(f"registry {repo.registry} rejected the credentials for {repo.name}")

    def _send_once(
        self,
        repo: RemoteRepository,
        method: str,
        target: str,
        headers: Mapping[str, str],
        params: Mapping[str, str] | None,
        body: Callable[[], Iterator[bytes]] | None,
        stream: bool,
    ) -> httpx.Response:
        client = self._client(repo.registry)
        absolute = "://" in target
        schemes = [""] if absolute else self._schemes_for(repo)
        for position, scheme in enumerate(schemes):
            url = target if absolute else f"{scheme}://{repo.host}{target}"
            request = client.build_request(
                method,
                url,
                headers=headers,
                params=params,
                content=body() if body is not None else None,
            )
            try:
                response = client.send(request, stream=stream)
            except httpx.ConnectError as exc:
                if _is_certificate_error(exc):
                    # Falling back to HTTP would hide the real problem; retrying cannot fix it.
                    raise Unavailable(
                        f"registry {repo.registry}: the TLS certificate of {repo.host} is not "
                        f"trusted ({exc}); configure its CA file or mark the registry insecure"
                    ) from None
                if position == len(schemes) - 1:
                    if _is_plain_http_answer(exc):
                        # Deterministic: the endpoint speaks HTTP; retrying cannot help.
                        raise Unavailable(
                            f"registry {repo.registry}: {repo.host} does not speak TLS ({exc}); "
                            "if it serves plain HTTP, mark the registry insecure"
                        ) from None
                    raise
                # TLS handshake against a plain-HTTP loopback/insecure registry.
                log.debug("registry.scheme_fallback", endpoint=repo.host, error=str(exc))
                continue
            if not absolute:
                with self._lock:
                    self._schemes[repo.host] = scheme
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    def _with_retries(self, send: Callable[[], httpx.Response], registry: str, what: str) -> httpx.Response:
        for attempt in range(1, self._max_attempts + 1):
            try:
                response = send()
            except httpx.TransportError as exc:
                if attempt >= self._max_attempts:
                    raise Unavailable(f"registry {registry} is unreachable after {attempt} attempts: {exc}") from None
                self._backoff(attempt, registry, f"{what}: {exc.__class__.__name__}: {exc}")
                continue
            if response.status_code not in RETRYABLE_STATUS:
                return response
            status = response.status_code
            retry_after = _retry_after(response.headers.get("retry-after"))
            response.close()
            if attempt >= self._max_attempts:
                raise Unavailable(f"registry {registry} answered HTTP {status} to {what} {attempt} times; giving up")
            self._backoff(attempt, registry, f"{what}: HTTP {status}", retry_after)
        raise AssertionError("unreachable")  # pragma: no cover

    def _backoff(self, attempt: int, registry: str, reason: str, at_least: float | None = None) -> None:
        delay = min(self._backoff_max, self._backoff_initial * (2 ** (attempt - 1)))
        delay += random.uniform(0, delay / 4)  # jitter so agents do not retry in lockstep
        if at_least is not None:
            delay = min(self._backoff_max, max(delay, at_least))
        log.warning(
            "registry.retry",
            registry=registry,
            attempt=attempt,
            delay=round(delay, 3),
            reason=reason,
        )
        self._sleep(delay)

    def _check_status(self, response: httpx.Response, repo: RemoteRepository, what: str, ok: Sequence[int]) -> None:
        status = response.status_code
        if status in ok:
            return
        detail = _error_detail(response)
        if status == 403:
            raise Unauthenticated(f"registry {repo.registry} denied access to {what} in {repo.name}{detail}")
        if status == 404:
            raise NotFound(f"{what} not found in repository {repo.name} of registry {repo.registry}")
        if 400 <= status < 500:
            raise FailedPrecondition(f"registry {repo.registry} refused {what} in {repo.name}: HTTP {status}{detail}")
        raise Unavailable(f"registry {repo.registry} answered HTTP {status} to {what} in {repo.name}{detail}")

    # -- connections and TLS

    def _host_config(self, registry: str) -> RegistryHostConfig:
        return self._hosts.get(normalise_registry(registry), RegistryHostConfig())

    def _client(self, registry: str) -> httpx.Client:
        with self._lock:
            client = self._clients.get(registry)
            if client is None:
                config = self._host_config(registry)
                client = httpx.Client(
                    verify=_ssl_context(config),
                    timeout=self._timeout,
                    follow_redirects=True,  # blob GETs redirect to storage/CDNs
                    trust_env=True,
                )
                self._clients[registry] = client
            return client

    def _schemes_for(self, repo: RemoteRepository) -> list[str]:
        if repo.scheme:
            return [repo.scheme]
        with self._lock:
            known = self._schemes.get(repo.host)
        if known:
            return [known]
        if self._host_config(repo.registry).insecure or is_loopback_host(repo.host):
            # Like containerd for localhost: HTTPS first, plain HTTP when TLS fails.
            return ["https", "http"]
        return ["https"]

    # -- credentials and tokens

    def _lookup(self, registry: str, override: CredentialLookup | None) -> RegistryCredentials | None:
        lookup = override or self._credentials
        if lookup is None:
            return None
        return lookup(registry)

    def _authorization(
        self,
        repo: RemoteRepository,
        scopes: tuple[str, ...],
        creds: RegistryCredentials | None,
        *,
        fresh: bool,
    ) -> str | None:
        with self._lock:
            challenge = self._challenges.get(repo.host)
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            pair = creds.basic() if creds else None
            if pair is None:
                return None
            encoded = base64.b64encode(f"{pair[0]}:{pair[1]}".encode()).decode()
            return f"Basic {encoded}"
        if challenge.scheme == "bearer":
            if creds is not None and creds.registry_token:
                return f"Bearer {creds.registry_token}"
            return f"Bearer {self._token(repo, challenge, scopes, creds, fresh=fresh)}"
        raise Unauthenticated(
            f"registry {repo.registry} asks for authentication scheme "
            f"{challenge.scheme!r}, which is not supported (only Basic and Bearer)"
        )

    def _token(
        self,
        repo: RemoteRepository,
        challenge: AuthChallenge,
        scopes: tuple[str, ...],
        creds: RegistryCredentials | None,
        *,
        fresh: bool,
    ) -> str:
        realm = challenge.realm
        if not realm or urllib.parse.urlsplit(realm).scheme not in ("http", "https"):
            raise Unauthenticated(
                f"registry {repo.registry} sent a Bearer challenge without a usable realm ({realm!r})"
            )
        service = challenge.service or ""
        scope_key = " ".join(sorted(set(scopes)))
        key = (realm, service, scope_key, creds.fingerprint() if creds else "")
        now = self._clock()
        with self._lock:
            cached = self._tokens.get(key)
        if cached is not None and cached.expires_at > now and not fresh:
            return cached.value

        basic = creds.basic() if creds else None
        has_secret = bool(basic) or bool(creds and creds.identity_token)
        realm_host = urllib.parse.urlsplit(realm).netloc
        if (
            has_secret
            and realm.startswith("http://")
            and not is_loopback_host(realm_host)
            and not self._host_config(repo.registry).insecure
        ):
            raise Unauthenticated(
                f"registry {repo.registry}: refusing to send credentials to the plain-HTTP "
                f"token service {realm}; mark the registry insecure to allow it"
            )

        client = self._client(repo.registry)
        if creds is not None and creds.identity_token:
            # OAuth2 refresh-token grant, as docker does with identity tokens.
            form = {
                "grant_type": "refresh_token",
                "refresh_token": creds.identity_token,
                "service": service,
                "scope": scope_key,
                "client_id": "podvisor",
            }
            if basic:
                form["username"] = basic[0]

            def send() -> httpx.Response:
                return client.post(realm, data=form, headers={"User-Agent": self._user_agent})

        else:
            query: list[tuple[str, str | int | float | bool | None]] = []
            if service:
                query.append(("service", service))
            query.extend(("scope", scope) for scope in sorted(set(scopes)))
            if basic:
                query.append(("account", basic[0]))
            auth = httpx.BasicAuth(basic[0], basic[1]) if basic else None

            def send() -> httpx.Response:
                return client.get(realm, params=query, auth=auth, headers={"User-Agent": self._user_agent})

        response = self._with_retries(send, repo.registry, f"token request to {realm}")
        with closing(response):
            if response.status_code in (401, 403):
                if has_secret:
                    raise Unauthenticated(
                        f"registry {repo.registry} rejected the credentials "
                        f"(token service {realm} answered HTTP {response.status_code})"
                    )
                raise Unauthenticated(
                    f"registry {repo.registry} refused anonymous access to {repo.name} "
                    f"(token service {realm} answered HTTP {response.status_code})"
                )
            if response.status_code != 200:
                raise Unavailable(
                    f"registry {repo.registry}: token service {realm} answered HTTP {response.status_code}"
                )
            try:
                payload = response.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise Unavailable(f"registry {repo.registry}: token service {realm} did not return JSON") from None
        if not isinstance(payload, dict):
            raise Unavailable(f"registry {repo.registry}: token service {realm} returned no token")
        # Docker's token spec says "token"; OAuth2 servers say "access_token".
        token = payload.get("token") or payload.get("access_token")
        if not isinstance(token, str) or not token:
            raise Unavailable(f"registry {repo.registry}: token service {realm} returned no token")
        lifetime = payload.get("expires_in")
        if not isinstance(lifetime, (int, float)) or isinstance(lifetime, bool) or lifetime <= 0:
            lifetime = DEFAULT_TOKEN_LIFETIME
        expires_at = now + max(float(lifetime) - TOKEN_EXPIRY_MARGIN, 1.0)
        with self._lock:
            self._tokens[key] = _Token(token, expires_at)
        log.debug("registry.token", registry=repo.registry, realm=realm, scopes=scope_key)
        return token


# --- helpers ------------------------------------------------------------------


def is_loopback_host(host: str) -> bool:
    """True for ``localhost[:port]``, ``127.x.x.x[:port]`` and ``[::1][:port]``."""
    name = host
    if name.startswith("["):
        name = name[1:].split("]", 1)[0]
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _ssl_context(config: RegistryHostConfig) -> ssl.SSLContext | bool:
    if config.insecure:
        return False
    # The system store (honours SSL_CERT_FILE), not certifi's bundle.
    context = ssl.create_default_context()
    if config.ca_file:
        context.load_verify_locations(cafile=config.ca_file)
    return context


def _is_certificate_error(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return True
        current = current.__cause__ or current.__context__
    return "CERTIFICATE_VERIFY_FAILED" in str(exc)


def _is_plain_http_answer(exc: BaseException) -> bool:
    # OpenSSL's wording when the peer answered a ClientHello with plain HTTP.
    text = str(exc)
    return "WRONG_VERSION_NUMBER" in text or "record layer failure" in text


def _pick_challenge(headers: Sequence[str]) -> AuthChallenge | None:
    challenges: list[AuthChallenge] = []
    for header in headers:
        challenges.extend(parse_www_authenticate(header))
    for scheme in ("bearer", "basic"):
        for challenge in challenges:
            if challenge.scheme == scheme:
                return challenge
    return challenges[0] if challenges else None


def _check_reference(reference: str) -> None:
    if is_digest(reference):
        return
    if reference and len(reference) <= 128 and reference[0] not in ".-" and set(reference) <= _TAG_CHARS:
        return
    raise InvalidArgument("reference", f"{reference!r} is neither a tag nor a sha256 digest")


def _read_limited(response: httpx.Response, limit: int, what: str) -> bytes:
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise FailedPrecondition(f"{what} is {declared} bytes, more than the {limit} allowed")
    chunks: list[bytes] = []
    total = 0
    for chunk in response.iter_bytes():
        total += len(chunk)
        if total > limit:
            raise FailedPrecondition(f"{what} is more than the {limit} bytes allowed")
        chunks.append(chunk)
    return b"".join(chunks)


def _retry_after(value: str | None) -> float | None:
    if value and value.strip().isdigit():
        return float(value.strip())
    return None


def _error_detail(response: httpx.Response) -> str:
    """The registry's error codes/messages (distribution's JSON error body), if any."""
    try:
        response.read()
        payload = response.json()
    except Exception:  # noqa: BLE001 - any unreadable body just means no detail
        return ""
    errors = payload.get("errors") if isinstance(payload, dict) else None
    if not isinstance(errors, list):
        return ""
    parts = []
    for error in errors[:3]:
        if isinstance(error, dict):
            code = error.get("code", "")
            message = error.get("message", "")
            parts.append(f"{code}: {message}".strip(": "))
    return f" ({'; '.join(parts)})" if parts else ""


def _hash_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_SIZE):
            hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


def _fsync_dir(directory: Path) -> None:
    # Make the rename durable; best effort on filesystems that refuse it.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = [
    "CredentialLookup",
    "FetchedManifest",
    "RegistryClient",
    "RegistryCredentials",
    "RegistryHostConfig",
    "ResolvedImage",
    "credentials_for",
    "is_loopback_host",
]
