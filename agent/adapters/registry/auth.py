"""Registry authentication: ``WWW-Authenticate`` challenges, bearer tokens,
and the request round that answers a 401.

Every request goes out anonymously until a registry answers 401; its
challenge is remembered per endpoint. ``Basic`` sends the credentials;
``Bearer`` fetches a token from the realm (with basic auth when there are
credentials, or an OAuth2 refresh-token grant with an identity token), cached
per (realm, service, scope, credentials) until it expires. Refused
credentials are ``Unauthenticated`` naming the registry.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field

import httpx
import structlog

from agent.adapters.registry.credentials import CredentialLookup, RegistryCredentials, request_lookup
from agent.adapters.registry.transport import (
    ERROR_BODY_LIMIT,
    TOKEN_BODY_LIMIT,
    Transport,
    is_loopback_host,
    read_limited,
)
from agent.domain.errors import Unauthenticated, Unavailable
from agent.domain.imageref import RemoteRepository
from agent.domain.registry import RegistryAuth

log = structlog.get_logger(__name__)

DEFAULT_TOKEN_LIFETIME = 60.0
# Refresh tokens a little early so a request never leaves with one about to expire.
TOKEN_EXPIRY_MARGIN = 5.0


# --- challenges and scopes ---------------------------------------------------------------


@dataclass(frozen=True)
class AuthChallenge:
    """One challenge from a ``WWW-Authenticate`` header.

    ``scheme`` is lower-case (``basic``, ``bearer``); parameter names are
    lower-case, values as sent (unquoted).
    """

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict)
    token68: str | None = None

    @property
    def realm(self) -> str | None:
        """The ``realm`` parameter (the token endpoint URL for Bearer)."""
        return self.params.get("realm")

    @property
    def service(self) -> str | None:
        """The ``service`` parameter sent back to a Bearer token endpoint."""
        return self.params.get("service")

    @property
    def scope(self) -> str | None:
        """The ``scope`` parameter the registry asked for, if any."""
        return self.params.get("scope")


_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAM_RE = re.compile(rf"({_TOKEN})[ \t]*=[ \t]*(?:\"((?:[^\"\\]|\\.)*)(\"?)|({_TOKEN}))")
_TOKEN68_RE = re.compile(r"([A-Za-z0-9._~+/-]+=*)[ \t]*(?=,|$)")
_SCHEME_RE = re.compile(_TOKEN)
_SPACE_RE = re.compile(r"[ \t]*")
_UNESCAPE_RE = re.compile(r"\\(.)")


def parse_www_authenticate(header: str) -> list[AuthChallenge]:
    """Parse a ``WWW-Authenticate`` value into challenges (RFC 7235 §4.1).

    Handles several challenges in one header, quoted strings containing commas
    and backslash escapes, and token68 credentials. Malformed trailing text is
    ignored rather than fatal: the caller decides whether a usable challenge
    was found.
    """
    challenges: list[AuthChallenge] = []
    pos = 0
    length = len(header)
    while pos < length:
        pos = _skip_separators(header, pos)
        scheme_match = _SCHEME_RE.match(header, pos)
        if scheme_match is None:
            break
        scheme = scheme_match.group(0).lower()
        pos = _SPACE_RE.match(header, scheme_match.end()).end()  # type: ignore[union-attr]
        params: dict[str, str] = {}
        token68: str | None = None
        if _PARAM_RE.match(header, pos) is None:
            t68 = _TOKEN68_RE.match(header, pos)
            if t68 is not None and t68.group(1):
                token68 = t68.group(1)
                pos = t68.end()
        while True:
            param = _PARAM_RE.match(header, pos)
            if param is None:
                break
            name = param.group(1).lower()
            if param.group(4) is not None:
                value = param.group(4)
            else:
                value = _UNESCAPE_RE.sub(r"\1", param.group(2))
            params.setdefault(name, value)
            pos = _SPACE_RE.match(header, param.end()).end()  # type: ignore[union-attr]
            if pos < length and header[pos] == ",":
                pos = _SPACE_RE.match(header, pos + 1).end()  # type: ignore[union-attr]
                # ", ," runs of empty list elements are allowed by RFC 7230 #rule.
                while pos < length and header[pos] == ",":
                    pos = _SPACE_RE.match(header, pos + 1).end()  # type: ignore[union-attr]
            else:
                break
        challenges.append(AuthChallenge(scheme=scheme, params=params, token68=token68))
        if pos < length and header[pos] not in ", \t" and _SCHEME_RE.match(header, pos) is None:
            break
    return challenges


def _skip_separators(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in ", \t":
        pos += 1
    return pos


def pull_scope(repository: str) -> str:
    """The token scope to pull from ``repository``: ``repository:<name>:pull``."""
    return f"repository:{repository}:pull"


def push_scope(repository: str) -> str:
    """The token scope to push to ``repository``: ``repository:<name>:pull,push``."""
    return f"repository:{repository}:pull,push"


def scopes_for(repository: str, actions: Sequence[str]) -> str:
    """A ``repository:<name>:<a>,<b>`` scope for arbitrary actions."""
    return f"repository:{repository}:{','.join(actions)}"


def pick_challenge(headers: Sequence[str]) -> AuthChallenge | None:
    """The challenge to answer among a 401's headers: Bearer, then Basic, then any."""
    challenges: list[AuthChallenge] = []
    for header in headers:
        challenges.extend(parse_www_authenticate(header))
    for scheme in ("bearer", "basic"):
        for challenge in challenges:
            if challenge.scheme == scheme:
                return challenge
    return challenges[0] if challenges else None


