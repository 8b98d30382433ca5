"""Image references and registry rewrite/mirror rules (pure).

References are parsed and normalised the way containerd and docker do it
(``github.com/distribution/reference``): ``cirros`` is
``docker.io/library/cirros:latest``; the first path component is a registry
host only when it contains ``.`` or ``:``, is ``localhost`` or has upper-case
letters. A reference carries a tag, a digest or both; when it names neither it
means ``:latest``.

Where an image is actually pulled from is decided by :func:`pull_candidates`
from the operator's rewrite rules (``docker.io/kubevirt/`` →
``127.0.0.1:5000/kubevirt/``) and per-registry mirrors, in the spirit of
containers-registries.conf(5) and containerd's ``hosts.toml``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from agent.domain.errors import InvalidArgument

DEFAULT_REGISTRY = "docker.io"
# Docker Hub's distribution API is not served on docker.io itself.
DOCKER_HUB_ENDPOINT = "registry-1.docker.io"
DEFAULT_TAG = "latest"
OFFICIAL_NAMESPACE = "library"

_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

# Grammar from distribution/reference (reference.go), written out by hand.
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_PATH_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_HOST_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST_RE = re.compile(rf"(?:{_HOST_LABEL}(?:\.{_HOST_LABEL})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{{1,5}})?")
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_DIGEST_SHAPE_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9A-Za-z=_-]+")
_MAX_NAME_LENGTH = 255

DEFAULT_FIELD = "image.image"


@dataclass(frozen=True)
class ImageRef:
    """A normalised image reference.

    ``registry`` is the registry's name as users write it (``docker.io``,
    ``quay.io``, ``127.0.0.1:5000``); ``repository`` the path inside it
    (``library/cirros``). At least one of ``tag`` and ``digest`` is set.
    """

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """``registry/repository``, e.g. ``docker.io/library/cirros``."""
        return f"{self.registry}/{self.repository}"

    @property
    def reference(self) -> str:
        """What goes into ``/v2/<name>/manifests/<reference>``: the digest wins."""
        if self.digest is not None:
            return self.digest
        return self.tag or DEFAULT_TAG

    def with_digest(self, digest: str) -> ImageRef:
        """The same image pinned to ``digest`` (the tag is dropped)."""
        return ImageRef(self.registry, self.repository, None, digest)

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def parse_image_ref(text: str, field: str = DEFAULT_FIELD) -> ImageRef:
    """Parse and normalise an image reference.

    Raises ``InvalidArgument(field, ...)`` saying what is wrong with it.
    """
    if not isinstance(text, str) or not text:
        raise InvalidArgument(field, "the image reference is empty")
    if text != text.strip():
        raise InvalidArgument(field, f"image reference {text!r} has surrounding whitespace")
    if "://" in text:
        raise InvalidArgument(field, f"image reference {text!r} must not carry a URL scheme; write host/repository")

    remainder = text
    digest: str | None = None
    if "@" in remainder:
        remainder, _, digest_text = remainder.partition("@")
        digest = _parse_reference_digest(digest_text, text, field)

    tag: str | None = None
    # A ':' after the last '/' separates the tag; earlier ones belong to host:port.
    last_slash = remainder.rfind("/")
    colon = remainder.rfind(":")
    if colon > last_slash:
        remainder, tag = remainder[:colon], remainder[colon + 1 :]
        if not _TAG_RE.fullmatch(tag):
            raise InvalidArgument(
                field,
                f"image reference {text!r} has an invalid tag {tag!r} "
                "(letters, digits, '_', '.', '-'; at most 128; not starting with '.' or '-')",
            )

    registry, repository = _split_registry(remainder)
    if not _HOST_RE.fullmatch(registry):
        raise InvalidArgument(field, f"image reference {text!r} has an invalid registry {registry!r}")
    if repository != repository.lower() and _PATH_RE.fullmatch(repository.lower()):
        raise InvalidArgument(field, f"image reference {text!r}: repository name {repository!r} must be lowercase")
    if not _PATH_RE.fullmatch(repository):
        raise InvalidArgument(
            field,
            f"image reference {text!r} has an invalid repository {repository!r} "
            "(lowercase letters, digits and separators '.', '_', '__', '-' between '/' parts)",
        )

    registry = normalise_registry(registry)
    if registry == DEFAULT_REGISTRY and "/" not in repository:
        # Docker Hub's official images live under library/.
        repository = f"{OFFICIAL_NAMESPACE}/{repository}"
    if len(f"{registry}/{repository}") > _MAX_NAME_LENGTH:
        raise InvalidArgument(field, f"image reference {text!r} is longer than {_MAX_NAME_LENGTH} characters")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return ImageRef(registry=registry, repository=repository, tag=tag, digest=digest)


def normalise_registry(host: str) -> str:
    """Map Docker Hub's aliases to ``docker.io``; other hosts are kept as written.

    Keeping the case matters: ``MyHost/x`` names host ``MyHost`` only because
    of its capitals, so lower-casing it would change the meaning on re-parse.
    """
    if host.lower() in _DOCKER_HUB_ALIASES:
        return DEFAULT_REGISTRY
    return host


def registry_endpoint(registry: str) -> str:
    """The host[:port] serving the distribution API of ``registry``."""
    if normalise_registry(registry) == DEFAULT_REGISTRY:
        return DOCKER_HUB_ENDPOINT
    return registry


def _split_registry(remainder: str) -> tuple[str, str]:
    first, sep, rest = remainder.partition("/")
    if not sep:
        return DEFAULT_REGISTRY, remainder
    looks_like_host = "." in first or ":" in first or first == "localhost" or first != first.lower()
    if looks_like_host:
        return first, rest
    return DEFAULT_REGISTRY, remainder


def _parse_reference_digest(digest_text: str, text: str, field: str) -> str:
    if _DIGEST_RE.fullmatch(digest_text):
        return digest_text
    if _DIGEST_SHAPE_RE.fullmatch(digest_text) and not digest_text.startswith("sha256:"):
        algorithm = digest_text.split(":", 1)[0]
        raise InvalidArgument(
            field,
            f"image reference {text!r}: digest algorithm {algorithm!r} is not supported (only sha256)",
        )
    raise InvalidArgument(
        field,
        f"image reference {text!r} has an invalid digest {digest_text!r} "
        "(expected sha256: followed by 64 lowercase hex digits)",
    )


# --- where to pull from ------------------------------------------------------


@dataclass(frozen=True)
class RewriteRule:
    """Serve every image whose name starts with ``prefix`` from ``replacement``.

    ``RewriteRule("docker.io/kubevirt/", "127.0.0.1:5000/kubevirt/")`` makes
    ``docker.io/kubevirt/cirros-container-disk-demo`` come from the local
    registry. A prefix without a trailing ``/`` matches only whole path
    components (``docker.io/kubevirt`` matches ``docker.io/kubevirt/x`` but not
    ``docker.io/kubevirtx``). Invalid rules raise ``ValueError`` so the config
    loader can reject them at start-up.
    """

    prefix: str
    replacement: str

    def __post_init__(self) -> None:
        for label, value in (("prefix", self.prefix), ("replacement", self.replacement)):
            if not value or value != value.strip() or "://" in value or "@" in value:
                raise ValueError(f"registry rewrite {label} {value!r} must be host/path, without scheme or digest")
            host = value.split("/", 1)[0]
            if not _HOST_RE.fullmatch(host):
                raise ValueError(f"registry rewrite {label} {value!r} does not start with a host")

    def apply(self, name: str) -> str | None:
        """The rewritten ``registry/repository``, or None when the rule does not match."""
        prefix = self.prefix
        if prefix.endswith("/"):
            if not name.startswith(prefix):
                return None
        elif not (name == prefix or name.startswith(prefix + "/")):
            return None
        return self.replacement + name[len(prefix) :]


@dataclass(frozen=True)
class Mirror:
    """Endpoints tried, in order, before ``registry`` itself.

    Endpoints are ``host[:port]`` or ``http://host[:port]`` /
    ``https://host[:port]``; a scheme forces it, none lets the client's policy
    decide (HTTPS, with HTTP fallback for loopback and insecure registries).
    """

    registry: str
    endpoints: tuple[str, ...]

    def __post_init__(self) -> None:
        for endpoint in self.endpoints:
            parse_endpoint(endpoint)


@dataclass(frozen=True)
class RemoteRepository:
    """One repository on one registry endpoint: a place to pull from or push to.

    ``registry`` keys credentials and TLS settings (``docker.io``,
    ``127.0.0.1:5000``, a mirror's host); ``host`` is the API endpoint
    (``registry-1.docker.io``); ``name`` the repository path. ``scheme`` is set
    when configuration forces one.
    """

    registry: str
    host: str
    name: str
    scheme: str | None = None
    mirror: bool = False

    def __str__(self) -> str:
        return f"{self.host}/{self.name}"


def parse_endpoint(endpoint: str) -> tuple[str | None, str]:
    """Split a mirror endpoint into (scheme or None, host[:port]); ValueError if malformed."""
    scheme: str | None = None
    rest = endpoint
    if "://" in endpoint:
        scheme, rest = endpoint.split("://", 1)
        if scheme not in ("http", "https"):
            raise ValueError(f"mirror endpoint {endpoint!r}: scheme must be http or https")
    rest = rest.rstrip("/")
    if rest.endswith("/v2"):
        rest = rest[: -len("/v2")]
    if not rest or not _HOST_RE.fullmatch(rest):
        raise ValueError(f"mirror endpoint {endpoint!r} must be [scheme://]host[:port]")
    return scheme, rest.lower()


def upstream_repository(ref: ImageRef) -> RemoteRepository:
    """The repository ``ref`` names, on its own registry, with no rules applied."""
    return RemoteRepository(registry=ref.registry, host=registry_endpoint(ref.registry), name=ref.repository)


def rewrite(ref: ImageRef, rules: Iterable[RewriteRule], field: str = DEFAULT_FIELD) -> ImageRef:
    """Apply the rule with the longest matching prefix (most specific wins) to ``ref``.

    Tag and digest are kept. A rewrite that produces an invalid name raises
    ``InvalidArgument`` naming both the image and the rule.
    """
    best: RewriteRule | None = None
    for rule in rules:
        if rule.apply(ref.name) is None:
            continue
        if best is None or len(rule.prefix) > len(best.prefix):
            best = rule
    if best is None:
        return ref
    new_name = best.apply(ref.name)
    assert new_name is not None
    registry, sep, repository = new_name.partition("/")
    if not sep or not _PATH_RE.fullmatch(repository) or not _HOST_RE.fullmatch(registry):
        raise InvalidArgument(
            field,
            f"image {ref} rewritten by rule {best.prefix!r} -> {best.replacement!r} gives an invalid name {new_name!r}",
        )
    return ImageRef(normalise_registry(registry), repository, ref.tag, ref.digest)


def pull_candidates(
    ref: ImageRef,
    rewrites: Sequence[RewriteRule] = (),
    mirrors: Sequence[Mirror] = (),
) -> list[RemoteRepository]:
    """The ordered places to pull ``ref`` from.

    The reference is first rewritten (most specific prefix); then each mirror
    endpoint configured for the resulting registry is listed in order, and the
    registry itself comes last. Duplicates are dropped.
    """
    target = rewrite(ref, rewrites)
    candidates: list[RemoteRepository] = []
    for mirror in mirrors:
        if normalise_registry(mirror.registry) != target.registry:
            continue
        for endpoint in mirror.endpoints:
            scheme, host = parse_endpoint(endpoint)
            candidates.append(
                RemoteRepository(registry=host, host=host, name=target.repository, scheme=scheme, mirror=True)
            )
    candidates.append(upstream_repository(target))
    unique: list[RemoteRepository] = []
    for candidate in candidates:
        if candidate not in unique:
            unique.append(candidate)
    return unique
