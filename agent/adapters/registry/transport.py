"""HTTP transport to registries: pooled httpx clients, TLS, scheme fallback,
retries with backoff, status checks and bounded reads.

* TLS: system CAs; a per-registry CA file; ``insecure`` registries skip
  verification and may be spoken to over plain HTTP. Loopback registries
  (``localhost:*``, ``127.0.0.1:*``) try HTTPS first and fall back to HTTP.
* Failures: connection errors, 5xx and 429 are retried with bounded
  exponential backoff; a registry still failing is ``Unavailable``.
* Bounds: every request attempt has a total deadline (``deadline``): the
  read timeout plus the bytes it may carry at ``min_rate``. Every body read
  that is not a digest-verified blob is capped (``read_limited``; error
  bodies at ``ERROR_BODY_LIMIT``). Redirects (GET/HEAD only) are followed by
  hand, at most ``MAX_REDIRECTS``, never into plain HTTP on another host of a
  registry that is not insecure, nor into this node (loopback, link-local)
  from a registry elsewhere.
"""

from __future__ import annotations

import ipaddress
import json
import random
import ssl
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import httpx
import structlog

from agent.adapters.registry import deadline
from agent.domain.errors import FailedPrecondition, InvalidArgument, NotFound, Unauthenticated, Unavailable
from agent.domain.imageref import RemoteRepository, normalise_registry
from agent.domain.oci import is_digest

log = structlog.get_logger(__name__)

CHUNK_SIZE = 1024 * 1024
DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=60.0, write=60.0, pool=30.0)
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
# What is read of an error body (for its detail) and of a token response.
ERROR_BODY_LIMIT = 64 * 1024
TOKEN_BODY_LIMIT = 1024 * 1024
MAX_REDIRECTS = 5
# The slowest transfer a request's deadline allows for (bytes per second).
DEFAULT_MIN_RATE = 64 * 1024
USER_AGENT = "podvisor-agent/0.1"
_TAG_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


