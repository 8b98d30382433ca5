"""DiskExtractor and choose_disk over real tar streams built in memory.

Every layer here is a genuine tar archive (PAX format, as image builders
write), compressed with gzip, zstd or not at all, fed to the extractor the way
the image service does: bottom layer first.
"""

from __future__ import annotations

import gzip
import io
import os
import random
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from agent.adapters.layers import DEFAULT_MAX_FILE_BYTES, DiskExtractor, choose_disk, normalise_entry
from agent.domain.errors import FailedPrecondition
from agent.domain.image import DiskFile
from agent.domain.oci import Compression, sha256_digest

L1 = "sha256:" + "1" * 64
L2 = "sha256:" + "2" * 64
L3 = "sha256:" + "3" * 64
IMAGE = "docker.io/kubevirt/test:v1"
MiB = 1 << 20


# Building layers ------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One tar entry: a regular file (data), directory, symlink, hard link, fifo or device."""

    name: str
    kind: str = "file"
    data: bytes = b""
    target: str = ""


def file(name: str, data: bytes) -> Entry:
    return Entry(name, "file", data)


def directory(name: str) -> Entry:
    return Entry(name, "dir")


def symlink(name: str, target: str) -> Entry:
    return Entry(name, "symlink", target=target)


def hardlink(name: str, target: str) -> Entry:
    return Entry(name, "hardlink", target=target)


_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "chardev": tarfile.CHRTYPE,
    "blockdev": tarfile.BLKTYPE,
}


