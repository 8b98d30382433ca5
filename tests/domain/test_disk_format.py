"""Choosing the format qemu-img is told to open, without letting it probe
(agent.domain.disk.choose_format), and the CVE-2024-4467 version rule."""

from __future__ import annotations

import pytest

from agent.domain.disk import choose_format, declared_format, has_cve_2024_4467_fix, sniff_format
from agent.domain.errors import FailedPrecondition

SRC = "image x: /disk/a"
QCOW2 = b"QFI\xfb\x00\x00\x00\x03" + bytes(100)


@pytest.mark.parametrize(("head", "fmt"), [
    (QCOW2, "qcow2"),
    (b"QFI\xfb\x00\x00\x00\x02", "qcow2"),
    (b"QFI\xfb\x00\x00\x00\x01", "qcow"),
    (b"KDMV\x01\x00\x00\x00", "vmdk"),
    (b"# Disk DescriptorFile\nversion=1\n", "vmdk"),
    (b"conectix\x00\x00\x00\x02", "vpc"),
    (b"vhdxfile", "vhdx"),
    (b"<<< Oracle VM VirtualBox Disk Image >>>\n".ljust(0x40, b"\x00") + b"\x7f\x10\xda\xbe", "vdi"),
    (b"QED\x00", "qed"),
    (b"LUKS\xba\xbe\x00\x01", "luks"),
    (b"WithoutFreeSpace", "parallels"),
    (b"", "raw"),
    (bytes(4096), "raw"),
    (b"\xebc\x90" + bytes(509), "raw"),  # a boot sector
])
def test_sniff_format(head: bytes, fmt: str) -> None:
    assert sniff_format(head) == fmt


@pytest.mark.parametrize(("name", "fmt"), [
    ("/disk/a.qcow2", "qcow2"), ("disk/A.QCOW2", "qcow2"), ("/disk/a.raw", "raw"), ("/disk/a.img", None),
    ("/disk/qcow2", None), ("/disk.qcow2/a", None), ("/disk/a.qcow2.gz", None), ("/disk/.raw", "raw"),
])
def test_declared_format(name: str, fmt: str | None) -> None:
    assert declared_format(name) == fmt


@pytest.mark.parametrize(("head", "declared", "fmt"), [
    (QCOW2, None, "qcow2"),
    (bytes(512), None, "raw"),
    (QCOW2, "qcow2", "qcow2"),
    (QCOW2, "raw", "raw"),  # declared raw: the guest's bytes, never probed
    (b"KDMV", "raw", "raw"),
])
def test_choose_format(head: bytes, declared: str | None, fmt: str) -> None:
    assert choose_format(head, declared, source=SRC) == fmt


@pytest.mark.parametrize(("head", "declared", "message"), [
    (bytes(512), "qcow2", f"{SRC}: disk is raw, but qcow2 was declared"),
    (b"KDMV", "qcow2", f"{SRC}: disk is vmdk, but qcow2 was declared"),
    (b"KDMV", None, f"{SRC}: disk format 'vmdk' is not allowed (only qcow2 or raw)"),
    (b"QFI\xfb\x00\x00\x00\x01", None, f"{SRC}: disk format 'qcow' is not allowed (only qcow2 or raw)"),
    (QCOW2, "vmdk", f"{SRC}: disk format 'vmdk' is not allowed (only qcow2 or raw)"),
])
def test_choose_format_refuses(head: bytes, declared: str | None, message: str) -> None:
    with pytest.raises(FailedPrecondition) as caught:
        choose_format(head, declared, source=SRC)
    assert caught.value.message == message


@pytest.mark.parametrize(("line", "fixed"), [
    ("qemu-img version 7.2.13 (Debian 1:7.2+dfsg-7+deb12u7)", True),
    ("qemu-img version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)", True),
    ("qemu-img version 7.2.12 (Debian 1:7.2+dfsg-7+deb12u6)", False),
    ("qemu-img version 8.0.5", False),
    ("qemu-img version 8.1.5", False),
    ("qemu-img version 8.2.5", False),
    ("qemu-img version 8.2.6", True),
    ("qemu-img version 9.0.1", False),
    ("qemu-img version 9.0.2", True),
    ("qemu-img version 9.1.0", True),
    ("qemu-img version 10.0.3 (Debian 1:10.0.3+ds-0+deb13u1)", True),
    ("qemu-img version 6.2.0 (Debian 1:6.2+dfsg-2ubuntu6.22)", False),
    ("qemu-img version 4.2.1", False),
    ("something else", None),
    ("", None),
])
def test_has_cve_2024_4467_fix(line: str, fixed: bool | None) -> None:
    assert has_cve_2024_4467_fix(line) is fixed
