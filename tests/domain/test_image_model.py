"""agent.domain.image: how a client's image string names a stored image, and
which base disk a VM boots from."""

from __future__ import annotations

import dataclasses

import pytest

from agent.domain.errors import FailedPrecondition, InvalidArgument
from agent.domain.image import BaseDisk, Image, digest_ref, find, lookup_keys, tag_ref
from agent.domain.imageref import parse_image_ref

HEX_A = "a1b2c3d4e5f6" + "0" * 52
HEX_B = "b" * 64
ID_A = "sha256:" + HEX_A
ID_B = "sha256:" + HEX_B
MANIFEST_A = "sha256:" + "c" * 64
MANIFEST_B = "sha256:" + "d" * 64
INDEX_A = "sha256:" + "e" * 64

DISK = BaseDisk(path_in_image="/disk/cirros.qcow2", file="disk0.qcow2", format="qcow2",
                virtual_size=117440512, size=21692416)


def image(image_id: str = ID_A, tags: tuple[str, ...] = (), digests: tuple[str, ...] = (),
          disks: tuple[BaseDisk, ...] = (DISK,), problem: str = "") -> Image:
    return Image(
        id=image_id,
        manifest_digest=MANIFEST_A,
        repo_tags=tags,
        repo_digests=digests,
        size=21_693_000,
        layers=("sha256:" + "1" * 64, "sha256:" + "2" * 64),
        config_media_type="application/vnd.oci.image.config.v1+json",
        user="107",
        disks=disks,
        created_at_ns=1,
        disk_problem=problem,
    )


CIRROS = image(
    ID_A,
    tags=("docker.io/kubevirt/cirros-container-disk-demo:v1.4", "docker.io/library/cirros:latest"),
    digests=(f"docker.io/kubevirt/cirros-container-disk-demo@{INDEX_A}",),
)
LOCAL = image(
    ID_B,
    tags=("127.0.0.1:5000/vm/fedora:39",),
    digests=(f"127.0.0.1:5000/vm/fedora@{MANIFEST_B}",),
)
IMAGES = [CIRROS, LOCAL]


# lookup_keys ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (ID_A, (ID_A, [])),
        (HEX_A, (ID_A, [])),
        ("sha256:a1b2c3d4e5f6", ("sha256:a1b2c3d4e5f6", [])),
        ("sha256:" + HEX_A[:40], ("sha256:" + HEX_A[:40], [])),
        (f"  {ID_A}\n", (ID_A, [])),
        ("cirros", (None, ["docker.io/library/cirros:latest"])),
        ("cirros:0.6.2", (None, ["docker.io/library/cirros:0.6.2"])),
        ("library/cirros", (None, ["docker.io/library/cirros:latest"])),
        ("index.docker.io/library/cirros:1", (None, ["docker.io/library/cirros:1"])),
        ("kubevirt/cirros-container-disk-demo", (None, ["docker.io/kubevirt/cirros-container-disk-demo:latest"])),
        ("quay.io/containerdisks/fedora:39", (None, ["quay.io/containerdisks/fedora:39"])),
        ("127.0.0.1:5000/vm/fedora", (None, ["127.0.0.1:5000/vm/fedora:latest"])),
        ("localhost/disk", (None, ["localhost/disk:latest"])),
        (f"quay.io/x/y@{MANIFEST_B}", (None, [f"quay.io/x/y@{MANIFEST_B}"])),
        (f"cirros@{MANIFEST_B}", (None, [f"docker.io/library/cirros@{MANIFEST_B}"])),
        # tag and digest: the digest decides, as containerd does
        (f"quay.io/x/y:tag@{MANIFEST_B}", (None, [f"quay.io/x/y@{MANIFEST_B}"])),
        # 12 to 63 bare hex digits: a reference first, an id prefix as the fallback
        (HEX_A[:13], ("sha256:" + HEX_A[:13], [f"docker.io/library/{HEX_A[:13]}:latest"])),
        (HEX_A[:63], ("sha256:" + HEX_A[:63], [f"docker.io/library/{HEX_A[:63]}:latest"])),
        (HEX_A[:11], (None, [f"docker.io/library/{HEX_A[:11]}:latest"])),
    ],
)
def test_lookup_keys(text: str, expected: tuple[str | None, list[str]]) -> None:
    assert lookup_keys(text) == expected


@pytest.mark.parametrize("text", ["Cirros", "docker.io/UPPER", "a b", "quay.io/x/y:", "https://quay.io/x",
                                  "x@sha256:abc"])
