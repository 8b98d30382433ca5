# ruff: noqa: F811 - fixtures imported from registry_fixture are then taken as parameters
"""The registry client against a real docker-registry (distribution 2.8) on 127.0.0.1.

Content is pushed with the client's own push functions and cross-checked with
skopeo. Auth runs against the registry's real htpasswd and token backends;
failures that a healthy registry never produces (5xx, broken streams) come
from :class:`FlakyFront`, a small proxy in front of the real registry.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import secrets
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.adapters.registry import RegistryClient
from agent.adapters.registry.credentials import RegistryCredentials, credentials_for
from agent.adapters.registry.transport import RegistryHostConfig, is_loopback_host
from agent.domain import oci
from agent.domain.errors import FailedPrecondition, NotFound, Unauthenticated, Unavailable
from agent.domain.imageref import Mirror, RemoteRepository, RewriteRule, parse_image_ref
from agent.domain.registry import RegistryAuth
from tests.integration.registry_fixture import (  # noqa: F401 - fixtures are found by name
    LOOPBACK,
    PushedImage,
    QuietHTTPServer,
    RunningRegistry,
    auth_registry,
    containerdisk_layer,
    free_port,
    push_image,
    registry,
    tls_registry,
    token_registry,
)

pytestmark = pytest.mark.integration


class SleepRecorder:
    """Stands in for time.sleep so retries are instant and observable."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, delay: float) -> None:
        self.delays.append(delay)


@pytest.fixture
def sleeps() -> SleepRecorder:
    return SleepRecorder()


@pytest.fixture
def client(sleeps: SleepRecorder) -> Iterator[RegistryClient]:
    with RegistryClient(sleep=sleeps, timeout=10.0) as instance:
        yield instance


def unique(name: str) -> str:
    return f"test/{name}-{secrets.token_hex(4)}"


def disk_layer(size: int = 4096) -> bytes:
    """A containerDisk layer with random (so globally unique) disk content."""
    return containerdisk_layer({"disk/disk.img": os.urandom(size)})


def as_lookup(running: RunningRegistry, password: str | None = None) -> Any:
    user, real_password = next(iter(running.users.items()))
    return credentials_for(
        running.host,
        RegistryCredentials(username=user, password=real_password if password is None else password),
    )


# --- pure helpers (no registry needed) ---------------------------------------------


@pytest.mark.parametrize(
    "host,loopback",
    [
        ("localhost", True),
        ("localhost:5000", True),
        ("127.0.0.1:5000", True),
        ("127.1.2.3", True),
        ("[::1]:5000", True),
        ("10.0.0.1:5000", False),
        ("quay.io", False),
        ("localhost.example.com", False),
    ],
)
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


# --- pulling -----------------------------------------------------------------------


def test_pull_by_tag_and_by_digest(registry: RunningRegistry, client: RegistryClient, tmp_path: Path) -> None:
    repo = registry.repository(unique("cirros"))
    pushed = push_image(client, repo, "v1", [disk_layer()])
    ref = parse_image_ref(f"{registry.host}/{repo.name}:v1")

    by_tag = client.resolve(ref)
    assert by_tag.digest == pushed.digest == oci.sha256_digest(pushed.manifest)
    assert by_tag.reference_digest == pushed.digest
    assert by_tag.manifest_bytes == pushed.manifest
    assert by_tag.media_type == oci.OCI_MANIFEST
    assert by_tag.index is None
    assert by_tag.repository == repo

    by_digest = client.resolve(ref.with_digest(pushed.digest))
    assert by_digest.digest == pushed.digest
    assert by_digest.manifest == by_tag.manifest

    assert client.fetch_config(repo, by_tag.manifest.config) == pushed.config
    layer = by_tag.manifest.layers[0]
    dest = tmp_path / "layer"
    assert client.fetch_blob(repo, layer.digest, dest, expected_size=layer.size) == layer.size
    assert dest.read_bytes() == pushed.layers[0]
    assert [p.name for p in tmp_path.iterdir()] == ["layer"]  # no temporary left behind


def test_docker_schema2_image(registry: RunningRegistry, client: RegistryClient) -> None:
    repo = registry.repository(unique("docker"))
    pushed = push_image(client, repo, "latest", [disk_layer()], docker=True)
    resolved = client.resolve(parse_image_ref(f"{registry.host}/{repo.name}"))
    assert resolved.media_type == oci.DOCKER_MANIFEST_V2
    assert resolved.digest == pushed.digest
    assert resolved.manifest.layers[0].media_type == oci.DOCKER_LAYER_GZIP


