"""A real agent pulling from a hostile registry (tests/integration/hostile_registry.py).

Every attack must end in a clear status code (never INTERNAL, never a hang
beyond the RPC's bound), with the agent's peak RSS barely moved, nothing left
in the image store, and the agent still answering. One agent serves the
whole module; each case compares the image store before and after.
"""

from __future__ import annotations

import base64
import json
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from agent.api.gen.runtime.v1 import api_pb2 as pb
from agent.domain import oci
from tests.integration.agentproc import AgentProcess
from tests.integration.hostile_registry import (
    HostileRegistry,
    Layer,
    Published,
    Reply,
    Seen,
    disk_tar,
    gzip_layer,
    index_bytes,
    manifest_reply,
    zstd_layer,
)

pytestmark = pytest.mark.integration

# Short per-read timeouts and a fast minimum rate keep the attacks' deadlines
# (timeout + bytes / rate per attempt, 4 attempts) to seconds.
AGENT_CONFIG = "[images]\nregistry_timeout_seconds = 2.0\nregistry_min_bytes_per_second = 4194304\n"
PULL_BOUND = 90.0  # seconds an attack may take before the test calls it a hang
RSS_GROWTH_LIMIT = 64 << 20


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    process = AgentProcess(tmp_path_factory.mktemp("hostile-agent"), extra_config=AGENT_CONFIG)
    try:
        process.start()
        yield process
    finally:
        process.cleanup()


@pytest.fixture
def hostile() -> Iterator[HostileRegistry]:
    server = HostileRegistry()
    try:
        yield server
    finally:
        server.close()


def publish(hostile: HostileRegistry, layers: list[Layer] | None = None, **kwargs: Any) -> Published:
    return hostile.publish(f"hostile/{uuid.uuid4().hex[:10]}", layers or [gzip_layer(disk_tar())], **kwargs)


def pull(agent: AgentProcess, image: str, auth: pb.AuthConfig | None = None) -> str:
    request = pb.PullImageRequest(image=pb.ImageSpec(image=image))
    if auth is not None:
        request.auth.CopyFrom(auth)
    return str(agent.images.PullImage(request, timeout=PULL_BOUND).image_ref)


def store_entries(agent: AgentProcess) -> set[str]:
    root = agent.state_dir / "images"
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def peak_rss(agent: AgentProcess) -> int:
    """The agent's RSS high-water mark (VmHWM), read through psutil's process."""
    assert agent.proc is not None
    process = psutil.Process(agent.proc.pid)
    status = Path(f"/proc/{process.pid}/status").read_text()
    kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(kib) * 1024


def attack(agent: AgentProcess, image: str, code: grpc.StatusCode, auth: pb.AuthConfig | None = None) -> str:
    """Pull ``image``: it must fail with ``code``, bounded in memory, leaving nothing."""
    before = store_entries(agent)
    peak_before = peak_rss(agent)
    with pytest.raises(grpc.RpcError) as failure:
        pull(agent, image, auth)
    error = failure.value
    assert error.code() == code, (error.code(), error.details())
    assert peak_rss(agent) - peak_before < RSS_GROWTH_LIMIT
    assert store_entries(agent) == before
    assert agent.runtime.Version(pb.VersionRequest(), timeout=10).runtime_name
    return str(error.details())


def test_a_well_behaved_image_with_a_loopback_redirect_is_pulled(agent: AgentProcess,
                                                                  hostile: HostileRegistry) -> None:
    """The control: the server serves a valid image (its layer redirected within 127.0.0.1)."""
    image = publish(hostile)
    layer = image.layers[0]
    hostile.serve(image.blob_path(layer.digest), Reply(status=307, headers={"Location": f"/storage/{layer.digest}"}))
    hostile.serve(f"/storage/{layer.digest}", Reply(body=layer.blob))
    assert pull(agent, hostile.image_ref(image)) == image.config_digest
    assert hostile.seen(f"/storage/{layer.digest}")


def test_manifest_not_matching_docker_content_digest(agent: AgentProcess, hostile: HostileRegistry) -> None:
    image = publish(hostile)
    other = oci.sha256_digest(b"another manifest")
    hostile.serve(image.manifest_path(), manifest_reply(image.manifest, digest=other))
    details = attack(agent, hostile.image_ref(image), grpc.StatusCode.FAILED_PRECONDITION)
    assert other in details


def test_manifest_not_matching_its_digest_reference(agent: AgentProcess, hostile: HostileRegistry) -> None:
    image = publish(hostile)
    wanted = oci.sha256_digest(b"what the pod asked for")
    hostile.serve(image.manifest_path(wanted), manifest_reply(image.manifest, digest=wanted))
    details = attack(agent, hostile.image_ref(image, wanted), grpc.StatusCode.FAILED_PRECONDITION)
    assert "hashes to" in details


