"""What the image service and a registry trade (pure): per-request registry
auth, fetched manifests and images resolved to one platform manifest.

The API turns CRI's ``AuthConfig`` into a :class:`RegistryAuth`; the image
service scopes it to the image's registry; the registry adapter turns it into
the credentials it sends.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from agent.domain.imageref import ImageRef, RemoteRepository
from agent.domain.oci import ImageIndex, ImageManifest


@dataclass(frozen=True)
class RegistryAuth:
    """Credentials given with one pull, shaped like CRI's ``AuthConfig``.

    ``auth`` is base64 ``user:password`` (used when username/password are
    empty); ``identity_token`` is an OAuth2 refresh token exchanged at the
    token endpoint; ``registry_token`` is a bearer token sent as is.
    ``server_address`` names the registry the credentials belong to (CRI
    allows it empty: then they belong to the image's registry). Secrets are
    kept out of ``repr`` so they never reach a log line.
    """

    username: str = ""
    password: str = field(default="", repr=False)
    auth: str = field(default="", repr=False)
    server_address: str = ""
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)

    def scoped_to(self, registry: str) -> RegistryAuth:
        """These credentials, belonging to ``registry`` unless they name a server.

        Credentials meant for the image's registry must never reach a mirror,
        so they always leave the service bound to one registry.
        """
        if self.server_address:
            return self
        return dataclasses.replace(self, server_address=registry)


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