# --- the session -------------------------------------------------------------------------


@dataclass
class _Token:
    value: str = field(repr=False)  # a secret: never in a log line
    expires_at: float = 0.0


class Session:
    """Requests with the credentials and tokens a registry asks for (thread-safe).

    Credentials come from ``credentials`` (a lookup by registry name), or for
    one call from its own ``RegistryAuth``, which replaces that lookup.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        credentials: CredentialLookup | None,
        user_agent: str,
        clock: Callable[[], float],
    ) -> None:
        self.transport = transport
        self._credentials = credentials
        self._user_agent = user_agent
        self._clock = clock
        self._lock = threading.Lock()
        self._challenges: dict[str, AuthChallenge] = {}
        self._tokens: dict[tuple[str, str, str, str], _Token] = {}

    def send(
        self,
        repo: RemoteRepository,
        method: str,
        target: str,
        *,
        scopes: tuple[str, ...],
        auth: RegistryAuth | None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        body: Callable[[], Iterator[bytes]] | None = None,
        max_bytes: int = ERROR_BODY_LIMIT,
    ) -> httpx.Response:
        """One logical request: scheme fallback, retries and the 401 dance.

        ``target`` is a path (the scheme and host come from ``repo``) or an
        absolute URL (upload locations). Returns any non-401, non-retryable
        response, streamed; the caller maps statuses, reads what it needs
        (bounded) and must close it. ``max_bytes`` is the most the request
        and its answer may carry (it sets each attempt's deadline).
        """
        creds = self._lookup(repo.registry, auth)
        for auth_round in (0, 1):
            authorization = self._authorization(repo, scopes, creds, fresh=auth_round == 1)
            request_headers = {"User-Agent": self._user_agent, **(headers or {})}
            if authorization:
                request_headers["Authorization"] = authorization

            def attempt(request_headers: Mapping[str, str] = request_headers) -> httpx.Response:
                return self.transport.send_once(repo, method, target, request_headers, params, body, max_bytes)

            response = self.transport.with_retries(attempt, repo.registry, f"{method} {target}")
            if response.status_code != 401:
                return response
            challenge = pick_challenge(response.headers.get_list("www-authenticate"))
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

    def _lookup(self, registry: str, auth: RegistryAuth | None) -> RegistryCredentials | None:
        lookup = request_lookup(auth) or self._credentials
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
            and not self.transport.host_config(repo.registry).insecure
        ):
            raise Unauthenticated(
                f"registry {repo.registry}: refusing to send credentials to the plain-HTTP "
                f"token service {realm}; mark the registry insecure to allow it"
            )

        client = self.transport.client(repo.registry)
        auth: httpx.BasicAuth | None = None
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

            def build() -> httpx.Request:
                return client.build_request("POST", realm, data=form, headers={"User-Agent": self._user_agent})

        else:
            query: list[tuple[str, str | int | float | bool | None]] = []
            if service:
                query.append(("service", service))
            query.extend(("scope", scope) for scope in sorted(set(scopes)))
            if basic:
                query.append(("account", basic[0]))
            auth = httpx.BasicAuth(basic[0], basic[1]) if basic else None

            def build() -> httpx.Request:
                return client.build_request("GET", realm, params=query, headers={"User-Agent": self._user_agent})

        def send() -> httpx.Response:
            self.transport.start_attempt(TOKEN_BODY_LIMIT)
            return client.send(build(), auth=auth, stream=True)

        def fetch() -> bytes:
            response = self.transport.with_retries(send, repo.registry, f"token request to {realm}")
            with closing(response):
                self._check_token_status(repo, realm, response.status_code, has_secret)
                return read_limited(response, TOKEN_BODY_LIMIT, f"the token from {realm}")

        data = self.transport.retry_body(repo.registry, f"the token response of {realm}", fetch)
        try:
            payload = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
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

    @staticmethod
    def _check_token_status(repo: RemoteRepository, realm: str, status: int, has_secret: bool) -> None:
        if status in (401, 403):
            if has_secret:
                raise Unauthenticated(
                    f"registry {repo.registry} rejected the credentials (token service {realm} answered HTTP {status})"
                )
            raise Unauthenticated(
                f"registry {repo.registry} refused anonymous access to {repo.name} "
                f"(token service {realm} answered HTTP {status})"
            )
        if status != 200:
            raise Unavailable(f"registry {repo.registry}: token service {realm} answered HTTP {status}")
