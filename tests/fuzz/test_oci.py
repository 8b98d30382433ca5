"""OCI/Docker manifests, indexes and image configs (a registry's bytes): parsed or FailedPrecondition."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from agent.domain import oci
from agent.domain.errors import NotFound
from tests.fuzz.properties import Refused, domain_errors_only
from tests.fuzz.strategies import deep_texts, dumps, json_values, mutate_document

D = "sha256:" + "a" * 64
MANIFEST: dict[str, Any] = {
    "schemaVersion": 2, "mediaType": oci.OCI_MANIFEST, "artifactType": "application/x",
    "config": {"mediaType": oci.OCI_CONFIG, "digest": D, "size": 2},
    "layers": [{"mediaType": oci.OCI_LAYER_GZIP, "digest": D, "size": 10, "urls": ["http://x"],
                "annotations": {"a": "b"}}],
    "annotations": {"org.opencontainers.image.title": "x"},
    "subject": {"mediaType": oci.OCI_MANIFEST, "digest": D, "size": 1},
}
INDEX: dict[str, Any] = {
    "schemaVersion": 2, "mediaType": oci.OCI_INDEX,
    "manifests": [{"mediaType": oci.OCI_MANIFEST, "digest": D, "size": 5,
                   "platform": {"os": "linux", "architecture": "amd64", "variant": "v1",
                                "os.version": "1", "os.features": ["x"]}},
                  {"mediaType": oci.DOCKER_MANIFEST_V2, "digest": D, "size": 5,
                   "platform": {"os": "linux", "architecture": "arm64"}}],
}
CONFIG: dict[str, Any] = {"rootfs": {"type": "layers", "diff_ids": [D]}, "config": {"User": "0"}}
MEDIA_TYPES = st.one_of(st.none(), st.sampled_from(sorted(oci.MANIFEST_TYPES | oci._SCHEMA1_TYPES) + [
    "application/json; charset=utf-8", "", ";", "text/html"]), st.text(max_size=10))
BODIES = st.one_of(
    mutate_document(MANIFEST).map(dumps), mutate_document(INDEX).map(dumps), json_values.map(dumps),
    deep_texts, st.binary(max_size=64).map(lambda b: b.decode("latin-1")),
)


@given(BODIES, MEDIA_TYPES)
@example("[" * 100_000, oci.OCI_MANIFEST)
@example('{"schemaVersion": 2, "config": {"size": ' + "9" * 5000 + "}}", None)
def test_manifests_parse_or_fail_precondition(body: str, media_type: str | None) -> None:
    data = body.encode("utf-8", "surrogatepass")
    doc = domain_errors_only(oci.parse_manifest_document, data, media_type, source="image x")
    if isinstance(doc, Refused):
        return
    if isinstance(doc, oci.ImageIndex):
        domain_errors_only(oci.select_platform, doc, source="image x")
        again = oci.parse_manifest_document(oci.encode_index(doc), doc.media_type)
    else:
        again = oci.parse_manifest_document(oci.encode_manifest(doc), doc.media_type)
    assert again == doc


@given(st.one_of(mutate_document(CONFIG).map(dumps), json_values.map(dumps), deep_texts,
                 st.binary(max_size=64).map(lambda b: b.decode("latin-1"))))
@example("[" * 100_000)
def test_image_configs_parse_or_fail_precondition(body: str) -> None:
    config = domain_errors_only(oci.parse_image_config, body.encode("utf-8", "surrogatepass"))
    if not isinstance(config, Refused):
        assert all(isinstance(d, str) for d in config.diff_ids)


@given(st.one_of(st.text(max_size=80), st.sampled_from([D, D.upper(), "sha512:" + "a" * 128, "sha256:", ":"])))
def test_digests_round_trip_or_invalid_argument(text: str) -> None:
    digest = domain_errors_only(oci.parse_digest, text, "image.digest")
    if not isinstance(digest, Refused):
        assert oci.sha256_digest(b"") .startswith("sha256:")
        assert oci.parse_digest(oci.SHA256_PREFIX + oci.digest_hex(digest)) == digest


def test_select_platform_without_a_match_is_not_found() -> None:
    index = oci.parse_manifest_document(json.dumps(INDEX).encode())
    assert isinstance(index, oci.ImageIndex)
    refused = domain_errors_only(oci.select_platform, index, "linux", "s390x", source="image x")
    assert isinstance(refused, Refused) and isinstance(refused.error, NotFound)
