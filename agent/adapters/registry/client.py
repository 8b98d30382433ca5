"""The registry client: the only code that speaks the distribution HTTP API.

One :class:`RegistryClient` pulls (``RegistryPull``: manifests, configs,
blobs streamed to disk with SHA-256 verification) and pushes
(``RegistryPush``: blobs with cross-repository mount, manifests) over one
:class:`~agent.adapters.registry.auth.Session` (credentials, challenges and
tokens) and its :class:`~agent.adapters.registry.transport.Transport`
(connections, TLS, retries), after containerd's remotes/docker resolver.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType

import httpx

from agent.adapters.registry.auth import Session
from agent.adapters.registry.credentials import CredentialLookup
from agent.adapters.registry.pull import RegistryPull
from agent.adapters.registry.push import RegistryPush
from agent.adapters.registry.transport import (
    DEFAULT_MIN_RATE,
    DEFAULT_TIMEOUT,
    USER_AGENT,
    RegistryHostConfig,
    RetryPolicy,
    Transport,
)
from agent.domain.imageref import Mirror, RewriteRule


class RegistryClient(RegistryPull, RegistryPush):
    """A thread-safe client for OCI distribution registries.

    One instance is shared by the whole agent so connections, learnt auth
    challenges and tokens are reused. Every method that talks to a registry
    accepts ``auth`` (a pull's own ``RegistryAuth``, CRI's ``AuthConfig``)
    to replace the constructor's credentials lookup for that call.

    ``timeout`` bounds each socket operation; ``min_rate`` (bytes per second)
    the whole of each request attempt: ``timeout`` + its bytes / ``min_rate``.
    """

    def __init__(
        self,
        *,
        credentials: CredentialLookup | None = None,
        hosts: Mapping[str, RegistryHostConfig] | None = None,
        rewrites: Sequence[RewriteRule] = (),
        mirrors: Sequence[Mirror] = (),
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        min_rate: float = DEFAULT_MIN_RATE,
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
        transport = Transport(
            hosts=hosts or {},
            timeout=timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout),
            retry=RetryPolicy(max_attempts, backoff_initial, backoff_max),
            sleep=sleep,
            min_rate=min_rate,
        )
        self._session = Session(transport, credentials=credentials, user_agent=user_agent, clock=clock)
        self._rewrites = tuple(rewrites)
        self._mirrors = tuple(mirrors)
        self._platform = platform

    def close(self) -> None:
        """Close every pooled connection."""
        self._session.transport.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
