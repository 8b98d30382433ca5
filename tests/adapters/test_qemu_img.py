"""Running qemu-img (agent.adapters.qemu_img): the exact command lines, the
limits and the unprivileged user they run under, formats never probed, and
the CVE-2024-4467 version check (issue #10, item 13)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.adapters import qemu_img
from agent.domain.disk import CVE_2024_4467_FIXED_TEXT
from agent.domain.errors import FailedPrecondition, Internal
from tests.domain.test_disk_check import SRC, GiB, run


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory nobody:nogroup can enter (pytest's own are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="pv-qemu-img-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def _fake_qemu_img(directory: Path, body: str) -> Path:
    script = directory / "qemu-img"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return script


def _disk(tmp_path: Path, mode: int = 0o644) -> Path:
    path = tmp_path / "x.img"
    path.write_bytes(bytes(4096))
    path.chmod(mode)
    return path


_WHO = 'echo "uid=$(id -u) gid=$(id -g) groups=$(id -G) cpu=$(ulimit -t) as=$(ulimit -v) args=$*" >&2\nexit 1\n'


def _limits(uid: int) -> str:
    return (f"uid={uid} gid={uid} groups={uid} cpu={qemu_img.INFO_CPU_SECONDS} "
            f"as={qemu_img.INFO_ADDRESS_SPACE // 1024}")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can drop to nobody")
def test_info_runs_as_nobody_under_cpu_and_memory_limits(tmp_path: Path, public_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qemu_img, "QEMU_IMG", str(_fake_qemu_img(public_dir, _WHO)))
    with pytest.raises(FailedPrecondition) as caught:
        qemu_img.info(_disk(tmp_path), source=SRC, max_virtual_size=GiB)
    # The disk lies in root's private tmp_path: it is read through the descriptor.
    assert re.fullmatch(
        f"qemu-img info failed: {_limits(65534)} args=info --force-share -f raw --output=json -- /dev/fd/[0-9]+",
        caught.value.message), caught.value.message


@pytest.mark.skipif(os.geteuid() != 0, reason="runs as root only when root")
def test_info_of_a_disk_private_to_root_runs_as_root_under_the_same_limits(
        tmp_path: Path, public_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qemu_img, "QEMU_IMG", str(_fake_qemu_img(public_dir, _WHO)))
    with pytest.raises(FailedPrecondition) as caught:
        qemu_img.info(_disk(tmp_path, 0o600), source=SRC, max_virtual_size=GiB)
    assert caught.value.message.startswith(f"qemu-img info failed: {_limits(0)} args=info --force-share -f raw ")


def test_info_command_line() -> None:
    assert qemu_img.info_command("/dev/fd/7", "qcow2", unprivileged=True) == [
        "prlimit", "--cpu=20", "--as=1073741824", "--",
        "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--no-new-privs", "--",
        "qemu-img", "info", "--force-share", "-f", "qcow2", "--output=json", "--", "/dev/fd/7",
    ]
    assert qemu_img.info_command("/dev/fd/7", "raw", unprivileged=False) == [
        "prlimit", "--cpu=20", "--as=1073741824", "--",
        "qemu-img", "info", "--force-share", "-f", "raw", "--output=json", "--", "/dev/fd/7",
    ]


def test_create_overlay_runs_under_the_same_limits(tmp_path: Path, public_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qemu_img, "QEMU_IMG", str(_fake_qemu_img(public_dir, _WHO)))
    with pytest.raises(FailedPrecondition) as caught:
        qemu_img.create_overlay(tmp_path / "base.raw", "raw", tmp_path / "o.qcow2")
    # As the agent's own user (it writes the overlay into the VM's folder).
    assert caught.value.message.startswith(f"qemu-img create failed: uid={os.geteuid()} ")
    assert caught.value.message.endswith(
        f" cpu={qemu_img.INFO_CPU_SECONDS} as={qemu_img.INFO_ADDRESS_SPACE // 1024} "
        f"args=create -q -f qcow2 -F raw -b {tmp_path / 'base.raw'} {tmp_path / 'o.qcow2'}"
    )


def test_info_never_lets_qemu_img_read_the_data_file_a_qcow2_names(tmp_path: Path) -> None:
    # A real qcow2 whose header names /etc/shadow as its external data file
    # (made with a data file of a name as long, then patched).
    stand_in = Path(f"/tmp/pv{uuid.uuid4().hex[:4]}")
    name, shadow = str(stand_in).encode(), b"/etc/shadow"
    assert len(name) == len(shadow)
    path = tmp_path / "evil.qcow2"
    try:
        run("create", "-q", "-f", "qcow2", "-o", f"data_file={stand_in}", str(path), "1M")
    finally:
        stand_in.unlink(missing_ok=True)
    data = path.read_bytes()
    assert data.count(name) == 1
    path.write_bytes(data.replace(name, shadow))
    before = os.stat("/etc/shadow")
    with pytest.raises(FailedPrecondition) as caught:
        qemu_img.info(path, source=SRC, max_virtual_size=GiB)
    assert caught.value.message == f"{SRC}: refusing a qcow2 with an external data file ({shadow.decode()!r})"
    after = os.stat("/etc/shadow")
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)


def test_info_of_a_file_declared_raw_never_probes_it(tmp_path: Path) -> None:
    # qcow2 bytes naming a backing file, in a file declared raw: raw it is,
    # and qemu-img never looks inside (no backing file is reported).
    path = tmp_path / "x.raw"
    run("create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", "/etc/shadow", str(path), "1M")
    info = qemu_img.info(path, source=SRC, max_virtual_size=GiB, declared_format="raw")
    # (a raw disk's virtual size is its length rounded up to whole sectors)
    assert (info.format, info.virtual_size) == ("raw", -(-path.stat().st_size // 512) * 512)


def test_info_that_hangs_is_stopped(tmp_path: Path, public_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = _fake_qemu_img(public_dir, "exec sleep 30\n")
    monkeypatch.setattr(qemu_img, "QEMU_IMG", str(script))
    monkeypatch.setattr(qemu_img, "INFO_TIMEOUT", 1.0)
    with pytest.raises(FailedPrecondition) as caught:
        qemu_img.info(_disk(tmp_path), source=SRC, max_virtual_size=GiB)
    assert caught.value.message == "qemu-img info took longer than 1s"


def test_info_with_unreadable_answer(tmp_path: Path, public_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = _fake_qemu_img(public_dir, "echo 'qemu-img: warning: not json'\n")
    monkeypatch.setattr(qemu_img, "QEMU_IMG", str(script))
    with pytest.raises(FailedPrecondition) as caught:
        qemu_img.info(_disk(tmp_path), source=SRC, max_virtual_size=GiB)
    assert caught.value.message == f"{SRC}: qemu-img info gave no readable answer"


def test_info_without_qemu_img_installed_is_internal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qemu_img, "QEMU_IMG", str(tmp_path / "no-such-qemu-img"))
    with pytest.raises(Internal, match="qemu-img is not installed"):
        qemu_img.info(_disk(tmp_path), source=SRC, max_virtual_size=GiB)


def test_info_without_prlimit_installed_is_internal(tmp_path: Path, public_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qemu_img, "QEMU_IMG", str(_fake_qemu_img(public_dir, "exit 0\n")))
    monkeypatch.setenv("PATH", str(tmp_path))  # qemu-img is found by its path; prlimit is not found
    with pytest.raises(Internal) as caught:
        qemu_img.info(_disk(tmp_path), source=SRC, max_virtual_size=GiB)
    assert caught.value.message == "prlimit is not installed (Debian package util-linux)"


@pytest.mark.parametrize(("line", "warned"), [
    ("qemu-img version 7.2.12 (Debian 1:7.2+dfsg-7+deb12u6)", True),
    ("qemu-img version 8.1.5", True),
    ("qemu-img version 7.2.13 (Debian 1:7.2+dfsg-7+deb12u7)", False),
    ("qemu-img version 9.2.0", False),
])
def test_version_warning(public_dir: Path, monkeypatch: pytest.MonkeyPatch, line: str, warned: bool) -> None:
    monkeypatch.setattr(qemu_img, "QEMU_IMG", str(_fake_qemu_img(public_dir, f"echo '{line}'\n")))
    warning = qemu_img.version_warning()
    if warned:
        assert warning == (f"qemu-img ({line}): it lacks the fix for CVE-2024-4467; untrusted images need "
                           f"QEMU {CVE_2024_4467_FIXED_TEXT} or later (a distribution backport counts)")
    else:
        assert warning is None


def test_installed_qemu_img_has_the_cve_2024_4467_fix() -> None:
    # The machines this project runs on must carry the fix (Debian 12: deb12u7 or later).
    assert qemu_img.version_warning() is None