def test_multi_arch_index_chooses_linux_amd64(
    registry: RunningRegistry, client: RegistryClient, tmp_path: Path
) -> None:
    repo = registry.repository(unique("multiarch"))
    arm64 = push_image(client, repo, None, [disk_layer()], architecture="arm64")
    amd64 = push_image(client, repo, None, [disk_layer()], architecture="amd64")
    s390x = push_image(client, repo, None, [disk_layer()], architecture="s390x")

    def entry(image: PushedImage, arch: str, variant: str | None = None) -> oci.Descriptor:
        return oci.Descriptor(
            image.media_type,
            image.digest,
            len(image.manifest),
            platform=oci.Platform("linux", arch, variant),
        )

    # amd64 neither first nor last, so "the first entry" would be wrong.
    index = oci.ImageIndex(oci.OCI_INDEX, (entry(arm64, "arm64", "v8"), entry(amd64, "amd64"), entry(s390x, "s390x")))
    index_bytes = oci.encode_index(index)
    index_digest = client.push_manifest(repo, "multi", index_bytes, oci.OCI_INDEX)

    resolved = client.resolve(parse_image_ref(f"{registry.host}/{repo.name}:multi"))
    assert resolved.digest == amd64.digest
    assert resolved.manifest_bytes == amd64.manifest
    assert resolved.reference_digest == index_digest == oci.sha256_digest(index_bytes)
    assert resolved.index == index
    config = json.loads(client.fetch_config(repo, resolved.manifest.config))
    assert config["architecture"] == "amd64"
    client.fetch_blob(repo, resolved.manifest.layers[0].digest, tmp_path / "amd64-layer")
    assert (tmp_path / "amd64-layer").read_bytes() == amd64.layers[0]

    # By the index's digest too.
    by_digest = client.resolve(parse_image_ref(f"{registry.host}/{repo.name}@{index_digest}"))
    assert by_digest.digest == amd64.digest


def test_docker_manifest_list_without_amd64_is_not_found(registry: RunningRegistry, client: RegistryClient) -> None:
    repo = registry.repository(unique("armonly"))
    arm64 = push_image(client, repo, None, [disk_layer()], architecture="arm64", docker=True)
    listing = oci.ImageIndex(
        oci.DOCKER_MANIFEST_LIST,
        (
            oci.Descriptor(
                arm64.media_type,
                arm64.digest,
                len(arm64.manifest),
                platform=oci.Platform("linux", "arm64"),
            ),
        ),
    )
    client.push_manifest(repo, "arm", oci.encode_index(listing), oci.DOCKER_MANIFEST_LIST)
    name = f"{registry.host}/{repo.name}:arm"
    with pytest.raises(NotFound) as caught:
        client.resolve(parse_image_ref(name))
    assert name in caught.value.message
    assert "linux/amd64" in caught.value.message and "linux/arm64" in caught.value.message


def test_missing_tag_repository_and_blob_are_not_found(
    registry: RunningRegistry, client: RegistryClient, tmp_path: Path
) -> None:
    repo = registry.repository(unique("present"))
    push_image(client, repo, "v1", [disk_layer()])
    for name in (f"{registry.host}/{repo.name}:nope", f"{registry.host}/test/absent:v1"):
        with pytest.raises(NotFound) as caught:
            client.resolve(parse_image_ref(name))
        assert f"image {name} not found" in caught.value.message
        assert registry.host in caught.value.message

    missing = oci.sha256_digest(b"never pushed " + os.urandom(8))
    with pytest.raises(NotFound) as caught_blob:
        client.fetch_blob(repo, missing, tmp_path / "blob")
    assert missing in caught_blob.value.message
    assert list(tmp_path.iterdir()) == []


def test_blob_not_matching_its_digest_is_refused_and_removed(
    registry: RunningRegistry, client: RegistryClient, tmp_path: Path
) -> None:
    repo = registry.repository(unique("tampered"))
    content = os.urandom(300_000)
    digest = client.push_blob(repo, content)
    # Corrupt the registry's copy, keeping the length: only the hash can tell.
    stored = registry.blob_data_path(digest)
    stored.write_bytes(bytes([content[0] ^ 0xFF]) + content[1:])

    dest = tmp_path / "blob"
    with pytest.raises(FailedPrecondition) as caught:
        client.fetch_blob(repo, digest, dest)
    assert "failed verification" in caught.value.message
    assert digest in caught.value.message and registry.host in caught.value.message
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(FailedPrecondition):
        client.fetch_blob_bytes(repo, digest)


