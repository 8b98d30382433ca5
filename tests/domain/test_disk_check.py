"""Judging qemu-img's JSON (agent.domain.disk.check) and running qemu-img
(agent.adapters.qemu_img) on real files made with ``qemu-img create``.

The literal documents below were captured from qemu-img 7.2 (Debian 12); the
generated ones come from whatever qemu-img is installed, so a change in its
output shows here first.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from agent.adapters import qemu_img
from agent.domain.disk import DiskInfo, check
from agent.domain.errors import FailedPrecondition, Internal

GiB = 1 << 30
SRC = "image docker.io/kubevirt/x:1: /disk/x"

QCOW2_JSON = """{
    "virtual-size": 67108864,
    "filename": "a.qcow2",
    "cluster-size": 65536,
    "format": "qcow2",
    "actual-size": 200704,
    "format-specific": {
        "type": "qcow2",
        "data": {
            "compat": "1.1",
            "compression-type": "zlib",
            "lazy-refcounts": false,
            "refcount-bits": 16,
            "corrupt": false,
            "extended-l2": false
        }
    },
    "dirty-flag": false
}"""

RAW_JSON = """{
    "virtual-size": 1048576,
    "filename": "r.img",
    "format": "raw",
    "actual-size": 4096,
    "dirty-flag": false
}"""

BACKING_JSON = """{
    "backing-filename-format": "raw",
    "virtual-size": 512,
    "filename": "b.qcow2",
    "cluster-size": 65536,
    "format": "qcow2",
    "actual-size": 200704,
    "format-specific": {
        "type": "qcow2",
        "data": {
            "compat": "1.1",
            "compression-type": "zlib",
            "lazy-refcounts": false,
            "refcount-bits": 16,
            "corrupt": false,
            "extended-l2": false
        }
    },
    "full-backing-filename": "/etc/hostname",
    "backing-filename": "/etc/hostname",
    "dirty-flag": false
}"""

DATA_FILE_JSON = """{
    "virtual-size": 1048576,
    "filename": "dd.qcow2",
    "cluster-size": 65536,
    "format": "qcow2",
    "actual-size": 200704,
    "format-specific": {
        "type": "qcow2",
        "data": {
            "compat": "1.1",
            "compression-type": "zlib",
            "lazy-refcounts": false,
            "refcount-bits": 16,
            "data-file": "d.raw",
            "data-file-raw": false,
            "corrupt": false,
            "extended-l2": false
        }
    },
    "dirty-flag": false
}"""

CORRUPT_JSON = """{
    "virtual-size": 67108864,
    "filename": "c.qcow2",
    "cluster-size": 65536,
    "format": "qcow2",
    "actual-size": 200704,
    "format-specific": {
        "type": "qcow2",
        "data": {
            "compat": "1.1",
            "compression-type": "zlib",
            "lazy-refcounts": false,
            "refcount-bits": 16,
            "corrupt": true,
            "extended-l2": false
        }
    },
    "dirty-flag": false
}"""

VMDK_JSON = """{
    "virtual-size": 1048576,
    "filename": "v.vmdk",
    "cluster-size": 65536,
    "format": "vmdk",
    "actual-size": 12288,
    "format-specific": {
        "type": "vmdk",
        "data": {
            "cid": 262644412,
            "parent-cid": 4294967295,
            "create-type": "monolithicSparse",
            "extents": [
                {
                    "virtual-size": 1048576,
                    "filename": "v.vmdk",
                    "cluster-size": 65536,
                    "format": ""
                }
            ]
        }
    },
    "dirty-flag": false
}"""

VPC_JSON = """{
    "virtual-size": 1079296,
    "filename": "p.vhd",
    "cluster-size": 2097152,
    "format": "vpc",
    "actual-size": 4096,
    "dirty-flag": false
}"""


def refused(raw: str | bytes, **kwargs: Any) -> str:
    """The message check() refuses ``raw`` with."""
    kwargs.setdefault("max_virtual_size", GiB)
    with pytest.raises(FailedPrecondition) as caught:
        check(raw, source=SRC, **kwargs)
    return caught.value.message


def edited(raw: str, **changes: Any) -> str:
    """``raw`` with keys (``virtual_size`` → ``virtual-size``) set, or removed when None."""
    doc = json.loads(raw)
    for key, value in changes.items():
        key = key.replace("_", "-")
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return json.dumps(doc)


# check() on captured documents -------------------------------------------------


def test_qcow2_is_accepted() -> None:
    assert check(QCOW2_JSON, source=SRC, max_virtual_size=GiB) == DiskInfo("qcow2", 67108864, 200704)


def test_raw_is_accepted() -> None:
    assert check(RAW_JSON, source=SRC, max_virtual_size=GiB) == DiskInfo("raw", 1048576, 4096)


def test_bytes_are_accepted_like_text() -> None:
    assert check(QCOW2_JSON.encode(), source=SRC, max_virtual_size=GiB).format == "qcow2"


@pytest.mark.parametrize(("raw", "declared"), [(QCOW2_JSON, "qcow2"), (RAW_JSON, "raw")])
def test_declared_format_that_matches(raw: str, declared: str) -> None:
    assert check(raw, source=SRC, max_virtual_size=GiB, declared_format=declared).format == declared


@pytest.mark.parametrize(("raw", "found", "declared"),
                         [(QCOW2_JSON, "qcow2", "raw"), (RAW_JSON, "raw", "qcow2")])
def test_declared_format_mismatch_is_refused(raw: str, found: str, declared: str) -> None:
    assert refused(raw, declared_format=declared) == f"{SRC}: disk is {found}, but {declared} was declared"


def test_backing_file_is_refused_naming_the_file() -> None:
    assert refused(BACKING_JSON) == f"{SRC}: refusing a disk with a backing file ('/etc/hostname')"


@pytest.mark.parametrize("key", ["backing-filename", "full-backing-filename", "backing-filename-format"])
def test_any_one_backing_key_is_enough_to_refuse(key: str) -> None:
    doc = json.loads(QCOW2_JSON)
    doc[key] = "/etc/shadow" if "format" not in key else "raw"
    message = refused(json.dumps(doc))
    assert message.startswith(f"{SRC}: refusing a disk with a backing file (")
    assert message == f"{SRC}: refusing a disk with a backing file ({doc[key]!r})"


def test_external_data_file_is_refused_naming_it() -> None:
    assert refused(DATA_FILE_JSON) == f"{SRC}: refusing a qcow2 with an external data file ('d.raw')"


@pytest.mark.parametrize(("raw", "fmt"), [(VMDK_JSON, "vmdk"), (VPC_JSON, "vpc"),
                                          (edited(RAW_JSON, format="luks"), "luks"),
                                          (edited(RAW_JSON, format="QCOW2"), "QCOW2"),
                                          (edited(RAW_JSON, format=None), None)])
def test_other_formats_are_refused(raw: str, fmt: str | None) -> None:
    assert refused(raw) == f"{SRC}: disk format {fmt!r} is not allowed (only qcow2 or raw)"


def test_other_format_is_refused_before_the_declared_format_is_compared() -> None:
    assert refused(VMDK_JSON, declared_format="qcow2") == (
        f"{SRC}: disk format 'vmdk' is not allowed (only qcow2 or raw)"
    )


def test_corrupt_flag_is_refused() -> None:
    assert refused(CORRUPT_JSON) == f"{SRC}: qcow2 image is marked corrupt"


@pytest.mark.parametrize(("limit", "ok"), [(67108864, True), (67108863, False), (GiB, True)])
def test_virtual_size_limit(limit: int, ok: bool) -> None:
    if ok:
        assert check(QCOW2_JSON, source=SRC, max_virtual_size=limit).virtual_size == 67108864
    else:
        assert refused(QCOW2_JSON, max_virtual_size=limit) == (
            f"{SRC}: virtual size 67108864 bytes exceeds the configured maximum of 67108863 bytes"
        )


@pytest.mark.parametrize("size", [None, 0, -1, "1048576", 1.5, [1]])
def test_unusable_virtual_size_is_refused(size: object) -> None:
    assert refused(edited(RAW_JSON, virtual_size=size)) == f"{SRC}: disk has no usable virtual size"


@pytest.mark.parametrize("actual", [None, "4096", 1.5])
def test_missing_or_odd_actual_size_is_zero(actual: object) -> None:
    assert check(edited(RAW_JSON, actual_size=actual), source=SRC, max_virtual_size=GiB).actual_size == 0


@pytest.mark.parametrize("raw", ["", "not json", "{", "[]", "null", "42", '"qcow2"', b"\xff\xfe\x00", b""])
def test_garbage_is_refused(raw: str | bytes) -> None:
    assert refused(raw) == f"{SRC}: qemu-img info gave no readable answer"


def test_backing_file_is_refused_before_the_size_is_judged() -> None:
    # An attack image also declares an absurd size; the message names the real problem.
    doc = json.loads(BACKING_JSON)
    doc["virtual-size"] = 1 << 60
    assert "backing file ('/etc/hostname')" in refused(json.dumps(doc))


# check() on documents the installed qemu-img writes ------------------------------


def run(*args: str) -> bytes:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=60).stdout


def info_json(path: Path) -> bytes:
    return run("info", "--output=json", str(path))


def set_qcow2_corrupt_bit(path: Path) -> None:
    """Set bit 1 (corrupt) of the qcow2 header's incompatible features (offset 72, big endian)."""
    with open(path, "r+b") as f:
        f.seek(72)
        features = int.from_bytes(f.read(8), "big")
        f.seek(72)
        f.write((features | 2).to_bytes(8, "big"))


