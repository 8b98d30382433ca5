"""DiskExtractor against hostile layers: tar header memory bombs, a second
disk, the per-pull byte cap and the free-space reserve (issue #10, items 1-2)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from agent.adapters import layers as layers_module
from agent.adapters import tar_guard
from agent.adapters.layers import DiskExtractor
from agent.domain.errors import FailedPrecondition, ResourceExhausted
from agent.domain.oci import Compression
from tests.adapters.test_layers import Entry, file, layer, symlink, tar_bytes
from tests.hostile_layers import endless_sparse_map, header_bomb, pax_chain

L1 = "sha256:" + "1" * 64
L2 = "sha256:" + "2" * 64
IMAGE = "docker.io/x/hostile:1"
MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


def add(extractor: DiskExtractor, entries: Sequence[Entry], digest: str,
        compression: Compression = Compression.GZIP) -> str:
    return extractor.add_layer(io.BytesIO(layer(entries, compression)), compression, digest)


def temp_files(workdir: Path) -> list[Path]:
    return sorted(workdir.iterdir())


# 1. Tar header memory bombs ------------------------------------------------------------

# Applies one layer in a fresh interpreter and prints how far its peak RSS
# (ru_maxrss, KiB) rose while doing so: a bomb read into memory shows there
# even when the memory was given back afterwards.
_PEAK_RSS = """
import io, resource, sys
from pathlib import Path
from agent.adapters.layers import DiskExtractor
from agent.domain.errors import PodvisorError
from agent.domain.oci import Compression
blob = Path(sys.argv[1]).read_bytes()
extractor = DiskExtractor(Path(sys.argv[2]), "docker.io/x/hostile:1")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    extractor.add_layer(io.BytesIO(blob), Compression.GZIP, "sha256:" + "1" * 64)
    print("accepted")
except PodvisorError as exc:
    print(exc.code_name, exc.message)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


@pytest.mark.parametrize(("kind", "what"), [(b"L", "GNU long name"), (b"K", "GNU long link"),
                                             (b"x", "pax"), (b"g", "pax global")])
def test_header_claiming_gigabytes_is_refused_before_tarfile_reads_it(tmp_path: Path, kind: bytes,
                                                                      what: str) -> None:
    blob = tmp_path / "bomb.tar.gz"
    blob.write_bytes(header_bomb(kind, claimed=2 << 30, present=48 * MiB))
    assert blob.stat().st_size < 100_000  # a tiny layer
    workdir = tmp_path / "work"
    workdir.mkdir()
    out = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(blob), str(workdir)], check=True,
                         capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.splitlines()
    assert out[0] == (
        f"FAILED_PRECONDITION image {IMAGE}: layer {L1} is refused: a {what} header claims "
        f"{2 << 30} bytes (at most {tar_guard.MAX_EXTENSION_HEADER} are allowed)"
    )
    assert int(out[1]) < 16 * 1024  # KiB: the 48 MiB behind the header never reached memory
    assert list(workdir.iterdir()) == []


def test_a_long_name_within_the_bound_still_works(tmp_path: Path) -> None:
    extractor = DiskExtractor(tmp_path, IMAGE)
    name = "disk/" + "d" * 200 + "/" + "a" * 200 + ".img"  # GNU long name and pax path records
    raw = io.BytesIO()
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=fmt) as tar:
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
        extractor.add_layer(io.BytesIO(raw.getvalue()), Compression.NONE, L1)
        assert list(extractor.disks()) == ["/" + name]


def test_a_chain_of_extension_headers_is_refused(tmp_path: Path) -> None:
    extractor = DiskExtractor(tmp_path, IMAGE)
    extractor.add_layer(io.BytesIO(pax_chain(tar_guard.MAX_EXTENSION_CHAIN - 1)), Compression.NONE, L1)
    with pytest.raises(FailedPrecondition) as caught:
        extractor.add_layer(io.BytesIO(pax_chain(5000)), Compression.NONE, L2)
    assert caught.value.message == (
        f"image {IMAGE}: layer {L2} is refused: more than {tar_guard.MAX_EXTENSION_CHAIN} "
        "extension headers in a row"
    )


def test_an_endless_sparse_map_is_refused(tmp_path: Path) -> None:
    extractor = DiskExtractor(tmp_path, IMAGE)
    with pytest.raises(FailedPrecondition) as caught:
        extractor.add_layer(io.BytesIO(endless_sparse_map(20_000)), Compression.NONE, L1)
    assert caught.value.message == (
        f"image {IMAGE}: layer {L1} is refused: the tar headers before one entry take more than "
        f"{tar_guard.MAX_HEADER_BYTES} bytes"
    )


def test_entries_are_not_kept_in_a_list(tmp_path: Path) -> None:
    data = tar_bytes([file(f"etc/f{i}", b"") for i in range(300)] + [file("disk/a.img", b"A" * 5000)])
    tar, guard = tar_guard.open_guarded(io.BytesIO(data), 1 << 20)
    seen = 0
    for _member in tar_guard.entries(tar, guard):
        seen += 1
        assert len(tar.members) <= 1  # type: ignore[attr-defined]
    assert seen == 301


def test_memory_error_is_resource_exhausted_not_internal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_memory(*_args: Any) -> Any:
        raise MemoryError

    monkeypatch.setattr(layers_module, "open_guarded", no_memory)
    with pytest.raises(ResourceExhausted) as caught:
        add(DiskExtractor(tmp_path, IMAGE), [file("disk/a.img", b"A")], L1)
    assert caught.value.message == f"image {IMAGE}: layer {L1} needs more memory to unpack than the agent has"