def test_lookup_keys_of_a_malformed_reference(text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        lookup_keys(text)
    assert caught.value.field == "image.image"


def test_tag_ref_and_digest_ref() -> None:
    ref = parse_image_ref("cirros:0.6")
    assert tag_ref(ref) == "docker.io/library/cirros:0.6"
    assert digest_ref(ref, MANIFEST_B) == f"docker.io/library/cirros@{MANIFEST_B}"
    assert tag_ref(parse_image_ref(f"cirros:0.6@{MANIFEST_B}")) is None
    assert tag_ref(parse_image_ref(f"cirros@{MANIFEST_B}")) is None


# find -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (ID_A, CIRROS),
        (HEX_A, CIRROS),
        ("sha256:" + HEX_A[:12], CIRROS),
        ("sha256:" + HEX_A[:13], CIRROS),
        (ID_B, LOCAL),
        ("sha256:" + HEX_B[:20], LOCAL),
        ("docker.io/kubevirt/cirros-container-disk-demo:v1.4", CIRROS),
        ("kubevirt/cirros-container-disk-demo:v1.4", CIRROS),
        ("cirros", CIRROS),
        ("cirros:latest", CIRROS),
        ("docker.io/cirros", CIRROS),
        (f"kubevirt/cirros-container-disk-demo@{INDEX_A}", CIRROS),
        (f"docker.io/kubevirt/cirros-container-disk-demo:any@{INDEX_A}", CIRROS),
        ("127.0.0.1:5000/vm/fedora:39", LOCAL),
        (f"127.0.0.1:5000/vm/fedora@{MANIFEST_B}", LOCAL),
    ],
)
def test_find(text: str, expected: Image) -> None:
    assert find(IMAGES, text) is expected


@pytest.mark.parametrize(
    "text",
    [
        "sha256:" + "f" * 64,                      # unknown id
        "sha256:" + HEX_A[1:13],                   # not a prefix
        "sha256:a1b2c3d4e5f",                      # 11 hex digits: too short to be an id prefix
        "cirros:0.6",                              # other tag
        "kubevirt/cirros-container-disk-demo",     # :latest is not stored
        "127.0.0.1:5000/vm/fedora",
        "127.0.0.1:5001/vm/fedora:39",             # other registry
        f"quay.io/kubevirt/cirros-container-disk-demo@{INDEX_A}",  # digest under another name
        f"127.0.0.1:5000/vm/fedora@{INDEX_A}",     # digest of another image
        f"docker.io/kubevirt/cirros-container-disk-demo@{MANIFEST_A}",  # manifest digest never stored as a ref
    ],
)
def test_find_nothing(text: str) -> None:
    assert find(IMAGES, text) is None


def test_find_in_no_images() -> None:
    assert find([], "cirros") is None
    assert find([], ID_A) is None


def test_find_tag_that_moved_to_another_image() -> None:
    old = dataclasses.replace(LOCAL, repo_tags=())
    new = image("sha256:" + "9" * 64, tags=("127.0.0.1:5000/vm/fedora:39",))
    assert find([old, new], "127.0.0.1:5000/vm/fedora:39") is new
    assert find([old, new], f"127.0.0.1:5000/vm/fedora@{MANIFEST_B}") is old


@pytest.mark.parametrize("length", [12, 13, 40])
def test_find_by_bare_short_id_as_crictl_prints_it(length: int) -> None:
    assert find(IMAGES, HEX_A[:length]) is CIRROS


def test_ambiguous_id_prefix_is_not_a_guess() -> None:
    one = image("sha256:" + "abcdef012345" + "1" * 52)
    two = image("sha256:" + "abcdef012345" + "2" * 52)
    with pytest.raises(InvalidArgument, match="ambiguous"):
        find([one, two], "sha256:abcdef012345")
    with pytest.raises(InvalidArgument) as caught:
        find([one, two], "abcdef012345")
    assert caught.value.field == "image.image"
    assert caught.value.message == "image.image: 'abcdef012345' is an ambiguous image id prefix"
    assert find([one, two], "sha256:abcdef0123452") is two


def test_a_reference_that_looks_like_an_id_prefix_wins() -> None:
    named = image(ID_B, tags=(f"docker.io/library/{HEX_A[:13]}:latest",))
    assert find([CIRROS, named], HEX_A[:13]) is named
    assert find([CIRROS, named], "sha256:" + HEX_A[:13]) is CIRROS


# disk_for -----------------------------------------------------------------------


def _disk(name: str, i: int) -> BaseDisk:
    return BaseDisk(path_in_image=f"/disk/{name}", file=f"disk{i}.raw", format="raw", virtual_size=1024, size=1024)