def test_generated_qcow2_is_accepted(tmp_path: Path) -> None:
    run("create", "-q", "-f", "qcow2", str(tmp_path / "a.qcow2"), "64M")
    info = check(info_json(tmp_path / "a.qcow2"), source=SRC, max_virtual_size=GiB, declared_format="qcow2")
    assert (info.format, info.virtual_size) == ("qcow2", 64 << 20)
    assert info.actual_size > 0


def test_generated_raw_is_accepted(tmp_path: Path) -> None:
    run("create", "-q", "-f", "raw", str(tmp_path / "r.img"), "3M")
    info = check(info_json(tmp_path / "r.img"), source=SRC, max_virtual_size=GiB, declared_format="raw")
    assert (info.format, info.virtual_size) == ("raw", 3 << 20)


def test_generated_qcow2_with_backing_file_is_refused(tmp_path: Path) -> None:
    run("create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/hostname", str(tmp_path / "b.qcow2"), "1M")
    assert refused(info_json(tmp_path / "b.qcow2")) == (
        f"{SRC}: refusing a disk with a backing file ('/etc/hostname')"
    )


def test_generated_qcow2_with_data_file_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "d.raw"
    run("create", "-q", "-f", "qcow2", "-o", f"data_file={data}", str(tmp_path / "dd.qcow2"), "1M")
    assert refused(info_json(tmp_path / "dd.qcow2")) == (
        f"{SRC}: refusing a qcow2 with an external data file ({str(data)!r})"
    )