# 2. Disk fill: one disk, a cap per pull, a free-space reserve ----------------------------


@pytest.mark.parametrize("compression", [Compression.ZSTD, Compression.GZIP], ids=lambda c: c.value)
def test_a_second_disk_file_is_refused_as_it_appears(tmp_path: Path, compression: Compression) -> None:
    extractor = DiskExtractor(tmp_path, IMAGE)
    # The unsafe entry after the second disk is never reached: the refusal
    # comes at the second file, before a byte of it is written.
    with pytest.raises(FailedPrecondition) as caught:
        add(extractor, [file("disk/a.raw", b"\x01" * MiB), file("disk/b.raw", b"\x01" * MiB),
                        file("../escape", b"x")], L1, compression)
    assert caught.value.message == (
        f"image {IMAGE}: layer {L1} makes a second entry under /disk/ (/disk/a.raw, /disk/b.raw); "
        "a containerDisk holds exactly one disk file"
    )
    assert temp_files(tmp_path) == []


def test_a_symlink_beside_the_disk_is_a_second_entry(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match=r"second entry under /disk/ \(/disk/a.img, /disk/b.img\)"):
        add(DiskExtractor(tmp_path, IMAGE), [file("disk/a.img", b"A"), symlink("disk/b.img", "a.img")], L1)


def test_a_second_disk_in_an_upper_layer_is_refused(tmp_path: Path) -> None:
    extractor = DiskExtractor(tmp_path, IMAGE)
    add(extractor, [file("disk/a.img", b"A")], L1)
    with pytest.raises(FailedPrecondition, match=rf"layer {L2} makes a second entry under /disk/"):
        add(extractor, [file("disk/b.img", b"B")], L2)
    assert list(extractor.disks()) == ["/disk/a.img"]
    assert len(temp_files(tmp_path)) == 1  # the upper layer's file went


@pytest.mark.parametrize("whiteout_first", [True, False])
def test_a_whiteout_makes_room_for_a_new_disk(tmp_path: Path, whiteout_first: bool) -> None:
    extractor = DiskExtractor(tmp_path, IMAGE)
    add(extractor, [file("disk/old.img", b"old")], L1)
    entries = [file("disk/.wh.old.img", b""), file("disk/new.img", b"new")]
    add(extractor, entries if whiteout_first else entries[::-1], L2)
    assert list(extractor.disks()) == ["/disk/new.img"]


def test_a_file_beyond_the_cap_per_pull_is_resource_exhausted(tmp_path: Path) -> None:
    extractor = DiskExtractor(tmp_path, IMAGE, max_file_bytes=10 * MiB, max_total_bytes=MiB)
    with pytest.raises(ResourceExhausted) as caught:
        add(extractor, [file("disk/a.raw", b"\x01" * (2 * MiB))], L1, Compression.ZSTD)
    assert caught.value.message == (
        f"image {IMAGE}: /disk/a.raw in layer {L1} would bring what this pull unpacks to {2 * MiB} bytes, "
        f"more than the {MiB} allowed ([images] max_pull_bytes)"
    )
    assert temp_files(tmp_path) == []


def test_the_cap_per_pull_counts_every_layer(tmp_path: Path) -> None:
    extractor = DiskExtractor(tmp_path, IMAGE, max_file_bytes=MiB, max_total_bytes=MiB)
    add(extractor, [file("disk/a.raw", b"\x01" * (600 << 10))], L1)
    with pytest.raises(ResourceExhausted, match="would bring what this pull unpacks to 1228800 bytes"):
        add(extractor, [file("disk/a.raw", b"\x02" * (600 << 10))], L2)


def test_the_cap_per_pull_defaults_to_the_cap_per_file(tmp_path: Path) -> None:
    assert DiskExtractor(tmp_path, IMAGE, max_file_bytes=123).max_total_bytes == 123


def test_a_reserve_larger_than_the_free_space_stops_extraction(tmp_path: Path) -> None:
    extractor = DiskExtractor(tmp_path, IMAGE, min_free_bytes=1 << 62)
    with pytest.raises(ResourceExhausted) as caught:
        add(extractor, [file("disk/a.raw", b"\x01" * MiB)], L1)
    assert caught.value.message.startswith(f"image {IMAGE}: unpacking layer {L1} stopped: the images filesystem has ")
    assert caught.value.message.endswith(
        f"bytes free, less than the {1 << 62} kept in reserve ([images] min_free_bytes)")
    assert temp_files(tmp_path) == []


def test_free_space_is_checked_while_a_file_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checks: list[int] = []
    real = os.statvfs

    def shrinking(path: Any) -> Any:
        st = real(path)
        checks.append(1)
        # Plenty before the file starts; nothing left once 32 MiB are written.
        return os.statvfs_result((*st[:4], 0 if len(checks) > 1 else st.f_bavail, *st[5:]))

    monkeypatch.setattr(layers_module.os, "statvfs", shrinking)
    extractor = DiskExtractor(tmp_path, IMAGE, min_free_bytes=1)
    with pytest.raises(ResourceExhausted, match="has 0 bytes free"):
        add(extractor, [file("disk/a.raw", b"\x01" * (40 * MiB))], L1, Compression.ZSTD)
    assert len(checks) == 2
    assert temp_files(tmp_path) == []


def test_extracted_disks_are_readable_for_the_unprivileged_check(tmp_path: Path) -> None:
    extractor = DiskExtractor(tmp_path, IMAGE)
    add(extractor, [file("disk/a.img", b"A")], L1)
    temp = extractor.disks()["/disk/a.img"].temp
    assert temp is not None and temp.stat().st_mode & 0o777 == 0o644