TWO_DISKS = image(tags=("docker.io/x/two:1",), disks=(_disk("a.img", 0), _disk("sub/b.img", 1)),
                  problem="2 files under /disk/; a containerDisk path must name one")


@pytest.mark.parametrize("wanted", [None, "", "/disk/cirros.qcow2", "disk/cirros.qcow2", "cirros.qcow2",
                                    "/cirros.qcow2"])
def test_disk_for_one_disk(wanted: str | None) -> None:
    assert CIRROS.disk_for(wanted) is DISK


@pytest.mark.parametrize(("wanted", "index"), [("/disk/a.img", 0), ("a.img", 0), ("disk/sub/b.img", 1),
                                               ("sub/b.img", 1), ("/sub/b.img", 1)])
def test_disk_for_named_path(wanted: str, index: int) -> None:
    assert TWO_DISKS.disk_for(wanted) is TWO_DISKS.disks[index]


def test_disk_for_several_without_a_path() -> None:
    with pytest.raises(FailedPrecondition) as caught:
        TWO_DISKS.disk_for(None)
    assert caught.value.message == (
        "image docker.io/x/two:1 has 2 files under /disk/ (/disk/a.img, /disk/sub/b.img); "
        "name one with the containerDisk path"
    )


@pytest.mark.parametrize(("wanted", "key"), [("/disk/c.img", "/disk/c.img"), ("b.img", "/disk/b.img"),
                                             ("/disk/sub", "/disk/sub"), ("disk", "/disk/disk")])
def test_disk_for_missing_path(wanted: str, key: str) -> None:
    with pytest.raises(FailedPrecondition) as caught:
        TWO_DISKS.disk_for(wanted)
    assert caught.value.message == (
        f"image docker.io/x/two:1 has no disk {key} (disks: /disk/a.img, /disk/sub/b.img)"
    )


def test_disk_for_without_disks_gives_the_recorded_problem() -> None:
    img = image(tags=("docker.io/x/empty:1",), disks=(), problem="/disk/a.img is a symlink, not a regular file")
    with pytest.raises(FailedPrecondition) as caught:
        img.disk_for(None)
    assert caught.value.message == (
        "image docker.io/x/empty:1 is not a containerDisk: /disk/a.img is a symlink, not a regular file"
    )
    with pytest.raises(FailedPrecondition) as caught:
        img.disk_for("a.img")
    assert caught.value.message == "image docker.io/x/empty:1 has no disk /disk/a.img (disks: none)"


def test_disk_for_one_disk_beside_an_entry_that_is_not_a_file() -> None:
    # A symlink under /disk/ counts as a file (as in choose_disk): "exactly one" fails.
    img = image(tags=("docker.io/x/link:1",), disks=(_disk("a.img", 0),),
                problem="/disk/b.img is a symlink, not a regular file; 2 files under /disk/; "
                        "a containerDisk path must name one")
    with pytest.raises(FailedPrecondition) as caught:
        img.disk_for(None)
    assert caught.value.message == (
        "image docker.io/x/link:1 holds more than /disk/a.img under /disk/ (/disk/b.img is a symlink, "
        "not a regular file; 2 files under /disk/; a containerDisk path must name one); "
        "name the disk with the containerDisk path"
    )
    assert img.disk_for("a.img") is img.disks[0]
    with pytest.raises(FailedPrecondition, match="has no disk /disk/b.img"):
        img.disk_for("b.img")


def test_disk_for_without_disks_or_problem() -> None:
    with pytest.raises(FailedPrecondition) as caught:
        image(tags=("docker.io/x/empty:1",), disks=()).disk_for(None)
    assert caught.value.message == "image docker.io/x/empty:1 is not a containerDisk: no file under /disk/"


# name and blobs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tags", "digests", "name"),
    [
        (("docker.io/a/b:1", "docker.io/a/b:2"), (f"docker.io/a/b@{MANIFEST_B}",), "docker.io/a/b:1"),
        ((), (f"docker.io/a/b@{MANIFEST_B}",), f"docker.io/a/b@{MANIFEST_B}"),
        ((), (), ID_A),
    ],
)
def test_name(tags: tuple[str, ...], digests: tuple[str, ...], name: str) -> None:
    assert image(tags=tags, digests=digests).name == name


def test_blobs_are_manifest_config_and_layers() -> None:
    assert CIRROS.blobs == (MANIFEST_A, ID_A, "sha256:" + "1" * 64, "sha256:" + "2" * 64)
