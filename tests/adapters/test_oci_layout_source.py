"""LayoutSource: an OCI layout directory as the pull side of a registry (image import).

Real files in a temporary directory; the whole import through a real agent
is in tests/integration/test_image_import.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent.adapters.oci_layout_source import LayoutSource
from agent.cli import oci_layout
from agent.concurrency import BlobProgress
from agent.domain import oci
from agent.domain.errors import FailedPrecondition, InvalidArgument, NotFound
from agent.domain.imageref import parse_image_ref

REF = parse_image_ref("import.local/vms/x:1")


def layout_with(tmp_path: Path, *tags: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    disk = tmp_path / "disk.raw"
    disk.write_bytes(os.urandom(4096) * 4)
    layout = tmp_path / "layout"
    for tag in tags or ("1",):
        oci_layout.build(disk, layout, tag)
    return layout


def blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / oci.digest_hex(digest)


def test_resolves_the_named_manifest_and_copies_verified_blobs(tmp_path: Path) -> None:
    layout = layout_with(tmp_path, "1")
    source = LayoutSource(layout, "1")
    resolved = source.resolve(REF)
    assert resolved.ref == REF and resolved.digest == resolved.reference_digest
    assert oci.sha256_digest(resolved.manifest_bytes) == resolved.digest
    config = source.fetch_config(resolved.repository, resolved.manifest.config)
    assert oci.sha256_digest(config) == resolved.manifest.config.digest
    layer = resolved.manifest.layers[0]
    dest = tmp_path / "store" / "blob"
    dest.parent.mkdir()
    progress = BlobProgress()
    n = source.fetch_blob(resolved.repository, layer.digest, dest, expected_size=layer.size, progress=progress)
    assert n == layer.size and dest.read_bytes() == blob(layout, layer.digest).read_bytes()
    assert progress.done and progress.error is None and progress.written == layer.size


def test_one_unnamed_manifest_needs_no_name_several_do(tmp_path: Path) -> None:
    assert LayoutSource(layout_with(tmp_path / "a", "1")).resolve(REF).manifest.layers
    several = layout_with(tmp_path / "b", "1", "2")
    with pytest.raises(InvalidArgument) as err:
        LayoutSource(several).resolve(REF)
    assert err.value.field == "layout_ref"
    with pytest.raises(NotFound, match="no manifest named '3'"):
        LayoutSource(several, "3").resolve(REF)


def test_not_a_layout(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        LayoutSource(Path("relative/dir"))
    with pytest.raises(NotFound):
        LayoutSource(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidArgument):
        LayoutSource(tmp_path / "file")
    with pytest.raises(FailedPrecondition, match="oci-layout is missing"):
        LayoutSource(tmp_path)
    (tmp_path / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "2.0.0"}))
    with pytest.raises(FailedPrecondition, match="imageLayoutVersion"):
        LayoutSource(tmp_path)


def test_symbolic_links_are_refused(tmp_path: Path) -> None:
    layout = layout_with(tmp_path)
    resolved = LayoutSource(layout, "1").resolve(REF)
    layer = resolved.manifest.layers[0]
    outside = tmp_path / "outside"
    outside.write_bytes(blob(layout, layer.digest).read_bytes())
    blob(layout, layer.digest).unlink()
    blob(layout, layer.digest).symlink_to(outside)
    dest = tmp_path / "dest"
    with pytest.raises(FailedPrecondition, match="symbolic links are refused"):
        LayoutSource(layout, "1").fetch_blob(resolved.repository, layer.digest, dest, expected_size=layer.size)
    assert not dest.exists()
    # A linked directory on the way is refused too.
    (layout / "blobs").rename(tmp_path / "real-blobs")
    (layout / "blobs").symlink_to(tmp_path / "real-blobs")
    with pytest.raises(FailedPrecondition, match="symbolic links are refused"):
        LayoutSource(layout, "1").resolve(REF)


def test_a_tampered_blob_is_refused_and_not_kept(tmp_path: Path) -> None:
    layout = layout_with(tmp_path)
    source = LayoutSource(layout, "1")
    resolved = source.resolve(REF)
    layer = resolved.manifest.layers[0]
    data = bytearray(blob(layout, layer.digest).read_bytes())
    data[-1] ^= 1
    blob(layout, layer.digest).write_bytes(bytes(data))
    store = tmp_path / "store"
    store.mkdir()
    progress = BlobProgress()
    with pytest.raises(FailedPrecondition, match="hashes to"):
        source.fetch_blob(resolved.repository, layer.digest, store / "b", expected_size=layer.size,
                          progress=progress)
    assert list(store.iterdir()) == []
    assert isinstance(progress.error, FailedPrecondition)
    with pytest.raises(FailedPrecondition, match="descriptor"):
        source.fetch_blob(resolved.repository, layer.digest, store / "b", expected_size=layer.size - 10)
    assert list(store.iterdir()) == []


def test_a_manifest_that_does_not_match_the_index_is_refused(tmp_path: Path) -> None:
    layout = layout_with(tmp_path)
    index = json.loads((layout / "index.json").read_text())
    path = blob(layout, index["manifests"][0]["digest"])
    path.write_bytes(path.read_bytes() + b" ")
    with pytest.raises(FailedPrecondition, match="bytes, its descriptor says"):
        LayoutSource(layout, "1").resolve(REF)
