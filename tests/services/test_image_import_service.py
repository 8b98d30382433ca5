"""ImageService.import_layout: an OCI layout through the pull pipeline.

The layout is read by the real ``LayoutSource`` adapter (files in a
temporary directory); the registry is the pull tests' fake, which an import
must never call.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.adapters.oci_layout_source import LayoutSource
from agent.cli import oci_layout
from agent.domain import oci
from agent.domain.errors import FailedPrecondition, InvalidArgument, NotFound
from agent.services.images import ImageService
from tests.services.test_image_service import MAX_VIRTUAL_SIZE, Env, make_env, qcow2_bytes


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = make_env(tmp_path / "state")
    ports = dataclasses.replace(e.service._ports, open_layout=LayoutSource)  # noqa: SLF001
    e.service = ImageService(ports, max_virtual_size=MAX_VIRTUAL_SIZE)
    yield e
    e.store.close()


def make_layout(tmp_path: Path, content: bytes = b"guest") -> Path:
    disk = tmp_path / "guest.qcow2"
    disk.write_bytes(qcow2_bytes(content))
    layout = tmp_path / "layout"
    oci_layout.build(disk, layout, "1")
    return layout


def test_import_records_the_image_under_the_given_reference(env: Env, tmp_path: Path) -> None:
    img = env.service.import_layout(str(make_layout(tmp_path)), "1", "import.local/vms/guest:1")
    assert img.repo_tags == ("import.local/vms/guest:1",)
    assert env.service.list_images() == [img]
    assert env.disk_bytes(img) == qcow2_bytes(b"guest")
    assert img.disks[0].path_in_image == "/disk/guest.qcow2"
    assert env.registry.calls == []  # the registry is never asked
    assert env.tmp_entries() == []
    # Again under another name: the same image, one more reference, nothing copied.
    again = env.service.import_layout(str(tmp_path / "layout"), "", "import.local/vms/other:2")
    assert again.id == img.id
    assert set(again.repo_tags) == {"import.local/vms/guest:1", "import.local/vms/other:2"}


def test_a_tampered_layer_leaves_nothing(env: Env, tmp_path: Path) -> None:
    layout = make_layout(tmp_path)
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((layout / "blobs" / "sha256" / oci.digest_hex(index["manifests"][0]["digest"]))
                          .read_text())
    layer = layout / "blobs" / "sha256" / oci.digest_hex(manifest["layers"][0]["digest"])
    data = bytearray(layer.read_bytes())
    data[10] ^= 0xFF
    layer.write_bytes(bytes(data))
    with pytest.raises(FailedPrecondition, match="hashes to"):
        env.service.import_layout(str(layout), "1", "import.local/vms/guest:1")
    assert env.service.list_images() == []
    assert env.tmp_entries() == [] and env.disk_dirs() == [] and env.partial_blobs() == []


def test_requests_are_checked_first(env: Env, tmp_path: Path) -> None:
    layout = str(make_layout(tmp_path))
    with pytest.raises(InvalidArgument) as err:
        env.service.import_layout(layout, "1", "")
    assert err.value.field == "image"
    with pytest.raises(InvalidArgument) as err:
        env.service.import_layout(layout, "1", "Not A Reference")
    assert err.value.field == "image"
    with pytest.raises(InvalidArgument) as err:
        env.service.import_layout("", "1", "import.local/a:1")
    assert err.value.field == "layout_path"
    with pytest.raises(NotFound):
        env.service.import_layout(str(tmp_path / "nowhere"), "", "import.local/a:1")
    assert env.service.list_images() == []


def test_an_agent_without_a_layout_reader_refuses(tmp_path: Path) -> None:
    e = make_env(tmp_path)
    try:
        with pytest.raises(FailedPrecondition, match="cannot import"):
            e.service.import_layout(str(tmp_path), "", "import.local/a:1")
    finally:
        e.store.close()