def test_wrong_size_is_refused(registry: RunningRegistry, client: RegistryClient, tmp_path: Path) -> None:
    repo = registry.repository(unique("size"))
    digest = client.push_blob(repo, os.urandom(1000))
    for expected in (999, 1001):
        with pytest.raises(FailedPrecondition):
            client.fetch_blob(repo, digest, tmp_path / "blob", expected_size=expected)
    assert list(tmp_path.iterdir()) == []


def test_manifest_not_matching_its_digest_is_refused(registry: RunningRegistry, client: RegistryClient) -> None:
    repo = registry.repository(unique("badmanifest"))
    pushed = push_image(client, repo, "v1", [disk_layer()], annotations={"note": "aaaa"})
    stored = registry.blob_data_path(pushed.digest)
    stored.write_bytes(stored.read_bytes().replace(b'"aaaa"', b'"bbbb"'))
    for name in (f"{repo.name}@{pushed.digest}", f"{repo.name}:v1"):
        with pytest.raises(FailedPrecondition) as caught:
            client.resolve(parse_image_ref(f"{registry.host}/{name}"))
        assert "hashes to" in caught.value.message


def test_rewrite_rule_serves_docker_hub_name_from_local_registry(
    registry: RunningRegistry, sleeps: SleepRecorder
) -> None:
    name = unique("kubevirt").split("/", 1)[1]
    local = registry.repository(f"kubevirt/{name}")
    rules = [RewriteRule("docker.io/kubevirt/", f"{registry.host}/kubevirt/")]
    with RegistryClient(rewrites=rules, sleep=sleeps) as client:
        pushed = push_image(client, local, "v1", [disk_layer()])
        resolved = client.resolve(parse_image_ref(f"kubevirt/{name}:v1"))
    assert resolved.digest == pushed.digest
    assert resolved.repository.host == registry.host


def test_dead_mirror_falls_through_to_the_registry(registry: RunningRegistry, sleeps: SleepRecorder) -> None:
    repo = registry.repository(unique("mirrored"))
    dead = f"http://{LOOPBACK}:{free_port()}"
    mirrors = [Mirror(registry.host, (dead,))]
    with RegistryClient(mirrors=mirrors, sleep=sleeps, max_attempts=2) as client:
        pushed = push_image(client, repo, "v1", [disk_layer()])
        with capture_logs() as logs:
            resolved = client.resolve(parse_image_ref(f"{registry.host}/{repo.name}:v1"))
    assert resolved.digest == pushed.digest
    assert not resolved.repository.mirror
    failures = [entry for entry in logs if entry["event"] == "registry.candidate_failed"]
    assert len(failures) == 1 and dead.split("//")[1] in failures[0]["endpoint"]


def test_mirror_is_used_first(registry: RunningRegistry, sleeps: SleepRecorder) -> None:
    repo = registry.repository(unique("viamirror"))
    # The "upstream" is unreachable; the mirror (the real registry) answers.
    upstream = f"{LOOPBACK}:{free_port()}"
    mirrors = [Mirror(upstream, (f"http://{registry.host}",))]
    with RegistryClient(mirrors=mirrors, sleep=sleeps) as client:
        pushed = push_image(client, repo, "v1", [disk_layer()])
        resolved = client.resolve(parse_image_ref(f"{upstream}/{repo.name}:v1"))
        assert resolved.digest == pushed.digest
        assert resolved.repository.mirror and resolved.repository.host == registry.host
    assert sleeps.delays == []  # the dead upstream was never tried


# --- pushing -------------------------------------------------------------------------