@pytest.mark.parametrize("fmt", ["vmdk", "vpc", "vdi", "qed"])
def test_generated_other_formats_are_refused(tmp_path: Path, fmt: str) -> None:
    run("create", "-q", "-f", fmt, str(tmp_path / f"x.{fmt}"), "1M")
    assert refused(info_json(tmp_path / f"x.{fmt}")) == f"{SRC}: disk format {fmt!r} is not allowed (only qcow2 or raw)"


def test_generated_corrupt_qcow2_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.qcow2"
    run("create", "-q", "-f", "qcow2", str(path), "1M")
    set_qcow2_corrupt_bit(path)
    assert refused(info_json(path)) == f"{SRC}: qcow2 image is marked corrupt"


def test_generated_qcow2_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    run("create", "-q", "-f", "qcow2", str(tmp_path / "big.qcow2"), "2T")
    assert refused(info_json(tmp_path / "big.qcow2"), max_virtual_size=1 << 40) == (
        f"{SRC}: virtual size {2 << 40} bytes exceeds the configured maximum of {1 << 40} bytes"
    )


# qemu_img.info on real files ----------------------------------------------------------


def test_info_on_qcow2(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    run("create", "-q", "-f", "qcow2", str(path), "64M")
    info = qemu_img.info(path, source=SRC, max_virtual_size=GiB)
    assert (info.format, info.virtual_size) == ("qcow2", 64 << 20)
    assert info.actual_size > 0


def test_info_on_raw_with_declared_format(tmp_path: Path) -> None:
    path = tmp_path / "r.img"
    path.write_bytes(b"\x00" * 4096)
    assert qemu_img.info(path, source=SRC, max_virtual_size=GiB, declared_format="raw") == DiskInfo(
        "raw", 4096, path.stat().st_blocks * 512
    )
    with pytest.raises(FailedPrecondition) as caught:
        qemu_img.info(path, source=SRC, max_virtual_size=GiB, declared_format="qcow2")
    assert caught.value.message == f"{SRC}: disk is raw, but qcow2 was declared"


def test_info_refuses_qcow2_backed_by_etc_shadow(tmp_path: Path) -> None:
    path = tmp_path / "evil.qcow2"
    run("create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/shadow", str(path), "1M")
    with pytest.raises(FailedPrecondition) as caught:
        qemu_img.info(path, source=SRC, max_virtual_size=GiB)
    assert caught.value.message == f"{SRC}: refusing a disk with a backing file ('/etc/shadow')"


def test_info_refuses_qcow2_backed_by_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "evil.qcow2"
    run("create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", "/nonexistent/disk", str(path), "1M")
    with pytest.raises(FailedPrecondition, match="backing file \\('/nonexistent/disk'\\)"):
        qemu_img.info(path, source=SRC, max_virtual_size=GiB)


def test_info_refuses_vmdk_descriptor_whose_extent_is_a_host_file(tmp_path: Path) -> None:
    path = tmp_path / "evil.vmdk"
    path.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        'createType="monolithicFlat"\n\nRW 2048 FLAT "/etc/hostname" 0\n\n'
        'ddb.virtualHWVersion = "4"\n'
    )
    with pytest.raises(FailedPrecondition) as caught:
        qemu_img.info(path, source=SRC, max_virtual_size=GiB)
    assert caught.value.message == f"{SRC}: disk format 'vmdk' is not allowed (only qcow2 or raw)"