def test_blob_not_matching_its_digest(agent: AgentProcess, hostile: HostileRegistry) -> None:
    image = publish(hostile)
    layer = image.layers[0]
    forged = bytearray(layer.blob)
    forged[len(forged) // 2] ^= 0xFF
    hostile.serve(image.blob_path(layer.digest), Reply(body=bytes(forged)))
    details = attack(agent, hostile.image_ref(image), grpc.StatusCode.FAILED_PRECONDITION)
    assert "failed verification" in details


def test_blob_longer_than_its_descriptor(agent: AgentProcess, hostile: HostileRegistry) -> None:
    image = publish(hostile)
    layer = image.layers[0]
    hostile.serve(image.blob_path(layer.digest), Reply(body=layer.blob + b"\0" * 4096))
    details = attack(agent, hostile.image_ref(image), grpc.StatusCode.FAILED_PRECONDITION)
    assert "larger than" in details


def test_blob_shorter_than_its_descriptor(agent: AgentProcess, hostile: HostileRegistry) -> None:
    layer = gzip_layer(disk_tar())
    image = publish(hostile, [layer], descriptor_sizes={layer.digest: len(layer.blob) + 4096})
    details = attack(agent, hostile.image_ref(image), grpc.StatusCode.FAILED_PRECONDITION)
    assert "its descriptor says" in details


def test_blob_cut_off_mid_stream(agent: AgentProcess, hostile: HostileRegistry) -> None:
    image = publish(hostile)
    layer = image.layers[0]
    hostile.serve(image.blob_path(layer.digest), Reply(body=layer.blob, drop_after=len(layer.blob) // 2))
    attack(agent, hostile.image_ref(image), grpc.StatusCode.UNAVAILABLE)
    assert len(hostile.seen(image.blob_path(layer.digest))) == 4  # the retry policy's attempts


def test_blob_redirected_to_another_host_is_not_followed(agent: AgentProcess, hostile: HostileRegistry) -> None:
    image = publish(hostile)
    layer = image.layers[0]
    # .invalid never resolves (RFC 6761): even a bug would not leave the machine.
    target = f"http://blobs.example.invalid:{hostile.host.rsplit(':', 1)[1]}/{layer.digest}"
    hostile.serve(image.blob_path(layer.digest), Reply(status=302, headers={"Location": target}))
    details = attack(agent, hostile.image_ref(image), grpc.StatusCode.FAILED_PRECONDITION)
    assert "blobs.example.invalid" in details and "plain HTTP" in details


def test_redirect_loop(agent: AgentProcess, hostile: HostileRegistry) -> None:
    image = publish(hostile)
    layer = image.layers[0]
    hostile.serve(image.blob_path(layer.digest), Reply(status=307, headers={"Location": "/loop/a"}))
    hostile.serve("/loop/a", Reply(status=307, headers={"Location": "/loop/b"}))
    hostile.serve("/loop/b", Reply(status=307, headers={"Location": "/loop/a"}))
    details = attack(agent, hostile.image_ref(image), grpc.StatusCode.FAILED_PRECONDITION)
    assert "redirected" in details


def test_slow_loris_manifest(agent: AgentProcess, hostile: HostileRegistry) -> None:
    image = publish(hostile)
    hostile.serve(image.manifest_path(), Reply(headers={"Content-Type": oci.OCI_MANIFEST}, body=image.manifest,
                                               trickle=0.5))
    details = attack(agent, hostile.image_ref(image), grpc.StatusCode.UNAVAILABLE)
    assert "deadline" in details


def test_slow_loris_blob(agent: AgentProcess, hostile: HostileRegistry) -> None:
    image = publish(hostile)
    layer = image.layers[0]
    hostile.serve(image.blob_path(layer.digest), Reply(body=layer.blob, trickle=0.5))
    details = attack(agent, hostile.image_ref(image), grpc.StatusCode.UNAVAILABLE)
    assert "deadline" in details


def test_endless_chunked_403_body(agent: AgentProcess, hostile: HostileRegistry) -> None:
    image = publish(hostile)
    hostile.serve(image.manifest_path(), Reply(status=403, headers={"Content-Type": "application/json"},
                                               body=b'{"errors": [', endless=b"x" * 65536))
    attack(agent, hostile.image_ref(image), grpc.StatusCode.UNAUTHENTICATED)


def test_endless_token_response(agent: AgentProcess, hostile: HostileRegistry) -> None:
    image = publish(hostile)
    challenge = f'Bearer realm="http://{hostile.host}/token",service="hostile"'

    def manifest(seen: Seen) -> Reply:
        if "authorization" not in seen.headers:
            return Reply(status=401, headers={"WWW-Authenticate": challenge})
        return manifest_reply(image.manifest)

    hostile.serve(image.manifest_path(), manifest)
    hostile.serve("/token", Reply(headers={"Content-Type": "application/json"}, body=b'{"token": "',
                                  endless=b"a" * 65536))
    details = attack(agent, hostile.image_ref(image), grpc.StatusCode.FAILED_PRECONDITION)
    assert "token" in details
    assert hostile.seen("/token")


@pytest.mark.parametrize("make_layer", [gzip_layer, zstd_layer], ids=["gzip", "zstd"])
def test_truncated_compressed_layer(agent: AgentProcess, hostile: HostileRegistry, make_layer: Any) -> None:
    whole = make_layer(disk_tar())
    # The blob is the truncated stream, so it passes its digest check: the
    # decompressor must notice.
    truncated = Layer(whole.blob[: len(whole.blob) * 2 // 3], whole.media_type, whole.diff_id)
    image = publish(hostile, [truncated])
    details = attack(agent, hostile.image_ref(image), grpc.StatusCode.FAILED_PRECONDITION)
    assert truncated.digest in details


def test_indexes_nested_too_deeply(agent: AgentProcess, hostile: HostileRegistry) -> None:
    image = publish(hostile)
    entry = (image.digest, len(image.manifest), oci.OCI_MANIFEST)
    for _level in range(4):  # index → index → index → index → manifest
        index = index_bytes([entry])
        digest = oci.sha256_digest(index)
        hostile.serve(image.manifest_path(digest), manifest_reply(index, oci.OCI_INDEX))
        entry = (digest, len(index), oci.OCI_INDEX)
    hostile.serve(image.manifest_path(), manifest_reply(index, oci.OCI_INDEX))
    details = attack(agent, hostile.image_ref(image), grpc.StatusCode.FAILED_PRECONDITION)
    assert "nested too deeply" in details


def test_index_referencing_itself(agent: AgentProcess, hostile: HostileRegistry) -> None:
    image = publish(hostile)
    claimed = oci.sha256_digest(b"this index")
    index = index_bytes([(claimed, 300, oci.OCI_INDEX)])
    # The tag and the digest the index names both answer with the index itself.
    hostile.serve(image.manifest_path(), manifest_reply(index, oci.OCI_INDEX))
    hostile.serve(image.manifest_path(claimed), manifest_reply(index, oci.OCI_INDEX, digest=claimed))
    details = attack(agent, hostile.image_ref(image), grpc.StatusCode.FAILED_PRECONDITION)
    assert claimed in details


def test_enormous_manifest_streamed(agent: AgentProcess, hostile: HostileRegistry) -> None:
    image = publish(hostile)
    hostile.serve(image.manifest_path(), Reply(headers={"Content-Type": oci.OCI_MANIFEST},
                                               body=b'{"schemaVersion": 2, "x": "', endless=b" " * 65536))
    details = attack(agent, hostile.image_ref(image), grpc.StatusCode.FAILED_PRECONDITION)
    assert "bytes allowed" in details


def test_enormous_manifest_announced(agent: AgentProcess, hostile: HostileRegistry) -> None:
    image = publish(hostile)
    hostile.serve(image.manifest_path(), Reply(headers={"Content-Type": oci.OCI_MANIFEST}, body=b"{",
                                               content_length=8 << 30, drop_after=1))
    details = attack(agent, hostile.image_ref(image), grpc.StatusCode.FAILED_PRECONDITION)
    assert str(8 << 30) in details


def test_credentials_never_reach_the_log_when_the_manifest_is_cut_off(
        agent: AgentProcess, hostile: HostileRegistry) -> None:
    """Basic auth asked for, then the manifest dropped mid-body: UNAVAILABLE, and no secret logged."""
    image = publish(hostile)
    username, password = "puller", f"pw-{secrets.token_hex(12)}"
    basic = base64.b64encode(f"{username}:{password}".encode()).decode()

    def manifest(seen: Seen) -> Reply:
        if seen.headers.get("authorization") != f"Basic {basic}":
            return Reply(status=401, headers={"WWW-Authenticate": 'Basic realm="hostile"'},
                         body=json.dumps({"errors": [{"code": "UNAUTHORIZED"}]}).encode())
        return Reply(headers={"Content-Type": oci.OCI_MANIFEST}, body=image.manifest,
                     drop_after=len(image.manifest) // 2)

    hostile.serve(image.manifest_path(), manifest)
    attack(agent, hostile.image_ref(image), grpc.StatusCode.UNAVAILABLE,
           auth=pb.AuthConfig(username=username, password=password))
    authorised = [s for s in hostile.seen(image.manifest_path()) if s.headers.get("authorization")]
    assert len(authorised) == 4  # the credentials were sent, and the cut-off retried
    log = agent.log_path.read_text(errors="replace")
    assert image.manifest_path() in log or "registry.retry" in log  # the pull was logged
    for secret in (password, basic, base64.b64encode(password.encode()).decode()):
        assert secret not in log
