"""Image records in the SQLite store: round trips, replace, delete, reopen."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.adapters.store import Store
from agent.domain.image import BaseDisk, Image


def full_image(image_id: str = "sha256:" + "a" * 64, created_at_ns: int = 1_700_000_000_000_000_001) -> Image:
    """An image with every field set to something other than a default."""
    return Image(
        id=image_id,
        manifest_digest="sha256:" + "b" * 64,
        repo_tags=("docker.io/kubevirt/cirros-container-disk-demo:v1.4", "docker.io/library/cirros:latest"),
        repo_digests=("docker.io/kubevirt/cirros-container-disk-demo@sha256:" + "c" * 64,),
        size=21_693_123,
        layers=("sha256:" + "1" * 64, "sha256:" + "2" * 64),
        config_media_type="application/vnd.docker.container.image.v1+json",
        user="107:107",
        disks=(
            BaseDisk(path_in_image="/disk/a.qcow2", file="disk0.qcow2", format="qcow2",
                     virtual_size=117_440_512, size=21_692_416),
            BaseDisk(path_in_image="/disk/b.raw", file="disk1.raw", format="raw",
                     virtual_size=1_048_576, size=1_048_576),
        ),
        created_at_ns=created_at_ns,
        disk_problem="2 files under /disk/; a containerDisk path must name one",
    )


def minimal_image(image_id: str, created_at_ns: int) -> Image:
    return Image(id=image_id, manifest_digest="sha256:" + "d" * 64, repo_tags=(), repo_digests=(), size=0,
                 layers=(), config_media_type="", user="", disks=(), created_at_ns=created_at_ns)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "podvisor.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    s = Store(db_path)
    yield s
    s.close()


def test_round_trip_of_every_field(store: Store) -> None:
    img = full_image()
    store.save_images([img])
    loaded = store.load_images()
    assert loaded == [img]
    assert isinstance(loaded[0].repo_tags, tuple)
    assert isinstance(loaded[0].disks, tuple)
    assert isinstance(loaded[0].disks[0], BaseDisk)


def test_round_trip_of_an_image_without_refs_or_disks(store: Store) -> None:
    img = minimal_image("sha256:" + "e" * 64, 5)
    store.save_images([img])
    assert store.load_images() == [img]


def test_empty_store_loads_nothing(store: Store) -> None:
    assert store.load_images() == []


def test_save_replaces_a_record_with_the_same_id(store: Store) -> None:
    img = full_image()
    store.save_images([img])
    moved = dataclasses.replace(img, repo_tags=("docker.io/library/cirros:latest",), disks=img.disks[:1],
                                disk_problem="")
    store.save_images([moved])
    assert store.load_images() == [moved]


def test_save_several_in_one_call(store: Store) -> None:
    a = full_image("sha256:" + "a" * 64, 10)
    b = full_image("sha256:" + "b" * 64, 20)
    store.save_images([b, a])
    assert store.load_images() == [a, b]


def test_load_orders_by_creation_time(store: Store) -> None:
    images = [minimal_image("sha256:" + c * 64, t) for c, t in (("1", 30), ("2", 10), ("3", 20))]
    for img in images:
        store.save_images([img])
    assert [i.created_at_ns for i in store.load_images()] == [10, 20, 30]


def test_delete_list_removes_records_in_the_same_call(store: Store) -> None:
    a = full_image("sha256:" + "a" * 64, 10)
    b = full_image("sha256:" + "b" * 64, 20)
    c = full_image("sha256:" + "c" * 64, 30)
    store.save_images([a, b])
    store.save_images([c], delete=(a.id, b.id))
    assert store.load_images() == [c]


def test_delete_list_of_unknown_ids_is_fine(store: Store) -> None:
    a = full_image()
    store.save_images([a], delete=("sha256:" + "f" * 64,))
    assert store.load_images() == [a]


def test_delete_list_naming_a_saved_image_keeps_the_new_record(store: Store) -> None:
    a = full_image()
    store.save_images([a])
    newer = dataclasses.replace(a, repo_tags=())
    store.save_images([newer], delete=(a.id,))
    assert store.load_images() == [newer]


def test_delete_image(store: Store) -> None:
    a = full_image("sha256:" + "a" * 64, 10)
    b = full_image("sha256:" + "b" * 64, 20)
    store.save_images([a, b])
    store.delete_image(a.id)
    assert store.load_images() == [b]
    store.delete_image(a.id)  # already gone: no error
    assert store.load_images() == [b]


def test_failed_save_changes_nothing(store: Store) -> None:
    a = full_image("sha256:" + "a" * 64, 10)
    store.save_images([a])
    unencodable = dataclasses.replace(full_image("sha256:" + "b" * 64, 20), size=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        store.save_images([unencodable], delete=(a.id,))
    assert store.load_images() == [a]


def test_records_survive_reopening(db_path: Path) -> None:
    a = full_image("sha256:" + "a" * 64, 10)
    b = full_image("sha256:" + "b" * 64, 20)
    first = Store(db_path)
    first.save_images([a, b])
    first.delete_image(a.id)
    first.close()

    second = Store(db_path)
    try:
        assert second.load_images() == [b]
    finally:
        second.close()


def test_commits_are_visible_to_another_connection(store: Store, db_path: Path) -> None:
    img = full_image()
    store.save_images([img])
    with sqlite3.connect(db_path) as other:
        rows = other.execute("SELECT id, created_at_ns, doc FROM images").fetchall()
    assert [(r[0], r[1]) for r in rows] == [(img.id, img.created_at_ns)]
    doc = json.loads(rows[0][2])
    assert "id" not in doc and "created_at_ns" not in doc
    assert doc["repo_tags"] == list(img.repo_tags)
    assert doc["disks"][0] == {"path_in_image": "/disk/a.qcow2", "file": "disk0.qcow2", "format": "qcow2",
                               "virtual_size": 117_440_512, "size": 21_692_416}


def test_record_written_before_disk_problem_existed_loads(store: Store, db_path: Path) -> None:
    img = full_image()
    doc = dataclasses.asdict(img)
    del doc["id"], doc["created_at_ns"], doc["disk_problem"]
    with sqlite3.connect(db_path) as other:
        other.execute("INSERT INTO images (id, created_at_ns, doc) VALUES (?, ?, ?)",
                      (img.id, img.created_at_ns, json.dumps(doc)))
    assert store.load_images() == [dataclasses.replace(img, disk_problem="")]


def test_sandboxes_and_images_live_side_by_side(store: Store) -> None:
    store.save_images([full_image()])
    assert store.load_sandboxes() == []
    assert len(store.load_images()) == 1