def test_push_blob_from_file_skips_existing_and_mounts(
    registry: RunningRegistry, client: RegistryClient, tmp_path: Path
) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    first = registry.repository(unique("src"))
    second = registry.repository(unique("dst"))
    third = registry.repository(unique("other"))

    digest = client.push_blob(first, source)
    assert digest == oci.sha256_digest(source.read_bytes())
    assert client.blob_exists(first, digest)
    assert not client.blob_exists(second, digest)

    with capture_logs() as logs:
        assert client.push_blob(first, source, digest) == digest
        assert client.push_blob(second, source, digest, mount_from=first.name) == digest
        # A mount from a repository without the blob falls back to an upload.
        assert client.push_blob(third, source, digest, mount_from="test/empty") == digest
    events = [entry["event"] for entry in logs if entry["event"].startswith("registry.blob")]
    assert events == ["registry.blob_exists", "registry.blob_mounted", "registry.blob_pushed"]

    dest = tmp_path / "fetched"
    client.fetch_blob(second, digest, dest)
    assert dest.read_bytes() == source.read_bytes()


def test_push_manifest_by_digest_must_match(registry: RunningRegistry, client: RegistryClient) -> None:
    repo = registry.repository(unique("bydigest"))
    pushed = push_image(client, repo, None, [disk_layer()])
    assert client.resolve(parse_image_ref(f"{registry.host}/{repo.name}@{pushed.digest}"))
    with pytest.raises(Exception, match="hash to"):
        client.push_manifest(repo, oci.sha256_digest(b"x"), pushed.manifest, pushed.media_type)


def test_registry_refusing_a_manifest_is_failed_precondition(registry: RunningRegistry, client: RegistryClient) -> None:
    repo = registry.repository(unique("refused"))
    manifest = oci.ImageManifest(
        oci.OCI_MANIFEST,
        oci.Descriptor(oci.OCI_CONFIG, oci.sha256_digest(b"absent config"), 13),
        (),
    )
    with pytest.raises(FailedPrecondition) as caught:
        client.push_manifest(repo, "v1", oci.encode_manifest(manifest), oci.OCI_MANIFEST)
    assert registry.host in caught.value.message
    assert "MANIFEST_BLOB_UNKNOWN" in caught.value.message


# --- skopeo cross-checks ------------------------------------------------------------------

needs_skopeo = pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")