def tar_bytes(entries: Sequence[Entry]) -> bytes:
    """An uncompressed tar archive holding ``entries`` in the given order."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.type = _TYPES[entry.kind]
            info.uid = info.gid = 107
            info.mtime = 0
            if entry.kind == "file":
                info.size = len(entry.data)
                info.mode = 0o444
                tar.addfile(info, io.BytesIO(entry.data))
            else:
                info.linkname = entry.target
                info.mode = 0o755 if entry.kind == "dir" else 0o777
                tar.addfile(info)
    return raw.getvalue()


def compress(data: bytes, compression: Compression) -> bytes:
    if compression is Compression.GZIP:
        return gzip.compress(data, mtime=0)
    if compression is Compression.ZSTD:
        return zstandard.ZstdCompressor().compress(data)
    return data


def layer(entries: Sequence[Entry], compression: Compression = Compression.GZIP) -> bytes:
    return compress(tar_bytes(entries), compression)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.fixture
def extractor(workdir: Path) -> DiskExtractor:
    # The layering rules (whiteouts, hiding) are tested on images with several
    # files under disk/; the one-disk rule that pulls apply has its own tests.
    return DiskExtractor(workdir, IMAGE, one_disk=False)


def add(extractor: DiskExtractor, entries: Sequence[Entry], digest: str,
        compression: Compression = Compression.GZIP) -> None:
    extractor.add_layer(io.BytesIO(layer(entries, compression)), compression, digest)


def contents(disks: dict[str, DiskFile]) -> dict[str, bytes]:
    """"/disk/x" → extracted bytes, for the regular files among ``disks``."""
    return {key: f.temp.read_bytes() for key, f in disks.items() if f.temp is not None}


def temp_files(workdir: Path) -> list[str]:
    return sorted(p.name for p in workdir.iterdir())


# One layer -------------------------------------------------------------------


@pytest.mark.parametrize("compression", list(Compression), ids=lambda c: c.value)
def test_single_disk_in_each_compression(extractor: DiskExtractor, workdir: Path,
                                         compression: Compression) -> None:
    payload = random.Random(7).randbytes(3 * MiB + 123)
    add(extractor, [directory("disk"), file("disk/cirros.qcow2", payload)], L1, compression)

    disks = extractor.disks()
    assert list(disks) == ["/disk/cirros.qcow2"]
    f = disks["/disk/cirros.qcow2"]
    assert (f.path, f.layer, f.kind, f.size) == ("disk/cirros.qcow2", L1, "file", len(payload))
    assert f.temp is not None
    assert f.temp.parent == workdir
    assert f.temp.name.startswith("disk-")
    assert f.temp.read_bytes() == payload
    assert temp_files(workdir) == [f.temp.name]


def test_empty_file_under_disk_is_a_file_of_size_zero(extractor: DiskExtractor) -> None:
    add(extractor, [file("disk/empty.img", b"")], L1)
    f = extractor.disks()["/disk/empty.img"]
    assert (f.kind, f.size) == ("file", 0)
    assert f.temp is not None and f.temp.read_bytes() == b""


@pytest.mark.parametrize(
    "name",
    ["disk/a.img", "./disk/a.img", "disk//a.img", "disk/./a.img", "./disk/./a.img"],
)
def test_entry_names_are_normalised(extractor: DiskExtractor, name: str) -> None:
    add(extractor, [file(name, b"A")], L1)
    assert contents(extractor.disks()) == {"/disk/a.img": b"A"}
    assert extractor.disks()["/disk/a.img"].path == "disk/a.img"


def test_files_outside_disk_are_ignored(extractor: DiskExtractor, workdir: Path) -> None:
    add(extractor, [
        directory("etc"),
        file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
        file("disk.img", b"top-level file named like a disk"),
        file("diskette/a.img", b"a directory whose name only starts with disk"),
        file("var/disk/a.img", b"a disk directory that is not at the root"),
        directory("disk"),  # the directory itself is not a file
        directory("disk/sub"),
    ], L1)
    assert extractor.disks() == {}
    assert temp_files(workdir) == []


def test_files_in_subdirectories_of_disk_count(extractor: DiskExtractor) -> None:
    add(extractor, [file("disk/sub/a.img", b"A")], L1)
    assert contents(extractor.disks()) == {"/disk/sub/a.img": b"A"}


def test_the_same_path_twice_in_one_layer_keeps_the_last(extractor: DiskExtractor, workdir: Path) -> None:
    add(extractor, [file("disk/a.img", b"first"), file("disk/a.img", b"second")], L1)
    assert contents(extractor.disks()) == {"/disk/a.img": b"second"}
    assert len(temp_files(workdir)) == 1


def test_disks_are_listed_sorted(extractor: DiskExtractor) -> None:
    add(extractor, [file("disk/c.img", b"C"), file("disk/a.img", b"A"), file("disk/b.img", b"B")], L1)
    assert list(extractor.disks()) == ["/disk/a.img", "/disk/b.img", "/disk/c.img"]


# Several layers ------------------------------------------------------------


@pytest.mark.parametrize("compression", list(Compression), ids=lambda c: c.value)
def test_upper_layer_replaces_the_disk(extractor: DiskExtractor, workdir: Path,
                                       compression: Compression) -> None:
    add(extractor, [file("disk/a.img", b"lower" * 1000)], L1, compression)
    lower_temp = extractor.disks()["/disk/a.img"].temp
    add(extractor, [file("disk/a.img", b"upper")], L2, compression)

    f = extractor.disks()["/disk/a.img"]
    assert (f.layer, f.size) == (L2, 5)
    assert contents(extractor.disks()) == {"/disk/a.img": b"upper"}
    assert lower_temp is not None and not lower_temp.exists()
    assert len(temp_files(workdir)) == 1


def test_upper_layer_adds_a_second_disk(extractor: DiskExtractor) -> None:
    add(extractor, [file("disk/a.img", b"A")], L1)
    add(extractor, [file("disk/b.img", b"B")], L2)
    assert contents(extractor.disks()) == {"/disk/a.img": b"A", "/disk/b.img": b"B"}
    assert [f.layer for f in extractor.disks().values()] == [L1, L2]


def test_whiteout_removes_a_lower_disk(extractor: DiskExtractor, workdir: Path) -> None:
    add(extractor, [file("disk/a.img", b"A"), file("disk/b.img", b"B")], L1)
    a_temp = extractor.disks()["/disk/a.img"].temp
    add(extractor, [file("disk/.wh.a.img", b"")], L2)

    assert contents(extractor.disks()) == {"/disk/b.img": b"B"}
    assert a_temp is not None and not a_temp.exists()
    assert len(temp_files(workdir)) == 1


def test_whiteout_of_the_disk_directory_removes_every_disk(extractor: DiskExtractor, workdir: Path) -> None:
    add(extractor, [file("disk/a.img", b"A"), file("disk/sub/b.img", b"B")], L1)
    add(extractor, [file(".wh.disk", b"")], L2)
    assert extractor.disks() == {}
    assert temp_files(workdir) == []


def test_whiteout_of_a_subdirectory_removes_only_it(extractor: DiskExtractor) -> None:
    add(extractor, [file("disk/a.img", b"A"), file("disk/sub/b.img", b"B"), file("disk/subx.img", b"X")], L1)
    add(extractor, [file("disk/.wh.sub", b"")], L2)
    assert contents(extractor.disks()) == {"/disk/a.img": b"A", "/disk/subx.img": b"X"}


def test_whiteout_applies_to_lower_layers_only(extractor: DiskExtractor) -> None:
    # OCI image spec: a whiteout hides lower content, never its own layer's.
    add(extractor, [file("disk/a.img", b"old")], L1)
    add(extractor, [file("disk/a.img", b"new"), file("disk/.wh.a.img", b"")], L2)
    assert contents(extractor.disks()) == {"/disk/a.img": b"new"}


def test_whiteout_of_something_absent_changes_nothing(extractor: DiskExtractor) -> None:
    add(extractor, [file("disk/a.img", b"A")], L1)
    add(extractor, [file("disk/.wh.nothing.img", b""), file("etc/.wh.passwd", b"")], L2)
    assert contents(extractor.disks()) == {"/disk/a.img": b"A"}


def test_whiteout_is_never_itself_a_disk(extractor: DiskExtractor) -> None:
    add(extractor, [file("disk/.wh.a.img", b""), file("disk/.wh..wh..opq", b"")], L1)
    assert extractor.disks() == {}


@pytest.mark.parametrize("opaque_first", [True, False], ids=["opaque-first", "opaque-last"])
def test_opaque_whiteout_removes_lower_files_but_not_its_own_layers(
    extractor: DiskExtractor, workdir: Path, opaque_first: bool,
) -> None:
    add(extractor, [file("disk/a.img", b"A"), file("disk/sub/b.img", b"B")], L1)
    opaque = file("disk/.wh..wh..opq", b"")
    new = file("disk/c.img", b"C")
    add(extractor, [opaque, new] if opaque_first else [new, opaque], L2)

    assert contents(extractor.disks()) == {"/disk/c.img": b"C"}
    assert extractor.disks()["/disk/c.img"].layer == L2
    assert len(temp_files(workdir)) == 1


def test_opaque_whiteout_in_another_directory_leaves_disk_alone(extractor: DiskExtractor) -> None:
    add(extractor, [file("disk/a.img", b"A")], L1)
    add(extractor, [file("etc/.wh..wh..opq", b""), file("diskx/.wh..wh..opq", b"")], L2)
    assert contents(extractor.disks()) == {"/disk/a.img": b"A"}


def test_three_layers_add_remove_and_add_again(extractor: DiskExtractor, workdir: Path) -> None:
    add(extractor, [file("disk/a.img", b"v1")], L1, Compression.ZSTD)
    add(extractor, [file("disk/.wh.a.img", b"")], L2, Compression.NONE)
    assert extractor.disks() == {}
    add(extractor, [file("disk/a.img", b"v3")], L3, Compression.GZIP)
    assert contents(extractor.disks()) == {"/disk/a.img": b"v3"}
    assert extractor.disks()["/disk/a.img"].layer == L3
    assert len(temp_files(workdir)) == 1


@pytest.mark.parametrize("upper", [directory("disk/a.img"), file("disk", b"not a directory any more")],
                         ids=["dir-over-file", "file-over-disk-dir"])
def test_entry_of_another_type_replaces_the_lower_one(extractor: DiskExtractor, upper: Entry) -> None:
    add(extractor, [file("disk/a.img", b"A")], L1)
    add(extractor, [upper], L2)
    assert extractor.disks() == {}


def test_symlink_named_disk_hides_every_lower_disk(extractor: DiskExtractor, workdir: Path) -> None:
    add(extractor, [file("disk/a.img", b"A"), file("disk/sub/b.img", b"B")], L1)
    add(extractor, [symlink("disk", "elsewhere")], L2)
    assert extractor.disks() == {}
    assert temp_files(workdir) == []


def test_directory_over_a_lower_directory_keeps_its_files(extractor: DiskExtractor) -> None:
    add(extractor, [file("disk/sub/a.img", b"A")], L1)
    add(extractor, [directory("disk"), directory("disk/sub")], L2)
    assert contents(extractor.disks()) == {"/disk/sub/a.img": b"A"}


# diff_id and size limit ---------------------------------------------------------


@pytest.mark.parametrize("compression", list(Compression), ids=lambda c: c.value)
def test_add_layer_returns_the_digest_of_the_uncompressed_tar(extractor: DiskExtractor,
                                                             compression: Compression) -> None:
    entries = [directory("etc"), file("etc/motd", b"hi\n"), file("disk/a.img", b"A" * 5000)]
    tar = tar_bytes(entries)
    diff_id = extractor.add_layer(io.BytesIO(compress(tar, compression)), compression, L1)
    assert diff_id == sha256_digest(tar)


def test_diff_id_of_a_layer_without_disks_covers_it_all(extractor: DiskExtractor) -> None:
    tar = tar_bytes([file("etc/motd", b"hi\n")]) + bytes(64 << 10)  # extra zero blocks after the end
    assert extractor.add_layer(io.BytesIO(gzip.compress(tar)), Compression.GZIP, L1) == sha256_digest(tar)


def test_file_over_the_size_limit_is_refused_before_it_is_written(workdir: Path) -> None:
    extractor = DiskExtractor(workdir, IMAGE, max_file_bytes=1000, max_total_bytes=10_000, one_disk=False)
    add(extractor, [file("disk/keep.img", b"K" * 1000)], L1)  # at the limit: fine
    with pytest.raises(FailedPrecondition) as caught:
        add(extractor, [file("disk/a.img", b"a"), file("disk/big.img", b"B" * 1001)], L2)
    assert caught.value.message == (
        f"image {IMAGE}: /disk/big.img in layer {L2} is 1001 bytes, more than the 1000 a disk file may have"
    )
    assert list(extractor.disks()) == ["/disk/keep.img"]
    assert len(temp_files(workdir)) == 1  # the first layer's file; nothing of the refused layer


def test_default_size_limit_is_a_tebibyte_plus_qcow2_metadata(workdir: Path) -> None:
    assert DiskExtractor(workdir, IMAGE).max_file_bytes == DEFAULT_MAX_FILE_BYTES == (1 << 40) + (64 << 20)


# Unsafe entries ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("/disk/a.img", "absolute path"),
        ("/etc/passwd", "absolute path"),
        ("../disk/a.img", "'..' leaves the image root"),
        ("disk/../../etc/shadow", "'..' leaves the image root"),
        ("disk/../a.img", "'..' leaves the image root"),
        ("./..", "'..' leaves the image root"),
    ],
)
def test_unsafe_entry_names_make_the_image_unusable(extractor: DiskExtractor, workdir: Path,
                                                    name: str, why: str) -> None:
    add(extractor, [file("disk/keep.img", b"K")], L1)
    with pytest.raises(FailedPrecondition) as caught:
        # A good file before the bad entry: its temp file must go too.
        add(extractor, [file("disk/new.img", b"N"), file(name, b"x")], L2)
    assert caught.value.message == f"layer {L2}: unsafe tar entry {name!r} ({why})"
    # The failed layer left nothing; what lower layers gave is untouched.
    assert contents(extractor.disks()) == {"/disk/keep.img": b"K"}
    assert len(temp_files(workdir)) == 1


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("disk/a.img", "disk/a.img"),
        ("./disk/a.img", "disk/a.img"),
        ("disk/", "disk"),
        (".", ""),
        ("a//b/./c", "a/b/c"),
        ("disk/..a.img", "disk/..a.img"),  # only a whole '..' component climbs
        ("disk/a..", "disk/a.."),
    ],
)
def test_normalise_entry(name: str, expected: str) -> None:
    assert normalise_entry(name, L1) == expected


@pytest.mark.parametrize("name", ["/", "/disk", "..", "a/../..", "a/b/../../../c"])
def test_normalise_entry_refuses(name: str) -> None:
    with pytest.raises(FailedPrecondition, match=f"layer {L1}: unsafe tar entry"):
        normalise_entry(name, L1)


# Links and special files -----------------------------------------------------


def test_symlink_under_disk_is_recorded_and_refused_as_the_disk(extractor: DiskExtractor,
                                                                workdir: Path) -> None:
    add(extractor, [symlink("disk/a.img", "/etc/shadow")], L1)
    assert extractor.disks() == {"/disk/a.img": DiskFile("disk/a.img", L1, None, "symlink", 0)}
    assert temp_files(workdir) == []
    with pytest.raises(FailedPrecondition) as caught:
        choose_disk(extractor.disks(), IMAGE, None)
    assert caught.value.message == f"image {IMAGE}: /disk/a.img is a symlink, not a regular file"


def test_symlink_under_disk_pointing_at_a_sibling_is_still_refused(extractor: DiskExtractor) -> None:
    add(extractor, [file("disk/real.img", b"R"), symlink("disk/link.img", "real.img")], L1)
    assert extractor.disks()["/disk/link.img"].kind == "symlink"
    with pytest.raises(FailedPrecondition, match="/disk/link.img is a symlink, not a regular file"):
        choose_disk(extractor.disks(), IMAGE, "/disk/link.img")
    assert choose_disk(extractor.disks(), IMAGE, "real.img").temp is not None


@pytest.mark.parametrize(
    ("name", "target"),
    [
        ("etc/evil", "../../outside"),
        ("evil", "../x"),
        ("evil", ".."),
        ("a/b/c", "../../../etc/shadow"),
        ("a/b", "./../../x"),
        ("disk/a.img", "../../etc/shadow"),
    ],
)
def test_symlink_climbing_out_of_the_root_is_refused(extractor: DiskExtractor, workdir: Path,
                                                     name: str, target: str) -> None:
    with pytest.raises(FailedPrecondition) as caught:
        add(extractor, [file("disk/a0.img", b"A"), symlink(name, target)], L1)
    assert caught.value.message == (
        f"layer {L1}: unsafe symlink {name!r} -> {target!r} (leaves the image root)"
    )
    assert extractor.disks() == {}
    assert temp_files(workdir) == []


@pytest.mark.parametrize(
    ("name", "target"),
    [
        ("etc/localtime", "/usr/share/zoneinfo/UTC"),  # absolute: resolves inside the image root
        ("bin", "/../../../usr/bin"),
        ("a/b/c", "../../x"),  # stays inside
        ("usr/lib64", "lib"),
    ],
)
def test_symlink_elsewhere_that_stays_inside_is_accepted(extractor: DiskExtractor, workdir: Path,
                                                         name: str, target: str) -> None:
    add(extractor, [symlink(name, target), file("disk/a.img", b"A")], L1)
    assert contents(extractor.disks()) == {"/disk/a.img": b"A"}


def test_hard_link_under_disk_is_refused_when_chosen(extractor: DiskExtractor, workdir: Path) -> None:
    add(extractor, [file("disk/a.img", b"A"), hardlink("disk/b.img", "disk/a.img")], L1)
    disks = extractor.disks()
    assert disks["/disk/b.img"] == DiskFile("disk/b.img", L1, None, "hard link", 0)
    assert len(temp_files(workdir)) == 1
    with pytest.raises(FailedPrecondition) as caught:
        choose_disk(disks, IMAGE, "disk/b.img")
    assert caught.value.message == f"image {IMAGE}: /disk/b.img is a hard link, not a regular file"
    # Without a path the image has two entries under /disk/: that is the error.
    with pytest.raises(FailedPrecondition, match="has 2 files under /disk/"):
        choose_disk(disks, IMAGE, None)


@pytest.mark.parametrize("target", ["/etc/shadow", "../etc/shadow", "disk/../../etc/shadow"])
def test_hard_link_to_outside_the_image_is_refused(extractor: DiskExtractor, target: str) -> None:
    with pytest.raises(FailedPrecondition, match=f"unsafe tar entry {target!r}"):
        add(extractor, [hardlink("disk/a.img", target)], L1)


@pytest.mark.parametrize(("kind", "recorded"), [("fifo", "fifo"), ("chardev", "device"),
                                                 ("blockdev", "device")])
def test_special_files_under_disk_are_recorded_not_extracted(extractor: DiskExtractor, workdir: Path,
                                                             kind: str, recorded: str) -> None:
    add(extractor, [Entry("disk/a.img", kind)], L1)
    assert extractor.disks() == {"/disk/a.img": DiskFile("disk/a.img", L1, None, recorded, 0)}
    assert temp_files(workdir) == []
    with pytest.raises(FailedPrecondition, match=f"/disk/a.img is a {recorded}, not a regular file"):
        choose_disk(extractor.disks(), IMAGE, None)


def test_regular_file_replacing_a_lower_symlink(extractor: DiskExtractor) -> None:
    add(extractor, [symlink("disk/a.img", "/etc/shadow")], L1)
    add(extractor, [file("disk/a.img", b"real")], L2)
    chosen = choose_disk(extractor.disks(), IMAGE, None)
    assert (chosen.kind, chosen.layer) == ("file", L2)
    assert chosen.temp is not None and chosen.temp.read_bytes() == b"real"


# Broken streams ----------------------------------------------------------------


def _big_layer(compression: Compression) -> bytes:
    rnd = random.Random(3)
    return layer([file("disk/a.img", rnd.randbytes(2 * MiB)), file("disk/b.img", b"B" * 1000)], compression)


@pytest.mark.parametrize(
    ("compression", "mangle"),
    [
        (Compression.GZIP, lambda b: b[: len(b) // 2]),
        (Compression.GZIP, lambda b: b"this is not gzip at all" * 10),
        (Compression.GZIP, lambda b: b""),
        (Compression.ZSTD, lambda b: b[: len(b) // 2]),
        (Compression.NONE, lambda b: b[: 700_000]),
        (Compression.NONE, lambda b: b"\x00" * 100 + b"x" * 412),  # no tar header
    ],
    ids=["gzip-half", "not-gzip", "gzip-empty", "zstd-half", "tar-half", "tar-garbage"],
)
def test_broken_stream_is_refused_and_leaves_no_temp_files(extractor: DiskExtractor, workdir: Path,
                                                           compression: Compression, mangle: object) -> None:
    add(extractor, [file("disk/lower.img", b"L")], L1)
    blob = mangle(_big_layer(compression))  # type: ignore[operator]
    with pytest.raises(FailedPrecondition) as caught:
        extractor.add_layer(io.BytesIO(blob), compression, L2)
    assert caught.value.message.startswith(f"image {IMAGE}: layer {L2} is not a valid tar stream: ")
    assert contents(extractor.disks()) == {"/disk/lower.img": b"L"}
    assert len(temp_files(workdir)) == 1
    extractor.discard()
    assert temp_files(workdir) == []


def test_zstd_garbage_is_failed_precondition(extractor: DiskExtractor, workdir: Path) -> None:
    blob = random.Random(5).randbytes(4096)
    with pytest.raises(FailedPrecondition, match=f"layer {L1} is not a valid tar stream"):
        extractor.add_layer(io.BytesIO(blob), Compression.ZSTD, L1)
    assert temp_files(workdir) == []


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x55]) + data[at + 1:]


def _text_layer(compression: Compression) -> bytes:
    rnd = random.Random(1)
    payload = b"".join(b"line %d of the disk %d\n" % (i, rnd.randrange(1000)) for i in range(200_000))
    return layer([file("disk/a.img", payload)], compression)


def test_zstd_corruption_inside_file_data_is_failed_precondition(extractor: DiskExtractor,
                                                                 workdir: Path) -> None:
    blob = _text_layer(Compression.ZSTD)
    with pytest.raises(FailedPrecondition, match=f"layer {L1} is not a valid tar stream"):
        extractor.add_layer(io.BytesIO(_flip(blob, len(blob) // 2)), Compression.ZSTD, L1)
    assert temp_files(workdir) == []


@pytest.mark.parametrize(
    "mangle",
    [lambda b: _flip(b, len(b) // 2), lambda b: b[:-8]],
    ids=["flipped-byte-in-file-data", "no-trailer"],
)
def test_gzip_integrity_is_checked(extractor: DiskExtractor, workdir: Path, mangle: object) -> None:
    blob = mangle(_text_layer(Compression.GZIP))  # type: ignore[operator]
    with pytest.raises(FailedPrecondition, match=f"layer {L1} is not a valid tar stream"):
        extractor.add_layer(io.BytesIO(blob), Compression.GZIP, L1)
    assert temp_files(workdir) == []


def test_gzip_of_several_members_is_one_stream(extractor: DiskExtractor) -> None:
    # pigz and `cat a.gz b.gz` make multi-member files; gzip(1) reads them as one.
    payload = random.Random(4).randbytes(3 * MiB)
    tar = tar_bytes([file("disk/a.img", payload), file("disk/b.img", b"B")])
    cut = [0, 1000, 2 * MiB + 7, len(tar)]
    blob = b"".join(gzip.compress(tar[a:b], mtime=0) for a, b in zip(cut, cut[1:], strict=False))
    extractor.add_layer(io.BytesIO(blob), Compression.GZIP, L1)
    assert contents(extractor.disks()) == {"/disk/a.img": payload, "/disk/b.img": b"B"}


def test_gzip_followed_by_zero_padding_is_accepted(extractor: DiskExtractor) -> None:
    blob = layer([file("disk/a.img", b"A")]) + bytes(4096)
    extractor.add_layer(io.BytesIO(blob), Compression.GZIP, L1)
    assert contents(extractor.disks()) == {"/disk/a.img": b"A"}


def test_gzip_followed_by_junk_is_refused(extractor: DiskExtractor, workdir: Path) -> None:
    blob = layer([file("disk/a.img", b"A")]) + b"junk after the last member"
    with pytest.raises(FailedPrecondition, match=f"layer {L1} is not a valid tar stream"):
        extractor.add_layer(io.BytesIO(blob), Compression.GZIP, L1)
    assert temp_files(workdir) == []


def test_zstd_of_several_frames_is_one_stream(extractor: DiskExtractor) -> None:
    tar = tar_bytes([file("disk/a.img", b"A" * 5000)])
    blob = zstandard.ZstdCompressor().compress(tar[:700]) + zstandard.ZstdCompressor().compress(tar[700:])
    extractor.add_layer(io.BytesIO(blob), Compression.ZSTD, L1)
    assert contents(extractor.disks()) == {"/disk/a.img": b"A" * 5000}


def test_error_from_the_stream_itself_removes_the_partial_file(workdir: Path) -> None:
    class Failing(io.RawIOBase):
        """A blob file whose disk fails after some bytes."""

        def __init__(self, data: bytes, fail_at: int) -> None:
            self._data = io.BytesIO(data)
            self._fail_at = fail_at

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
            if self._data.tell() >= self._fail_at:
                raise OSError(5, "Input/output error")
            chunk = self._data.read(min(len(buffer), self._fail_at - self._data.tell()))
            buffer[: len(chunk)] = chunk
            return len(chunk)

    data = tar_bytes([file("disk/a.img", random.Random(9).randbytes(3 * MiB))])
    extractor = DiskExtractor(workdir, IMAGE)
    with pytest.raises(FailedPrecondition, match="Input/output error"):
        extractor.add_layer(io.BufferedReader(Failing(data, 2 * MiB)), Compression.NONE, L1)
    assert temp_files(workdir) == []
    assert extractor.disks() == {}


# Sparse output and discard ---------------------------------------------------


@pytest.mark.parametrize("compression", list(Compression), ids=lambda c: c.value)
def test_all_zero_disk_is_written_sparse(extractor: DiskExtractor, compression: Compression) -> None:
    size = 8 * MiB
    add(extractor, [file("disk/zero.raw", bytes(size))], L1, compression)
    f = extractor.disks()["/disk/zero.raw"]
    assert f.temp is not None
    st = f.temp.stat()
    assert (f.size, st.st_size) == (size, size)
    assert st.st_blocks * 512 < size // 2
    assert f.temp.read_bytes() == bytes(size)


def test_zero_runs_inside_data_are_holes_and_bytes_stay_exact(extractor: DiskExtractor) -> None:
    rnd = random.Random(11)
    payload = rnd.randbytes(1000) + bytes(6 * MiB) + rnd.randbytes(MiB) + bytes(MiB + 17)
    add(extractor, [file("disk/mixed.raw", payload)], L1)
    f = extractor.disks()["/disk/mixed.raw"]
    assert f.temp is not None
    assert f.temp.read_bytes() == payload
    assert f.temp.stat().st_size == len(payload)
    assert f.temp.stat().st_blocks * 512 < len(payload) - 4 * MiB


def test_discard_removes_every_temp_file(extractor: DiskExtractor, workdir: Path) -> None:
    add(extractor, [file("disk/a.img", b"A"), file("disk/b.img", b"B"), symlink("disk/c", "a.img")], L1)
    add(extractor, [file("disk/d.img", b"D")], L2)
    assert len(temp_files(workdir)) == 3
    extractor.discard()
    assert temp_files(workdir) == []
    assert extractor.disks() == {}
    extractor.discard()  # twice is fine


def test_discard_tolerates_files_moved_away(extractor: DiskExtractor, workdir: Path, tmp_path: Path) -> None:
    add(extractor, [file("disk/a.img", b"A")], L1)
    temp = extractor.disks()["/disk/a.img"].temp
    assert temp is not None
    os.replace(temp, tmp_path / "installed.img")  # what install_disks does
    extractor.discard()
    assert (tmp_path / "installed.img").read_bytes() == b"A"


# choose_disk -------------------------------------------------------------------


def _disk(name: str) -> DiskFile:
    return DiskFile(f"disk/{name}", L1, Path(f"/tmp/work/{name}"), "file", 10)


TWO = {"/disk/a.img": _disk("a.img"), "/disk/b.img": _disk("b.img")}


def test_choose_disk_without_files() -> None:
    with pytest.raises(FailedPrecondition) as caught:
        choose_disk({}, IMAGE, None)
    assert caught.value.message == f"image {IMAGE} is not a containerDisk: it has no file under /disk/"


@pytest.mark.parametrize("wanted", [None, ""])
def test_choose_disk_with_exactly_one(wanted: str | None) -> None:
    one = {"/disk/a.img": _disk("a.img")}
    assert choose_disk(one, IMAGE, wanted) is one["/disk/a.img"]


def test_choose_disk_with_several_lists_them() -> None:
    with pytest.raises(FailedPrecondition) as caught:
        choose_disk(TWO, IMAGE, None)
    assert caught.value.message == (
        f"image {IMAGE} has 2 files under /disk/ (/disk/a.img, /disk/b.img); "
        "name one with the containerDisk volume's path"
    )


@pytest.mark.parametrize("wanted", ["/disk/b.img", "disk/b.img", "b.img", "/b.img", "//disk//b.img",
                                    "./disk/b.img"])
def test_choose_disk_by_path(wanted: str) -> None:
    assert choose_disk(TWO, IMAGE, wanted) is TWO["/disk/b.img"]


def test_choose_disk_by_path_in_a_subdirectory() -> None:
    disks = {"/disk/sub/a.img": DiskFile("disk/sub/a.img", L1, Path("/w/x"))}
    assert choose_disk(disks, IMAGE, "sub/a.img") is disks["/disk/sub/a.img"]


@pytest.mark.parametrize(("wanted", "key"), [("/disk/c.img", "/disk/c.img"), ("c.img", "/disk/c.img"),
                                             ("/other/a.img", "/disk/other/a.img")])
def test_choose_disk_missing_path(wanted: str, key: str) -> None:
    with pytest.raises(FailedPrecondition) as caught:
        choose_disk(TWO, IMAGE, wanted)
    assert caught.value.message == (
        f"image {IMAGE} has no file {key} (files under /disk/: /disk/a.img, /disk/b.img)"
    )


def test_choose_disk_missing_path_in_an_image_without_files() -> None:
    with pytest.raises(FailedPrecondition) as caught:
        choose_disk({}, IMAGE, "a.img")
    assert caught.value.message == f"image {IMAGE} has no file /disk/a.img (files under /disk/: none)"


@pytest.mark.parametrize("wanted", ["../etc/shadow", "/disk/../../etc/shadow"])
def test_choose_disk_refuses_a_path_that_climbs(wanted: str) -> None:
    with pytest.raises(FailedPrecondition, match="'..' leaves the image root"):
        choose_disk(TWO, IMAGE, wanted)
