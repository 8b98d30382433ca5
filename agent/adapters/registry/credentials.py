"""Registry credentials: what is sent to one registry, and lookups by registry name.

Credentials come from two places: the agent's configuration (per registry)
and a pull's own :class:`~agent.domain.registry.RegistryAuth` (CRI's
``AuthConfig``), which replaces the configured lookup for that pull and is
only ever sent to the registry it belongs to.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from agent.domain.imageref import normalise_registry
from agent.domain.registry import RegistryAuth


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
    def from_auth(cls, auth: RegistryAuth) -> RegistryCredentials:
        """The credentials a pull's ``RegistryAuth`` carries (all but its server)."""
        return cls(**{f.name: getattr(auth, f.name) for f in dataclasses.fields(cls)})

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


def configured_lookup(hosts: Mapping[str, RegistryCredentials]) -> CredentialLookup:
    """A lookup over the configured credentials, keyed by registry name."""
    lookups = [credentials_for(name, creds) for name, creds in hosts.items()]

    def lookup(name: str) -> RegistryCredentials | None:
        for registry_lookup in lookups:
            found = registry_lookup(name)
            if found is not None:
                return found
        return None

    return lookup


def request_lookup(auth: RegistryAuth | None) -> CredentialLookup | None:
    """The lookup a pull's own auth stands for; None leaves the configured one.

    ``auth`` must name its registry (``RegistryAuth.scoped_to``); empty
    credentials (CRI sends an empty ``AuthConfig``) count as none.
    """
    if auth is None:
        return None
    creds = RegistryCredentials.from_auth(auth)
    if creds.is_empty():
        return None
    return credentials_for(auth.server_address, creds)