def skopeo(*args: str) -> str:
    result = subprocess.run(["skopeo", "--insecure-policy", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@needs_skopeo
def test_skopeo_reads_what_we_push(registry: RunningRegistry, client: RegistryClient) -> None:
    repo = registry.repository(unique("forskopeo"))
    pushed = push_image(client, repo, "v1", [disk_layer()])
    location = f"docker://{registry.host}/{repo.name}:v1"
    raw = skopeo("inspect", "--raw", "--tls-verify=false", location)
    assert raw.encode() == pushed.manifest
    info = json.loads(skopeo("inspect", "--tls-verify=false", location))
    assert info["Digest"] == pushed.digest
    assert info["Architecture"] == "amd64" and info["Os"] == "linux"


def write_oci_layout(directory: Path, tag: str, layer: bytes) -> tuple[str, bytes]:
    """An OCI image layout with one image; returns (manifest digest, manifest bytes)."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        digest = oci.sha256_digest(data)
        (blobs / oci.digest_hex(digest)).write_bytes(data)
        return digest

    import gzip

    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [oci.sha256_digest(gzip.decompress(layer))]},
        }
    ).encode()
    manifest = oci.encode_manifest(
        oci.ImageManifest(
            oci.OCI_MANIFEST,
            oci.Descriptor(oci.OCI_CONFIG, put(config), len(config)),
            (oci.Descriptor(oci.OCI_LAYER_GZIP, put(layer), len(layer)),),
        )
    )
    digest = put(manifest)
    index = oci.ImageIndex(
        oci.OCI_INDEX,
        (
            oci.Descriptor(
                oci.OCI_MANIFEST,
                digest,
                len(manifest),
                annotations={"org.opencontainers.image.ref.name": tag},
            ),
        ),
    )
    (directory / "index.json").write_bytes(oci.encode_index(index))
    (directory / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    return digest, manifest


@needs_skopeo
@pytest.mark.parametrize("convert", [False, True], ids=["oci", "v2s2"])
def test_we_pull_what_skopeo_pushes(
    registry: RunningRegistry, client: RegistryClient, tmp_path: Path, convert: bool
) -> None:
    layer = disk_layer()
    digest, manifest = write_oci_layout(tmp_path / "layout", "v1", layer)
    name = unique("fromskopeo")
    extra = ["--format", "v2s2"] if convert else []
    skopeo(
        "copy",
        *extra,
        "--dest-tls-verify=false",
        f"oci:{tmp_path / 'layout'}:v1",
        f"docker://{registry.host}/{name}:v1",
    )
    resolved = client.resolve(parse_image_ref(f"{registry.host}/{name}:v1"))
    if convert:
        assert resolved.media_type == oci.DOCKER_MANIFEST_V2
        assert resolved.manifest.layers[0].media_type == oci.DOCKER_LAYER_GZIP
    else:
        assert resolved.digest == digest and resolved.manifest_bytes == manifest
    dest = tmp_path / "layer"
    client.fetch_blob(resolved.repository, resolved.manifest.layers[0].digest, dest)
    assert dest.read_bytes() == layer


# --- htpasswd (Basic) -------------------------------------------------------------------


def test_htpasswd_right_credentials(auth_registry: RunningRegistry, sleeps: SleepRecorder) -> None:
    repo = auth_registry.repository(unique("basic"))
    with RegistryClient(credentials=as_lookup(auth_registry), sleep=sleeps) as client:
        pushed = push_image(client, repo, "v1", [disk_layer()])
        resolved = client.resolve(parse_image_ref(f"{auth_registry.host}/{repo.name}:v1"))
    assert resolved.digest == pushed.digest

    # CRI's AuthConfig.auth form (base64 user:password), given per call.
    user, password = next(iter(auth_registry.users.items()))
    encoded = base64.b64encode(f"{user}:{password}".encode()).decode()
    per_call = RegistryAuth(auth=encoded, server_address=auth_registry.host)
    with RegistryClient(sleep=sleeps) as client:
        again = client.resolve(parse_image_ref(f"{auth_registry.host}/{repo.name}:v1"), auth=per_call)
    assert again.digest == pushed.digest


def test_htpasswd_wrong_or_missing_credentials(auth_registry: RunningRegistry, sleeps: SleepRecorder) -> None:
    ref = parse_image_ref(f"{auth_registry.host}/test/whatever:v1")
    with RegistryClient(credentials=as_lookup(auth_registry, "wrong"), sleep=sleeps) as client:
        with pytest.raises(Unauthenticated) as caught:
            client.resolve(ref)
    assert f"registry {auth_registry.host} rejected the credentials" in caught.value.message

    with RegistryClient(sleep=sleeps) as client:
        with pytest.raises(Unauthenticated) as caught_anonymous:
            client.resolve(ref)
    assert auth_registry.host in caught_anonymous.value.message
    assert "no credentials" in caught_anonymous.value.message
    assert sleeps.delays == []  # auth failures are not retried


# --- token (Bearer) ----------------------------------------------------------------------


def test_bearer_token_flow(token_registry: RunningRegistry, sleeps: SleepRecorder, tmp_path: Path) -> None:
    token_server = token_registry.token_server
    assert token_server is not None
    user = next(iter(token_registry.users))
    repo = token_registry.repository(unique("bearer"))
    before = len(token_server.requests)

    with RegistryClient(credentials=as_lookup(token_registry), sleep=sleeps) as client:
        pushed = push_image(client, repo, "v1", [disk_layer()])
        resolved = client.resolve(parse_image_ref(f"{token_registry.host}/{repo.name}:v1"))
        client.fetch_blob(repo, resolved.manifest.layers[0].digest, tmp_path / "layer")
        client.fetch_config(repo, resolved.manifest.config)
    assert resolved.digest == pushed.digest
    assert (tmp_path / "layer").read_bytes() == pushed.layers[0]

    requests = token_server.requests[before:]
    assert all(r.account == user and r.granted for r in requests)
    assert all(r.service == "podvisor-test-registry" for r in requests)
    scopes = [tuple(r.scopes) for r in requests]
    # One token per scope set, then cached: push scope once, pull scope once.
    assert scopes == [
        (f"repository:{repo.name}:pull,push",),
        (f"repository:{repo.name}:pull",),
    ]


def test_bearer_token_is_refreshed_after_expiry(token_registry: RunningRegistry, sleeps: SleepRecorder) -> None:
    token_server = token_registry.token_server
    assert token_server is not None
    repo = token_registry.repository(unique("expiry"))
    now = [1000.0]
    with RegistryClient(credentials=as_lookup(token_registry), sleep=sleeps, clock=lambda: now[0]) as client:
        push_image(client, repo, "v1", [disk_layer()])
        ref = parse_image_ref(f"{token_registry.host}/{repo.name}:v1")
        client.resolve(ref)
        count = len(token_server.requests)
        client.resolve(ref)
        assert len(token_server.requests) == count  # cached
        now[0] += token_server.lifetime  # past expires_in (minus the safety margin)
        client.resolve(ref)
        assert len(token_server.requests) == count + 1


def test_bearer_wrong_credentials_and_anonymous(token_registry: RunningRegistry, sleeps: SleepRecorder) -> None:
    repo = token_registry.repository(unique("private"))
    with RegistryClient(credentials=as_lookup(token_registry), sleep=sleeps) as client:
        push_image(client, repo, "v1", [disk_layer()])
    ref = parse_image_ref(f"{token_registry.host}/{repo.name}:v1")

    with RegistryClient(credentials=as_lookup(token_registry, "wrong"), sleep=sleeps) as client:
        with pytest.raises(Unauthenticated) as caught:
            client.resolve(ref)
    assert f"registry {token_registry.host} rejected the credentials" in caught.value.message

    # Anonymous tokens carry no access here, so the registry keeps refusing.
    with RegistryClient(sleep=sleeps) as client:
        with pytest.raises(Unauthenticated) as caught_anonymous:
            client.resolve(ref)
    assert token_registry.host in caught_anonymous.value.message


def test_registry_token_is_used_as_is(token_registry: RunningRegistry, sleeps: SleepRecorder) -> None:
    token_server = token_registry.token_server
    assert token_server is not None
    repo = token_registry.repository(unique("regtoken"))
    with RegistryClient(credentials=as_lookup(token_registry), sleep=sleeps) as client:
        pushed = push_image(client, repo, "v1", [disk_layer()])
    token = token_server.issue("podvisor", [f"repository:{repo.name}:pull"])
    before = len(token_server.requests)
    lookup = credentials_for(token_registry.host, RegistryCredentials(registry_token=token))
    with RegistryClient(credentials=lookup, sleep=sleeps) as client:
        resolved = client.resolve(parse_image_ref(f"{token_registry.host}/{repo.name}:v1"))
    assert resolved.digest == pushed.digest
    assert len(token_server.requests) == before  # the token endpoint was not needed


# --- TLS -----------------------------------------------------------------------------------


def test_tls_registry_needs_its_ca(tls_registry: RunningRegistry, sleeps: SleepRecorder) -> None:
    assert tls_registry.tls_cert is not None
    repo = tls_registry.repository(unique("tls"))
    ref = parse_image_ref(f"{tls_registry.host}/{repo.name}:v1")

    with RegistryClient(sleep=sleeps) as client:
        with pytest.raises(Unavailable) as caught:
            client.resolve(ref)
    assert "certificate" in caught.value.message and tls_registry.host in caught.value.message
    assert sleeps.delays == []  # neither retried nor downgraded to HTTP

    trusted = {tls_registry.host: RegistryHostConfig(ca_file=str(tls_registry.tls_cert))}
    with RegistryClient(hosts=trusted, sleep=sleeps) as client:
        pushed = push_image(client, repo, "v1", [disk_layer()])
        assert client.resolve(ref).digest == pushed.digest

    insecure = {tls_registry.host: RegistryHostConfig(insecure=True)}
    with RegistryClient(hosts=insecure, sleep=sleeps) as client:
        assert client.resolve(ref).digest == pushed.digest


def test_forced_https_on_plain_http_registry_is_unavailable(
    registry: RunningRegistry, client: RegistryClient, sleeps: SleepRecorder
) -> None:
    repo = RemoteRepository(registry.host, registry.host, "test/x", scheme="https")
    with pytest.raises(Unavailable) as caught:
        client.fetch_manifest(repo, "v1")
    assert f"registry {registry.host}: {registry.host} does not speak TLS" in caught.value.message
    assert "insecure" in caught.value.message
    assert sleeps.delays == []  # deterministic, so not retried


# --- failures and retries ------------------------------------------------------------------


@dataclass
class FlakyFront:
    """An HTTP proxy to a real registry that misbehaves on purpose.

    ``fail`` maps a predicate on (method, path) to a list of statuses served
    (one per matching request) before requests go through; ``truncate`` holds
    paths whose next GET body is cut in half with the connection dropped.
    """

    upstream: str
    fail: list[tuple[Callable[[str, str], bool], list[int]]] = field(default_factory=list)
    truncate: set[str] = field(default_factory=set)
    seen: list[tuple[str, str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server = QuietHTTPServer((LOOPBACK, 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _planned_status(self, method: str, path: str) -> int | None:
        with self._lock:
            for predicate, statuses in self.fail:
                if predicate(method, path) and statuses:
                    return statuses.pop(0)
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                status = front._planned_status(self.command, self.path)
                if status is not None:
                    front.seen.append((self.command, self.path, status))
                    body = b'{"errors":[{"code":"UNAVAILABLE","message":"flaky"}]}'
                    self.send_response(status)
                    if status == 429:
                        self.send_header("Retry-After", "0")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                length = int(self.headers.get("Content-Length") or 0)
                payload = self.rfile.read(length) if length else None
                connection = http.client.HTTPConnection(front.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                connection.request(self.command, self.path, body=payload, headers=headers)
                upstream = connection.getresponse()
                data = upstream.read()
                front.seen.append((self.command, self.path, upstream.status))
                cut = self.command == "GET" and self.path in front.truncate
                if cut:
                    front.truncate.discard(self.path)
                self.send_response(upstream.status)
                for key, value in upstream.getheaders():
                    if key.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data[: len(data) // 2] if cut else data)
                if cut:
                    self.close_connection = True
                connection.close()

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle  # noqa: N815

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        return Handler


@pytest.fixture
def front(registry: RunningRegistry) -> Iterator[FlakyFront]:
    proxy = FlakyFront(registry.host)
    try:
        yield proxy
    finally:
        proxy.close()


def test_5xx_and_429_are_retried(
    registry: RunningRegistry,
    front: FlakyFront,
    client: RegistryClient,
    sleeps: SleepRecorder,
    tmp_path: Path,
) -> None:
    repo = registry.repository(unique("flaky"))
    pushed = push_image(client, repo, "v1", [disk_layer()])
    layer_digest = oci.sha256_digest(pushed.layers[0])
    front.fail = [
        (lambda m, p: "/manifests/" in p, [503, 502]),
        (lambda m, p: "/blobs/" in p, [500, 429]),
    ]
    via_front = RemoteRepository(front.host, front.host, repo.name)
    ref = parse_image_ref(f"{front.host}/{repo.name}:v1")
    resolved = client.resolve_in(via_front, ref)
    assert resolved.digest == pushed.digest
    client.fetch_blob(via_front, layer_digest, tmp_path / "layer")
    assert (tmp_path / "layer").read_bytes() == pushed.layers[0]
    assert [status for _, _, status in front.seen] == [503, 502, 200, 500, 429, 200]
    assert len(sleeps.delays) == 4
    assert sleeps.delays[1] > sleeps.delays[0]  # exponential


def test_persistent_5xx_is_unavailable(
    registry: RunningRegistry, front: FlakyFront, client: RegistryClient, sleeps: SleepRecorder
) -> None:
    front.fail = [(lambda m, p: True, [503] * 10)]
    ref = parse_image_ref(f"{front.host}/test/anything:v1")
    with pytest.raises(Unavailable) as caught:
        client.resolve(ref)
    assert f"registry {front.host} answered HTTP 503" in caught.value.message
    assert len(front.seen) == 4 and len(sleeps.delays) == 3


def test_broken_blob_stream_is_restarted(
    registry: RunningRegistry,
    front: FlakyFront,
    client: RegistryClient,
    sleeps: SleepRecorder,
    tmp_path: Path,
) -> None:
    repo = registry.repository(unique("broken"))
    content = os.urandom(2 * 1024 * 1024)
    digest = client.push_blob(repo, content)
    front.truncate.add(f"/v2/{repo.name}/blobs/{digest}")
    via_front = RemoteRepository(front.host, front.host, repo.name)
    assert client.fetch_blob(via_front, digest, tmp_path / "blob") == len(content)
    assert (tmp_path / "blob").read_bytes() == content
    assert len(sleeps.delays) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["blob"]


def test_unreachable_registry_is_unavailable(client: RegistryClient, sleeps: SleepRecorder) -> None:
    host = f"{LOOPBACK}:{free_port()}"
    with pytest.raises(Unavailable) as caught:
        client.resolve(parse_image_ref(f"{host}/test/x:v1"))
    assert f"registry {host} is unreachable after 4 attempts" in caught.value.message
    assert len(sleeps.delays) == 3