def test_info_on_a_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition) as caught:
        qemu_img.info(tmp_path / "absent.qcow2", source=SRC, max_virtual_size=GiB)
    assert caught.value.message == (
        f"{SRC}: cannot open {tmp_path / 'absent.qcow2'} to inspect it: No such file or directory"
    )


def test_info_of_a_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "f.img")
    with pytest.raises(FailedPrecondition) as caught:
        qemu_img.info(tmp_path / "f.img", source=SRC, max_virtual_size=GiB)
    assert caught.value.message == f"{SRC}: {tmp_path / 'f.img'} is not a regular file"


def test_info_of_a_file_named_like_an_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("--help").write_bytes(b"\x00" * 512)
    assert qemu_img.info(Path("--help"), source=SRC, max_virtual_size=GiB).format == "raw"


def test_create_overlay_without_qemu_img_installed_is_internal(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qemu_img, "QEMU_IMG", str(tmp_path / "no-such-qemu-img"))
    with pytest.raises(Internal) as caught:
        qemu_img.create_overlay(tmp_path / "base.qcow2", "qcow2", tmp_path / "overlay.qcow2")
    assert caught.value.message == "qemu-img is not installed (Debian package qemu-utils)"


# qemu_img.create_overlay ------------------------------------------------------------


@pytest.mark.parametrize("base_format", ["qcow2", "raw"])
def test_create_overlay_states_backing_file_and_format(tmp_path: Path, base_format: str) -> None:
    base = tmp_path / f"base.{base_format}"
    run("create", "-q", "-f", base_format, str(base), "32M")
    overlay = tmp_path / "vm" / "overlay.qcow2"
    overlay.parent.mkdir()

    qemu_img.create_overlay(base, base_format, overlay)

    doc = json.loads(info_json(overlay))
    assert doc["format"] == "qcow2"
    assert doc["virtual-size"] == 32 << 20
    assert doc["backing-filename"] == str(base)
    assert doc["full-backing-filename"] == str(base)
    assert doc["backing-filename-format"] == base_format
    # The overlay is exactly what import must never accept from an image.
    with pytest.raises(FailedPrecondition, match="backing file"):
        qemu_img.info(overlay, source=SRC, max_virtual_size=GiB)


def test_create_overlay_never_probes_the_base_format(tmp_path: Path) -> None:
    # A raw base whose bytes look like qcow2 stays raw: the overlay says so.
    fake_qcow2 = tmp_path / "base.qcow2"
    run("create", "-q", "-f", "qcow2", str(fake_qcow2), "1M")
    base = tmp_path / "base.raw"
    base.write_bytes(fake_qcow2.read_bytes().ljust(1 << 20, b"\x00"))
    overlay = tmp_path / "overlay.qcow2"
    qemu_img.create_overlay(base, "raw", overlay)
    doc = json.loads(info_json(overlay))
    assert doc["backing-filename-format"] == "raw"
    assert doc["virtual-size"] == 1 << 20


def test_create_overlay_of_a_missing_base_fails(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition) as caught:
        qemu_img.create_overlay(tmp_path / "absent.qcow2", "qcow2", tmp_path / "overlay.qcow2")
    assert caught.value.message.startswith("qemu-img create failed: ")
    assert not (tmp_path / "overlay.qcow2").exists()
