"""OCI / Docker distribution formats (pure).

Media types, manifests and indexes as typed values (parsed with validation
and encoded back to bytes), platform selection from an index, digests, and
the parts of an image config the agent uses.

Errors: text a *client* typed (a digest in a request) raises
``InvalidArgument``; documents a *registry* served that cannot be used raise
``FailedPrecondition`` naming their source, since the image, not the request,
is at fault.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from agent.domain import jsontext
from agent.domain.errors import FailedPrecondition, InvalidArgument, NotFound

# --- media types ---------------------------------------------------------------

DOCKER_MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST_V1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_MANIFEST_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_ZSTD = "application/vnd.docker.image.rootfs.diff.tar.zstd"
DOCKER_FOREIGN_LAYER_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_NONDISTRIBUTABLE_LAYER = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_NONDISTRIBUTABLE_LAYER_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_NONDISTRIBUTABLE_LAYER_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"

IMAGE_MANIFEST_TYPES = frozenset({DOCKER_MANIFEST_V2, OCI_MANIFEST})
INDEX_TYPES = frozenset({DOCKER_MANIFEST_LIST, OCI_INDEX})
MANIFEST_TYPES = IMAGE_MANIFEST_TYPES | INDEX_TYPES
CONFIG_TYPES = frozenset({DOCKER_CONFIG, OCI_CONFIG})
_SCHEMA1_TYPES = frozenset({DOCKER_MANIFEST_V1, DOCKER_MANIFEST_V1_SIGNED})

# What a client sends in Accept when asking for a manifest; order is preference.
MANIFEST_ACCEPT = ", ".join([OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST_V2])


class Compression(Enum):
    """How a layer blob is compressed."""

    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"


_LAYER_COMPRESSION: dict[str, Compression] = {
    DOCKER_LAYER: Compression.NONE,
    DOCKER_LAYER_GZIP: Compression.GZIP,
    DOCKER_LAYER_ZSTD: Compression.ZSTD,
    DOCKER_FOREIGN_LAYER_GZIP: Compression.GZIP,
    OCI_LAYER: Compression.NONE,
    OCI_LAYER_GZIP: Compression.GZIP,
    OCI_LAYER_ZSTD: Compression.ZSTD,
    OCI_NONDISTRIBUTABLE_LAYER: Compression.NONE,
    OCI_NONDISTRIBUTABLE_LAYER_GZIP: Compression.GZIP,
    OCI_NONDISTRIBUTABLE_LAYER_ZSTD: Compression.ZSTD,
}
LAYER_TYPES = frozenset(_LAYER_COMPRESSION)


def layer_compression(media_type: str) -> Compression:
    """The compression of a layer of ``media_type``.

    Raises ``FailedPrecondition`` for media types that are not filesystem
    layers (artifacts, encrypted layers, ...).
    """
    try:
        return _LAYER_COMPRESSION[media_type]
    except KeyError:
        raise FailedPrecondition(
            f"layer media type {media_type!r} is not a supported filesystem layer (tar, tar+gzip or tar+zstd)"
        ) from None


def is_foreign_layer(media_type: str) -> bool:
    """True for layers registries may refuse to serve (fetched from ``urls`` instead)."""
    return media_type in (
        DOCKER_FOREIGN_LAYER_GZIP,
        OCI_NONDISTRIBUTABLE_LAYER,
        OCI_NONDISTRIBUTABLE_LAYER_GZIP,
        OCI_NONDISTRIBUTABLE_LAYER_ZSTD,
    )


def strip_media_type_parameters(content_type: str | None) -> str:
    """``application/json; charset=utf-8`` → ``application/json`` (lower-cased)."""
    if not content_type:
        return ""
    return content_type.split(";", 1)[0].strip().lower()


# --- digests -------------------------------------------------------------------

SHA256_PREFIX = "sha256:"
_SHA256_RE = re.compile(r"sha256:[0-9a-f]{64}")
_ANY_DIGEST_RE = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")


def is_digest(text: str) -> bool:
    """True when ``text`` is ``sha256:`` followed by 64 lowercase hex digits."""
    return isinstance(text, str) and _SHA256_RE.fullmatch(text) is not None


def parse_digest(text: str, field: str = "digest") -> str:
    """Validate a digest typed by a client; raise ``InvalidArgument(field, ...)``."""
    if is_digest(text):
        return text
    looks_like_digest = isinstance(text, str) and _ANY_DIGEST_RE.fullmatch(text) is not None
    if looks_like_digest and not text.startswith(SHA256_PREFIX):
        algorithm = text.split(":", 1)[0]
        raise InvalidArgument(field, f"digest algorithm {algorithm!r} is not supported (only sha256)")
    raise InvalidArgument(field, f"{text!r} is not a digest (expected sha256: followed by 64 lowercase hex digits)")


def sha256_digest(data: bytes) -> str:
    """The ``sha256:<hex>`` digest of ``data``."""
    return SHA256_PREFIX + hashlib.sha256(data).hexdigest()


def digest_hex(digest: str) -> str:
    """The hex part of a valid sha256 digest (for content-addressed file names)."""
    if not is_digest(digest):
        raise InvalidArgument("digest", f"{digest!r} is not a sha256 digest")
    return digest[len(SHA256_PREFIX) :]


# --- documents -----------------------------------------------------------------


@dataclass(frozen=True)
class Platform:
    """The platform an index entry is built for (``architecture`` normalised)."""

    os: str
    architecture: str
    variant: str | None = None
    os_version: str | None = None
    os_features: tuple[str, ...] = ()

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: what a manifest says about a blob or a manifest."""

    media_type: str
    digest: str
    size: int
    urls: tuple[str, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Platform | None = None
    artifact_type: str | None = None


@dataclass(frozen=True)
class ImageManifest:
    """A single-platform image: one config blob and ordered layers."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)
    subject: Descriptor | None = None
    artifact_type: str | None = None


@dataclass(frozen=True)
class ImageIndex:
    """An OCI index or Docker manifest list: per-platform manifests."""

    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)
    subject: Descriptor | None = None
    artifact_type: str | None = None


_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm"}


def normalise_architecture(architecture: str) -> str:
    """Map kernel/Debian names to GOARCH names (``x86_64`` → ``amd64``)."""
    lowered = architecture.lower()
    return _ARCH_ALIASES.get(lowered, lowered)


def parse_manifest_document(
    data: bytes, media_type: str | None = None, *, source: str = "manifest"
) -> ImageManifest | ImageIndex:
    """Parse a manifest or index served with Content-Type ``media_type``.

    The media type comes from the document's ``mediaType`` when it has one
    (it must then agree with a specific Content-Type), else from the header,
    else from the shape (``manifests`` → OCI index, ``config`` → OCI manifest).
    ``source`` names the image in error messages.
    """
    header_type = strip_media_type_parameters(media_type)
    try:
        document = jsontext.loads(data)
    except ValueError as exc:
        raise FailedPrecondition(f"{source}: the manifest is not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise FailedPrecondition(f"{source}: the manifest is not a JSON object")

    body_type = document.get("mediaType")
    if body_type is not None and not isinstance(body_type, str):
        raise FailedPrecondition(f"{source}: manifest field mediaType must be a string")
    kind = _manifest_kind(document, body_type, header_type, source)
    if kind in _SCHEMA1_TYPES:
        raise FailedPrecondition(
            f"{source}: Docker image manifest schema 1 is not supported; push the image again with a current tool"
        )
    if document.get("schemaVersion") != 2:
        raise FailedPrecondition(f"{source}: manifest schemaVersion is {document.get('schemaVersion')!r}, expected 2")
    if kind in INDEX_TYPES:
        return _parse_index(document, kind, source)
    if kind in IMAGE_MANIFEST_TYPES:
        return _parse_image_manifest(document, kind, source)
    raise FailedPrecondition(f"{source}: unsupported manifest media type {kind!r}")


def _manifest_kind(document: Mapping[str, Any], body_type: str | None, header_type: str, source: str) -> str:
    header_specific = header_type in MANIFEST_TYPES or header_type in _SCHEMA1_TYPES
    if body_type:
        if header_specific and body_type != header_type:
            raise FailedPrecondition(
                f"{source}: the registry served media type {header_type!r} but the manifest says {body_type!r}"
            )
        return body_type
    if header_specific:
        return header_type
    if document.get("schemaVersion") == 1:
        return DOCKER_MANIFEST_V1
    # OCI allows omitting mediaType; the shape decides.
    if "manifests" in document:
        return OCI_INDEX
    if "config" in document or "layers" in document:
        return OCI_MANIFEST
    raise FailedPrecondition(f"{source}: cannot tell what kind of manifest this is (no mediaType)")


def _parse_image_manifest(document: Mapping[str, Any], kind: str, source: str) -> ImageManifest:
    if "manifests" in document:
        raise FailedPrecondition(f"{source}: an image manifest must not have 'manifests'")
    config = _parse_descriptor(document.get("config"), f"{source}: config", source)
    raw_layers = document.get("layers")
    if raw_layers is None:
        raw_layers = []
    if not isinstance(raw_layers, list):
        raise FailedPrecondition(f"{source}: manifest field layers must be a list")
    layers = tuple(
        _parse_descriptor(item, f"{source}: layers[{index}]", source) for index, item in enumerate(raw_layers)
    )
    return ImageManifest(
        media_type=kind,
        config=config,
        layers=layers,
        annotations=_parse_annotations(document.get("annotations"), source),
        subject=_optional_descriptor(document.get("subject"), f"{source}: subject", source),
        artifact_type=_optional_str(document.get("artifactType"), "artifactType", source),
    )


def _parse_index(document: Mapping[str, Any], kind: str, source: str) -> ImageIndex:
    if "layers" in document or "config" in document:
        raise FailedPrecondition(f"{source}: an index must not have 'config' or 'layers'")
    raw = document.get("manifests")
    if not isinstance(raw, list):
        raise FailedPrecondition(f"{source}: index field manifests must be a list")
    manifests = tuple(
        _parse_descriptor(item, f"{source}: manifests[{index}]", source, with_platform=True)
        for index, item in enumerate(raw)
    )
    return ImageIndex(
        media_type=kind,
        manifests=manifests,
        annotations=_parse_annotations(document.get("annotations"), source),
        subject=_optional_descriptor(document.get("subject"), f"{source}: subject", source),
        artifact_type=_optional_str(document.get("artifactType"), "artifactType", source),
    )


def _optional_descriptor(value: Any, where: str, source: str) -> Descriptor | None:
    return None if value is None else _parse_descriptor(value, where, source)


def _optional_str(value: Any, name: str, source: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise FailedPrecondition(f"{source}: manifest field {name} must be a string")
    return value


def _parse_descriptor(value: Any, where: str, source: str, *, with_platform: bool = False) -> Descriptor:
    if not isinstance(value, dict):
        raise FailedPrecondition(f"{where}: descriptor must be a JSON object")
    media_type = value.get("mediaType")
    if not isinstance(media_type, str) or not media_type:
        raise FailedPrecondition(f"{where}: descriptor mediaType is missing")
    digest = value.get("digest")
    if not isinstance(digest, str) or not is_digest(digest):
        raise FailedPrecondition(
            f"{where}: descriptor digest {digest!r} is not sha256: followed by 64 lowercase hex digits"
        )
    size = value.get("size")
    # bool is an int in Python; JSON true is not a size.
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise FailedPrecondition(f"{where}: descriptor size {size!r} is not a non-negative integer")
    urls = value.get("urls") or []
    if not isinstance(urls, list) or not all(isinstance(url, str) for url in urls):
        raise FailedPrecondition(f"{where}: descriptor urls must be a list of strings")
    platform = None
    if with_platform and value.get("platform") is not None:
        platform = _parse_platform(value["platform"], where)
    return Descriptor(
        media_type=media_type,
        digest=digest,
        size=size,
        urls=tuple(urls),
        annotations=_parse_annotations(value.get("annotations"), source),
        platform=platform,
        artifact_type=_optional_str(value.get("artifactType"), "artifactType", source),
    )


def _parse_platform(value: Any, where: str) -> Platform:
    if not isinstance(value, dict):
        raise FailedPrecondition(f"{where}: platform must be a JSON object")
    os_name = value.get("os")
    architecture = value.get("architecture")
    if not isinstance(os_name, str) or not isinstance(architecture, str):
        raise FailedPrecondition(f"{where}: platform needs string os and architecture")
    variant = value.get("variant") or None
    os_version = value.get("os.version") or None
    features = value.get("os.features") or []
    if not isinstance(variant, (str, type(None))) or not isinstance(os_version, (str, type(None))):
        raise FailedPrecondition(f"{where}: platform variant and os.version must be strings")
    if not isinstance(features, list) or not all(isinstance(item, str) for item in features):
        raise FailedPrecondition(f"{where}: platform os.features must be a list of strings")
    return Platform(
        os=os_name.lower(),
        architecture=normalise_architecture(architecture),
        variant=variant.lower() if variant else None,
        os_version=os_version,
        os_features=tuple(features),
    )


def _parse_annotations(value: Any, source: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise FailedPrecondition(f"{source}: annotations must map strings to strings")
    return dict(value)


# --- platform selection ----------------------------------------------------------


def select_platform(
    index: ImageIndex,
    os: str = "linux",
    architecture: str = "amd64",
    variant: str | None = None,
    *,
    source: str = "image",
) -> Descriptor:
    """Choose the manifest for ``os/architecture[/variant]`` from ``index``.

    Only manifest (or nested index) entries with a platform are considered;
    attestation entries (``unknown/unknown``) never match. Among entries of
    the right os/architecture the preference is: the requested variant, then
    no variant (or ``v1`` for amd64, which means the same), then any other
    variant, each in index order. None at all raises ``NotFound`` listing what
    the index has.
    """
    want_os = os.lower()
    want_arch = normalise_architecture(architecture)
    want_variant = variant.lower() if variant else None
    baseline = {None, "v1"} if want_arch == "amd64" else {None}

    exact: list[Descriptor] = []
    plain: list[Descriptor] = []
    other: list[Descriptor] = []
    for entry in index.manifests:
        platform = entry.platform
        if platform is None or entry.media_type not in MANIFEST_TYPES:
            continue
        if platform.os != want_os or platform.architecture != want_arch:
            continue
        if want_variant is not None and platform.variant == want_variant:
            exact.append(entry)
        elif platform.variant in baseline:
            plain.append(entry)
        else:
            other.append(entry)
    for group in (exact, plain, other):
        if group:
            return group[0]
    offered = sorted({str(e.platform) for e in index.manifests if e.platform is not None})
    wanted = f"{want_os}/{want_arch}" + (f"/{want_variant}" if want_variant else "")
    raise NotFound(
        f"{source}: no manifest for platform {wanted} in the index "
        f"(it has: {', '.join(offered) or 'no platform entries'})"
    )


# --- encoding ------------------------------------------------------------------


def descriptor_to_dict(descriptor: Descriptor) -> dict[str, Any]:
    """The JSON object for ``descriptor`` (OCI field names, empty fields omitted)."""
    out: dict[str, Any] = {
        "mediaType": descriptor.media_type,
        "digest": descriptor.digest,
        "size": descriptor.size,
    }
    if descriptor.urls:
        out["urls"] = list(descriptor.urls)
    if descriptor.annotations:
        out["annotations"] = dict(descriptor.annotations)
    if descriptor.artifact_type:
        out["artifactType"] = descriptor.artifact_type
    if descriptor.platform is not None:
        platform: dict[str, Any] = {
            "architecture": descriptor.platform.architecture,
            "os": descriptor.platform.os,
        }
        if descriptor.platform.variant:
            platform["variant"] = descriptor.platform.variant
        if descriptor.platform.os_version:
            platform["os.version"] = descriptor.platform.os_version
        if descriptor.platform.os_features:
            platform["os.features"] = list(descriptor.platform.os_features)
        out["platform"] = platform
    return out


def encode_manifest(manifest: ImageManifest) -> bytes:
    """Serialise an image manifest; the bytes are what gets pushed and digested."""
    document: dict[str, Any] = {"schemaVersion": 2, "mediaType": manifest.media_type}
    if manifest.artifact_type:
        document["artifactType"] = manifest.artifact_type
    document["config"] = descriptor_to_dict(manifest.config)
    document["layers"] = [descriptor_to_dict(layer) for layer in manifest.layers]
    if manifest.subject is not None:
        document["subject"] = descriptor_to_dict(manifest.subject)
    if manifest.annotations:
        document["annotations"] = dict(manifest.annotations)
    return _dump(document)


def encode_index(index: ImageIndex) -> bytes:
    """Serialise an index / manifest list."""
    document: dict[str, Any] = {"schemaVersion": 2, "mediaType": index.media_type}
    if index.artifact_type:
        document["artifactType"] = index.artifact_type
    document["manifests"] = [descriptor_to_dict(entry) for entry in index.manifests]
    if index.subject is not None:
        document["subject"] = descriptor_to_dict(index.subject)
    if index.annotations:
        document["annotations"] = dict(index.annotations)
    return _dump(document)


def _dump(document: Mapping[str, Any]) -> bytes:
    # Stable, compact bytes so the same value always has the same digest.
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


# --- image config ----------------------------------------------------------------------


@dataclass(frozen=True)
class ImageConfig:
    """What the agent reads from an image config blob."""

    # rootfs.diff_ids: the digests of the layers' uncompressed tars, bottom first.
    diff_ids: tuple[str, ...]
    # config.User ("" when absent or unreadable: the user is informational).
    user: str = ""


def parse_image_config(data: bytes, *, source: str = "image") -> ImageConfig:
    """Parse an image config; ``FailedPrecondition`` when it lists no diff_ids.

    ``source`` names the image in the error (``image <name>``).
    """
    document: Any
    try:
        document = jsontext.loads(data)
    except ValueError:
        document = None
    try:
        diff_ids = document["rootfs"]["diff_ids"]
    except (KeyError, TypeError):
        diff_ids = None
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        raise FailedPrecondition(f"{source}: its config has no rootfs.diff_ids list")
    return ImageConfig(diff_ids=tuple(diff_ids), user=_config_user(document))


def _config_user(document: Any) -> str:
    try:
        return str((document.get("config") or {}).get("User") or "")
    except AttributeError:
        return ""
