"""Table tests for OCI/Docker media types, manifests, digests and image configs."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.domain import oci
from agent.domain.errors import FailedPrecondition, InvalidArgument, NotFound
from agent.domain.oci import (
    Compression,
    Descriptor,
    ImageIndex,
    ImageManifest,
    Platform,
)

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64
D4 = "sha256:" + "4" * 64
D5 = "sha256:" + "5" * 64


# --- media types -------------------------------------------------------------------


@pytest.mark.parametrize(
    "media_type,compression",
    [
        ("application/vnd.docker.image.rootfs.diff.tar.gzip", Compression.GZIP),
        ("application/vnd.docker.image.rootfs.diff.tar", Compression.NONE),
        ("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", Compression.GZIP),
        ("application/vnd.oci.image.layer.v1.tar", Compression.NONE),
        ("application/vnd.oci.image.layer.v1.tar+gzip", Compression.GZIP),
        ("application/vnd.oci.image.layer.v1.tar+zstd", Compression.ZSTD),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", Compression.GZIP),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar+zstd", Compression.ZSTD),
    ],
)
def test_layer_compression(media_type: str, compression: Compression) -> None:
    assert oci.layer_compression(media_type) is compression


@pytest.mark.parametrize(
    "media_type",
    [
        "application/vnd.oci.image.layer.v1.tar+encrypted",
        "application/vnd.oci.image.config.v1+json",
        "application/octet-stream",
        "",
    ],
)
def test_layer_compression_rejects(media_type: str) -> None:
    with pytest.raises(FailedPrecondition, match="not a supported filesystem layer"):
        oci.layer_compression(media_type)


def test_foreign_layers() -> None:
    assert oci.is_foreign_layer(oci.DOCKER_FOREIGN_LAYER_GZIP)
    assert oci.is_foreign_layer(oci.OCI_NONDISTRIBUTABLE_LAYER_ZSTD)
    assert not oci.is_foreign_layer(oci.OCI_LAYER_GZIP)


def test_accept_lists_every_manifest_type() -> None:
    accepted = {part.strip() for part in oci.MANIFEST_ACCEPT.split(",")}
    assert accepted == set(oci.MANIFEST_TYPES)
    assert len(accepted) == 4


@pytest.mark.parametrize(
    "header,expected",
    [
        (None, ""),
        ("", ""),
        ("application/json", "application/json"),
        ("Application/Vnd.OCI.Image.Manifest.v1+json; charset=utf-8", oci.OCI_MANIFEST),
    ],
)
def test_strip_media_type_parameters(header: str | None, expected: str) -> None:
    assert oci.strip_media_type_parameters(header) == expected


# --- digests -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,valid",
    [
        (D1, True),
        ("sha256:" + "a" * 64, True),
        ("sha256:" + "A" * 64, False),
        ("sha256:" + "a" * 63, False),
        ("sha256:" + "a" * 65, False),
        ("sha256:" + "g" * 64, False),
        ("sha512:" + "a" * 128, False),
        ("a" * 64, False),
        ("", False),
    ],
)
def test_is_digest(text: str, valid: bool) -> None:
    assert oci.is_digest(text) is valid


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("sha512:" + "a" * 128, "not supported"),
        ("sha256:abc", "not a digest"),
        ("nonsense", "not a digest"),
        ("", "not a digest"),
    ],
)
def test_parse_digest_rejects(text: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        oci.parse_digest(text, field="image.image")
    assert caught.value.field == "image.image"
    assert fragment in caught.value.message


def test_sha256_digest_and_hex() -> None:
    digest = oci.sha256_digest(b"")
    assert digest == "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert oci.parse_digest(digest) == digest
    assert oci.digest_hex(digest) == digest[7:]
    with pytest.raises(InvalidArgument):
        oci.digest_hex("md5:abc")


# --- manifests -----------------------------------------------------------------


def desc(media_type: str, digest: str, size: int = 10, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest, "size": size, **extra}


def manifest_doc(media_type: str | None = oci.OCI_MANIFEST, **extra: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "schemaVersion": 2,
        "config": desc(oci.OCI_CONFIG, D1, 100),
        "layers": [desc(oci.OCI_LAYER_GZIP, D2, 2000)],
    }
    if media_type is not None:
        document["mediaType"] = media_type
    document.update(extra)
    return document


def index_doc(media_type: str | None = oci.OCI_INDEX, **extra: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "schemaVersion": 2,
        "manifests": [
            desc(
                oci.OCI_MANIFEST,
                D3,
                500,
                platform={"os": "linux", "architecture": "arm64", "variant": "v8"},
            ),
            desc(oci.OCI_MANIFEST, D4, 501, platform={"os": "linux", "architecture": "amd64"}),
        ],
    }
    if media_type is not None:
        document["mediaType"] = media_type
    document.update(extra)
    return document


def encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document).encode()


@pytest.mark.parametrize(
    "document,header,kind,media_type",
    [
        (manifest_doc(), oci.OCI_MANIFEST, ImageManifest, oci.OCI_MANIFEST),
        (manifest_doc(), None, ImageManifest, oci.OCI_MANIFEST),
        (manifest_doc(None), None, ImageManifest, oci.OCI_MANIFEST),  # shape decides
        (manifest_doc(None), oci.OCI_MANIFEST, ImageManifest, oci.OCI_MANIFEST),
        (manifest_doc(None), "application/json", ImageManifest, oci.OCI_MANIFEST),
        (
            manifest_doc(oci.DOCKER_MANIFEST_V2, config=desc(oci.DOCKER_CONFIG, D1)),
            oci.DOCKER_MANIFEST_V2 + "; charset=utf-8",
            ImageManifest,
            oci.DOCKER_MANIFEST_V2,
        ),
        (manifest_doc(oci.DOCKER_MANIFEST_V2), "text/plain", ImageManifest, oci.DOCKER_MANIFEST_V2),
        (index_doc(), oci.OCI_INDEX, ImageIndex, oci.OCI_INDEX),
        (index_doc(None), None, ImageIndex, oci.OCI_INDEX),
        (index_doc(oci.DOCKER_MANIFEST_LIST), None, ImageIndex, oci.DOCKER_MANIFEST_LIST),
        (index_doc(None), oci.DOCKER_MANIFEST_LIST, ImageIndex, oci.DOCKER_MANIFEST_LIST),
        (manifest_doc(layers=[]), None, ImageManifest, oci.OCI_MANIFEST),  # artifacts may be empty
    ],
)
def test_parse_manifest_document_kinds(
    document: dict[str, Any], header: str | None, kind: type, media_type: str
) -> None:
    parsed = oci.parse_manifest_document(encode(document), header)
    assert isinstance(parsed, kind)
    assert parsed.media_type == media_type


def test_parse_image_manifest_fields() -> None:
    document = manifest_doc(
        annotations={"org.opencontainers.image.title": "cirros"},
        layers=[
            desc(oci.OCI_LAYER_GZIP, D2, 2000, annotations={"a": "b"}),
            desc(oci.OCI_LAYER_ZSTD, D3, 3000, urls=["https://example.com/x"]),
        ],
        subject=desc(oci.OCI_MANIFEST, D4, 7),
        artifactType="application/x-test",
    )
    parsed = oci.parse_manifest_document(encode(document), oci.OCI_MANIFEST)
    assert parsed == ImageManifest(
        media_type=oci.OCI_MANIFEST,
        config=Descriptor(oci.OCI_CONFIG, D1, 100),
        layers=(
            Descriptor(oci.OCI_LAYER_GZIP, D2, 2000, annotations={"a": "b"}),
            Descriptor(oci.OCI_LAYER_ZSTD, D3, 3000, urls=("https://example.com/x",)),
        ),
        annotations={"org.opencontainers.image.title": "cirros"},
        subject=Descriptor(oci.OCI_MANIFEST, D4, 7),
        artifact_type="application/x-test",
    )


def test_parse_index_platforms_are_normalised() -> None:
    document = index_doc(
        manifests=[
            desc(
                oci.DOCKER_MANIFEST_V2,
                D3,
                platform={
                    "os": "Linux",
                    "architecture": "x86_64",
                    "variant": "V2",
                    "os.version": "1",
                    "os.features": ["f"],
                },
            ),
            desc(oci.OCI_MANIFEST, D4),  # no platform: allowed
        ]
    )
    parsed = oci.parse_manifest_document(encode(document))
    assert isinstance(parsed, ImageIndex)
    assert parsed.manifests[0].platform == Platform("linux", "amd64", "v2", "1", ("f",))
    assert parsed.manifests[1].platform is None


@pytest.mark.parametrize(
    "data,header,fragment",
    [
        (b"{", None, "not valid JSON"),
        (b"\xff\xfe", None, "not valid JSON"),
        (b"[]", None, "not a JSON object"),
        (encode({"schemaVersion": 2}), None, "cannot tell"),
        (encode({"schemaVersion": 1, "fsLayers": []}), None, "schema 1"),
        (encode({"schemaVersion": 1}), oci.DOCKER_MANIFEST_V1_SIGNED, "schema 1"),
        (encode(manifest_doc(schemaVersion=3)), None, "schemaVersion"),
        (encode(manifest_doc(mediaType=5)), None, "mediaType must be a string"),
        (encode(manifest_doc()), oci.DOCKER_MANIFEST_V2, "served media type"),
        (encode(index_doc()), oci.OCI_MANIFEST, "served media type"),
        (encode(manifest_doc("application/x-unknown")), None, "unsupported manifest media type"),
        (encode(manifest_doc(config=None)), None, "config: descriptor must be a JSON object"),
        (encode(manifest_doc(config=desc(oci.OCI_CONFIG, "sha256:abc"))), None, "digest"),
        (encode(manifest_doc(config=desc(oci.OCI_CONFIG, D1, -1))), None, "size"),
        (encode(manifest_doc(config=desc(oci.OCI_CONFIG, D1, True))), None, "size"),
        (encode(manifest_doc(config=desc(oci.OCI_CONFIG, D1, 1.5))), None, "size"),  # type: ignore[arg-type]
        (encode(manifest_doc(config={"digest": D1, "size": 1})), None, "mediaType is missing"),
        (encode(manifest_doc(layers={})), None, "layers must be a list"),
        (encode(manifest_doc(layers=[desc(oci.OCI_LAYER, D2, urls="x")])), None, "urls"),
        (encode(manifest_doc(annotations={"a": 1})), None, "annotations"),
        (encode(manifest_doc(manifests=[])), None, "must not have 'manifests'"),
        (encode(index_doc(manifests={})), None, "manifests must be a list"),
        (encode(index_doc(layers=[])), None, "must not have 'config' or 'layers'"),
        (
            encode(index_doc(manifests=[desc(oci.OCI_MANIFEST, D1, platform={"os": "linux"})])),
            None,
            "platform needs string os and architecture",
        ),
        (
            encode(index_doc(manifests=[desc(oci.OCI_MANIFEST, D1, platform="linux/amd64")])),
            None,
            "platform must be a JSON object",
        ),
    ],
)
def test_parse_manifest_document_rejects(data: bytes, header: str | None, fragment: str) -> None:
    with pytest.raises(FailedPrecondition) as caught:
        oci.parse_manifest_document(data, header, source="docker.io/library/x:1")
    assert caught.value.message.startswith("docker.io/library/x:1")
    assert fragment in caught.value.message


def test_encode_round_trip_is_stable() -> None:
    manifest = ImageManifest(
        media_type=oci.OCI_MANIFEST,
        config=Descriptor(oci.OCI_CONFIG, D1, 100),
        layers=(Descriptor(oci.OCI_LAYER_GZIP, D2, 2000, annotations={"k": "v"}),),
        annotations={"x": "y"},
    )
    data = oci.encode_manifest(manifest)
    assert oci.parse_manifest_document(data, oci.OCI_MANIFEST) == manifest
    assert oci.encode_manifest(manifest) == data  # same value, same bytes, same digest

    index = ImageIndex(
        media_type=oci.DOCKER_MANIFEST_LIST,
        manifests=(
            Descriptor(oci.DOCKER_MANIFEST_V2, D3, 5, platform=Platform("linux", "amd64")),
            Descriptor(oci.DOCKER_MANIFEST_V2, D4, 6, platform=Platform("linux", "arm", "v7")),
        ),
    )
    assert oci.parse_manifest_document(oci.encode_index(index)) == index
    assert json.loads(oci.encode_index(index))["manifests"][1]["platform"] == {
        "architecture": "arm",
        "os": "linux",
        "variant": "v7",
    }


# --- platform selection --------------------------------------------------------


def entry(
    digest: str,
    os_name: str,
    arch: str,
    variant: str | None = None,
    media_type: str = oci.OCI_MANIFEST,
) -> Descriptor:
    return Descriptor(media_type, digest, 1, platform=Platform(os_name, arch, variant))


ARM64 = entry(D1, "linux", "arm64", "v8")
AMD64 = entry(D2, "linux", "amd64")
AMD64_V1 = entry(D2, "linux", "amd64", "v1")
AMD64_V3 = entry(D3, "linux", "amd64", "v3")
WINDOWS = entry(D4, "windows", "amd64")
ATTESTATION = entry(D5, "unknown", "unknown")


@pytest.mark.parametrize(
    "entries,variant,chosen",
    [
        ([ARM64, AMD64], None, AMD64),
        ([AMD64, ARM64], None, AMD64),
        ([WINDOWS, ARM64, AMD64, ATTESTATION], None, AMD64),
        ([AMD64_V3, AMD64], None, AMD64),  # baseline preferred over a newer level
        ([AMD64_V3, AMD64_V1], None, AMD64_V1),  # v1 is the amd64 baseline
        ([AMD64_V3], None, AMD64_V3),  # any amd64 beats none
        ([AMD64, AMD64_V3], "v3", AMD64_V3),  # an exact variant wins when asked for
        ([AMD64], "v3", AMD64),
    ],
)
def test_select_platform(entries: list[Descriptor], variant: str | None, chosen: Descriptor) -> None:
    index = ImageIndex(oci.OCI_INDEX, tuple(entries))
    assert oci.select_platform(index, "linux", "amd64", variant) == chosen


def test_select_platform_accepts_aliases() -> None:
    index = ImageIndex(oci.OCI_INDEX, (ARM64, AMD64))
    assert oci.select_platform(index, "Linux", "x86_64") == AMD64
    assert oci.select_platform(index, "linux", "aarch64") == ARM64


def test_select_platform_skips_non_manifest_entries() -> None:
    blob = entry(D1, "linux", "amd64", media_type="application/vnd.in-toto+json")
    index = ImageIndex(oci.OCI_INDEX, (blob, AMD64))
    assert oci.select_platform(index) == AMD64


def test_select_platform_none_matches() -> None:
    index = ImageIndex(oci.OCI_INDEX, (ARM64, WINDOWS, ATTESTATION, Descriptor(oci.OCI_MANIFEST, D1, 1)))
    with pytest.raises(NotFound) as caught:
        oci.select_platform(index, source="quay.io/x:1")
    message = caught.value.message
    assert message.startswith("quay.io/x:1: no manifest for platform linux/amd64")
    assert "linux/arm64/v8" in message and "windows/amd64" in message


# --- image config --------------------------------------------------------------------


def test_image_config_diff_ids_and_user() -> None:
    data = json.dumps({"config": {"User": "107"}, "rootfs": {"type": "layers", "diff_ids": [D1, D2]}}).encode()
    assert oci.parse_image_config(data) == oci.ImageConfig(diff_ids=(D1, D2), user="107")


@pytest.mark.parametrize(
    "config,user",
    [
        ({}, ""),
        ({"config": None}, ""),
        ({"config": {"User": ""}}, ""),
        ({"config": {"User": 107}}, "107"),
        ({"config": ["not", "an", "object"]}, ""),
    ],
)
def test_image_config_user_is_informational(config: dict[str, Any], user: str) -> None:
    data = json.dumps({**config, "rootfs": {"diff_ids": [D1]}}).encode()
    assert oci.parse_image_config(data).user == user


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"\xff\xfe",
        b"[]",
        b"{}",
        json.dumps({"rootfs": {}}).encode(),
        json.dumps({"rootfs": {"diff_ids": "sha256:x"}}).encode(),
        json.dumps({"rootfs": {"diff_ids": [1]}}).encode(),
        json.dumps({"rootfs": None}).encode(),
    ],
)
def test_image_config_without_diff_ids_is_refused(data: bytes) -> None:
    with pytest.raises(FailedPrecondition) as caught:
        oci.parse_image_config(data, source="image quay.io/x:1")
    assert caught.value.message == "image quay.io/x:1: its config has no rootfs.diff_ids list"