@dataclass(frozen=True)
class RegistryHostConfig:
    """TLS settings for one registry (keyed by its name, e.g. ``127.0.0.1:5000``)."""

    ca_file: str | None = None
    insecure: bool = False


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a failing request is tried again."""

    max_attempts: int = 4
    backoff_initial: float = 0.5
    backoff_max: float = 8.0


_T = TypeVar("_T")


class Transport:
    """Connections to registries, shared by every request of one client (thread-safe)."""

    def __init__(
        self,
        *,
        hosts: Mapping[str, RegistryHostConfig],
        timeout: httpx.Timeout,
        retry: RetryPolicy,
        sleep: Callable[[float], None],
        min_rate: float = DEFAULT_MIN_RATE,
    ) -> None:
        if min_rate <= 0:
            raise ValueError("min_rate must be greater than 0")
        self._hosts = {normalise_registry(k): v for k, v in hosts.items()}
        self._timeout = timeout
        self._min_rate = min_rate
        self.retry = retry
        self._sleep = sleep
        self._lock = threading.Lock()
        self._clients: dict[str, httpx.Client] = {}
        self._schemes: dict[str, str] = {}

    def close(self) -> None:
        """Close every pooled connection."""
        with self._lock:
            clients = list(self._clients.values())
            self._clients.clear()
        for client in clients:
            client.close()

    def host_config(self, registry: str) -> RegistryHostConfig:
        """The TLS settings of ``registry`` (defaults when not configured)."""
        return self._hosts.get(normalise_registry(registry), RegistryHostConfig())

    def client(self, registry: str) -> httpx.Client:
        """The pooled httpx client for ``registry`` (made on first use)."""
        with self._lock:
            client = self._clients.get(registry)
            if client is None:
                config = self.host_config(registry)
                client = httpx.Client(
                    verify=_ssl_context(config),
                    timeout=self._timeout,
                    follow_redirects=False,  # send_once follows them, checked
                    trust_env=True,
                )
                deadline.install(client)
                self._clients[registry] = client
            return client

    def _schemes_for(self, repo: RemoteRepository) -> list[str]:
        if repo.scheme:
            return [repo.scheme]
        with self._lock:
            known = self._schemes.get(repo.host)
        if known:
            return [known]
        if self.host_config(repo.registry).insecure or is_loopback_host(repo.host):
            # Like containerd for localhost: HTTPS first, plain HTTP when TLS fails.
            return ["https", "http"]
        return ["https"]

    def deadline(self, max_bytes: int) -> float:
        """Seconds one attempt may take to move ``max_bytes``: the read timeout plus
        that many bytes at the slowest rate allowed."""
        base = self._timeout.read if self._timeout.read is not None else 60.0
        return base + max_bytes / self._min_rate

    def start_attempt(self, max_bytes: int) -> None:
        """Start the total deadline of one request attempt in this thread."""
        deadline.set_deadline(self.deadline(max_bytes))

    def send_once(
        self,
        repo: RemoteRepository,
        method: str,
        target: str,
        headers: Mapping[str, str],
        params: Mapping[str, str] | None,
        body: Callable[[], Iterator[bytes]] | None,
        max_bytes: int = ERROR_BODY_LIMIT,
    ) -> httpx.Response:
        """One attempt at a request, trying HTTPS then HTTP where that is allowed.

        ``target`` is a path (the scheme and host come from ``repo``) or an
        absolute URL (upload locations). The scheme that worked is remembered
        per host. The response is always streamed (the caller reads what it
        needs, bounded, and closes it); ``max_bytes`` (the most the request
        and its answer carry) sets the attempt's deadline.
        """
        self.start_attempt(max_bytes)
        client = self.client(repo.registry)
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
                response = client.send(request, stream=True)
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
            return self._follow_redirects(client, repo, response)
        raise AssertionError("unreachable")  # pragma: no cover

    def _follow_redirects(
        self, client: httpx.Client, repo: RemoteRepository, response: httpx.Response
    ) -> httpx.Response:
        """Follow the redirects of a GET/HEAD (blobs go to storage/CDNs), checking each hop.

        Redirect bodies are never read. Credentials stay with the registry's
        own origin (httpx drops ``Authorization`` when the origin changes).
        """
        hops = 0
        while response.has_redirect_location and response.request.method in ("GET", "HEAD"):
            request = response.request
            location = response.headers["location"]
            response.close()
            hops += 1
            if hops > MAX_REDIRECTS:
                raise FailedPrecondition(f"registry {repo.registry} redirected {request.url.path} more than "
                                         f"{MAX_REDIRECTS} times")
            try:
                target = request.url.join(location)
            except httpx.InvalidURL:
                raise FailedPrecondition(
                    f"registry {repo.registry} redirected to an invalid URL {location!r}"
                ) from None
            self.check_redirect(repo, request.url, target)
            headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
            if (target.scheme, target.host, target.port) != (request.url.scheme, request.url.host, request.url.port):
                headers = {k: v for k, v in headers.items() if k.lower() not in ("authorization", "cookie")}
            response = client.send(client.build_request(request.method, target, headers=headers), stream=True)
        return response

    def check_redirect(self, repo: RemoteRepository, source: httpx.URL, target: httpx.URL) -> None:
        """Refuse a redirect the registry must not make (``FailedPrecondition``)."""
        where = f"registry {repo.registry} redirected {source.path} to {target}"
        if target.scheme not in ("http", "https") or not target.host:
            raise FailedPrecondition(f"{where}: only http(s) URLs are followed")
        host = target.netloc.decode("ascii", "replace")
        insecure = self.host_config(repo.registry).insecure
        if target.scheme == "http" and not insecure and not is_loopback_host(host):
            raise FailedPrecondition(f"{where}: refusing plain HTTP to another host; mark the registry insecure")
        if _is_node_local(target.host) and not _is_node_local(source.host):
            raise FailedPrecondition(f"{where}: refusing a redirect from a remote registry into this node")

    def with_retries(self, send: Callable[[], httpx.Response], registry: str, what: str) -> httpx.Response:
        """``send()`` until it gets a non-retryable answer, within the retry budget."""
        max_attempts = self.retry.max_attempts
        for attempt in range(1, max_attempts + 1):
            try:
                response = send()
            except httpx.TransportError as exc:
                if attempt >= max_attempts:
                    raise Unavailable(f"registry {registry} is unreachable after {attempt} attempts: {exc}") from None
                self.backoff(attempt, registry, f"{what}: {exc.__class__.__name__}: {exc}")
                continue
            if response.status_code not in RETRYABLE_STATUS:
                return response
            status = response.status_code
            retry_after = _retry_after(response.headers.get("retry-after"))
            response.close()
            if attempt >= max_attempts:
                raise Unavailable(f"registry {registry} answered HTTP {status} to {what} {attempt} times; giving up")
            self.backoff(attempt, registry, f"{what}: HTTP {status}", retry_after)
        raise AssertionError("unreachable")  # pragma: no cover

    def retry_body(self, registry: str, what: str, attempt: Callable[[], _T]) -> _T:
        """``attempt()`` (a request and the reading of its body) until it is not broken off.

        A connection dropped or timed out while a body is read is tried again
        within the retry budget, then ``Unavailable``; a body that cannot be
        decoded is ``FailedPrecondition``.
        """
        max_attempts = self.retry.max_attempts
        for number in range(1, max_attempts + 1):
            try:
                return attempt()
            except httpx.DecodingError as exc:
                raise FailedPrecondition(f"registry {registry} sent {what} in an encoding that fails: {exc}") from None
            except (httpx.TransportError, httpx.StreamError) as exc:
                if number >= max_attempts:
                    raise Unavailable(
                        f"registry {registry} broke off {what} after {number} attempts: "
                        f"{exc.__class__.__name__}: {exc}"
                    ) from None
                self.backoff(number, registry, f"{what} interrupted: {exc.__class__.__name__}: {exc}")
        raise AssertionError("unreachable")  # pragma: no cover

    def backoff(self, attempt: int, registry: str, reason: str, at_least: float | None = None) -> None:
        """Sleep before attempt ``attempt + 1``: exponential, jittered, bounded."""
        retry = self.retry
        delay = min(retry.backoff_max, retry.backoff_initial * (2 ** (attempt - 1)))
        delay += random.uniform(0, delay / 4)  # jitter so agents do not retry in lockstep
        if at_least is not None:
            delay = min(retry.backoff_max, max(delay, at_least))
        log.warning(
            "registry.retry",
            registry=registry,
            attempt=attempt,
            delay=round(delay, 3),
            reason=reason,
        )
        self._sleep(delay)


def check_status(response: httpx.Response, repo: RemoteRepository, what: str, ok: Sequence[int]) -> None:
    """Map a status outside ``ok`` to the error that says what went wrong."""
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


def check_reference(reference: str) -> None:
    """Refuse a manifest reference that is neither a tag nor a sha256 digest."""
    if is_digest(reference):
        return
    if reference and len(reference) <= 128 and reference[0] not in ".-" and set(reference) <= _TAG_CHARS:
        return
    raise InvalidArgument("reference", f"{reference!r} is neither a tag nor a sha256 digest")


def read_limited(response: httpx.Response, limit: int, what: str) -> bytes:
    """The body of ``response``, refused when it is over ``limit`` bytes."""
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


def _is_node_local(host: str) -> bool:
    """``localhost``, loopback, link-local (cloud metadata) or unspecified addresses."""
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback or address.is_link_local or address.is_unspecified


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


def _retry_after(value: str | None) -> float | None:
    if value and value.strip().isdigit():
        return float(value.strip())
    return None


def _error_detail(response: httpx.Response) -> str:
    """The registry's error codes/messages (distribution's JSON error body), if any.

    At most ``ERROR_BODY_LIMIT`` bytes are read: a longer (or endless) body
    gives no detail, and the caller closes the response without reading on.
    """
    try:
        payload = json.loads(read_limited(response, ERROR_BODY_LIMIT, "error body"))
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
