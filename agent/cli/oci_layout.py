"""OCI image layouts on disk (image-layout spec 1.0), and pushing them.

``podvisorctl image build`` writes one so the image can be inspected, copied
with any OCI tool (``skopeo copy oci:DIR:TAG ...``) or pushed by Podvisor's own
registry client. Only the CLI (and tests and benchmarks that build images)
uses this; the agent never writes layouts or pushes.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from agent.adapters.registry import RegistryClient
from agent.domain import oci
from agent.domain.imageref import RemoteRepository
from agent.render import containerdisk

REF_NAME = "org.opencontainers.image.ref.name"


def _blob_path(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / oci.digest_hex(digest)


def _write_blob(layout: Path, data: bytes) -> str:
    digest = oci.sha256_digest(data)
    path = _blob_path(layout, digest)
    if not path.exists():
        path.write_bytes(data)
    return digest


def build(disk: Path, layout: Path, tag: str, *, compress: bool = True) -> containerdisk.BuiltImage:
    """Write a one-disk containerDisk into ``layout`` under the name ``tag``."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    fd, tmp = tempfile.mkstemp(dir=blobs, prefix=".layer-")
    try:
        with open(disk, "rb") as src, os.fdopen(fd, "wb") as out:
            layer = containerdisk.write_layer(src, os.fstat(src.fileno()).st_size, disk.name, out,
                                              compress=compress)
        os.replace(tmp, _blob_path(layout, layer.digest))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    config = containerdisk.config_bytes([layer])
    _write_blob(layout, config)
    manifest = containerdisk.manifest_bytes(config, [layer])
    manifest_digest = _write_blob(layout, manifest)
    index_path = layout / "index.json"
    existing: list[dict[str, Any]] = (
        json.loads(index_path.read_text()).get("manifests", []) if index_path.exists() else []
    )
    entries = [m for m in existing if m.get("annotations", {}).get(REF_NAME) != tag]
    entries.append({"mediaType": oci.OCI_MANIFEST, "digest": manifest_digest, "size": len(manifest),
                    "annotations": {REF_NAME: tag}})
    index = {"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": entries}
    index_path.write_text(json.dumps(index, indent=2) + "\n")
    return containerdisk.BuiltImage(manifest, manifest_digest, config, (layer,))


def push(client: RegistryClient, layout: Path, image: containerdisk.BuiltImage, repo: RemoteRepository,
         reference: str) -> str:
    """Push blobs (skipping those the registry has) and then the manifest."""
    for layer in image.layers:
        client.push_blob(repo, _blob_path(layout, layer.digest), layer.digest)
    client.push_blob(repo, image.config)
    return client.push_manifest(repo, reference, image.manifest, oci.OCI_MANIFEST)
