"""The start-up check that libvirt's QEMU user can traverse state_dir and runtime_dir (#10 item 14)."""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.adapters.qemu_access import (
    AclEntry,
    QemuIdentity,
    first_blocked,
    local_system_qemu,
    may_search,
    parse_acl,
    qemu_conf_settings,
    qemu_identity,
    traversal_problem,
)

QEMU = QemuIdentity(name="libvirt-qemu", uid=64055, gids=frozenset({64055, 108}))
OTHER_UID, OTHER_GID = 1000, 1000
UO, U, GO, G, M, OTH = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


@pytest.mark.parametrize(("text", "expected"), [
    ("", {}),
    ('#user = "libvirt-qemu"\n#group = "libvirt-qemu"\n', {}),
    ('user = "root"\ngroup = "root"\n', {"user": "root", "group": "root"}),
    ('  user = "+0"   # numeric\n', {"user": "+0"}),
    ('dynamic_ownership = 1\nuser="qemu"\n', {"user": "qemu"}),
])
def test_qemu_conf_settings(text: str, expected: dict[str, str]) -> None:
    assert qemu_conf_settings(text) == expected


def test_identity_from_qemu_conf(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    conf.write_text('user = "root"\ngroup = "root"\n')
    who = qemu_identity(conf)
    assert who is not None and who.uid == 0 and 0 in who.gids
    conf.write_text('user = "+0"\n# group = "x"\ngroup = "+0"\n')
    who = qemu_identity(conf)
    assert who is not None and who.uid == 0
    conf.write_text('user = "no-such-user-podvisor"\n')
    assert qemu_identity(conf) is None


@pytest.mark.parametrize(("mode", "owner", "group", "allowed"), [
    (0o711, OTHER_UID, OTHER_GID, True),      # other x
    (0o755, OTHER_UID, OTHER_GID, True),
    (0o700, OTHER_UID, OTHER_GID, False),     # the issue: a 0700 parent
    (0o770, OTHER_UID, OTHER_GID, False),     # group x, not QEMU's group
    (0o710, OTHER_UID, 108, True),            # group x through a supplementary group (kvm)
    (0o710, OTHER_UID, 64055, True),
    (0o701, OTHER_UID, 108, False),           # group class matches: other bits do not apply
    (0o100, 64055, OTHER_GID, True),          # owner x
    (0o611, 64055, OTHER_GID, False),         # owner class matches, no x for owner
])
def test_mode_bits(mode: int, owner: int, group: int, allowed: bool) -> None:
    assert may_search(0o040000 | mode, owner, group, (), QEMU) is allowed


def _acl(*entries: tuple[int, int, int]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


@pytest.mark.parametrize(("entries", "allowed"), [
    # named user entry grants x despite other having none (setfacl -m u:libvirt-qemu:x)
    (((UO, 7, 0xFFFFFFFF), (U, 1, 64055), (GO, 0, 0xFFFFFFFF), (M, 1, 0xFFFFFFFF), (OTH, 0, 0xFFFFFFFF)), True),
    # ... but the mask can take it away
    (((UO, 7, 0xFFFFFFFF), (U, 1, 64055), (GO, 0, 0xFFFFFFFF), (M, 0, 0xFFFFFFFF), (OTH, 1, 0xFFFFFFFF)), False),
    # named group entry for kvm
    (((UO, 7, 0xFFFFFFFF), (GO, 0, 0xFFFFFFFF), (G, 1, 108), (M, 1, 0xFFFFFFFF), (OTH, 0, 0xFFFFFFFF)), True),
    # named entries for others only: the other entry decides
    (((UO, 7, 0xFFFFFFFF), (U, 1, 4242), (GO, 0, 0xFFFFFFFF), (M, 7, 0xFFFFFFFF), (OTH, 0, 0xFFFFFFFF)), False),
    (((UO, 7, 0xFFFFFFFF), (U, 0, 4242), (GO, 0, 0xFFFFFFFF), (M, 7, 0xFFFFFFFF), (OTH, 1, 0xFFFFFFFF)), True),
])
def test_acls(entries: tuple[tuple[int, int, int], ...], allowed: bool) -> None:
    acl = parse_acl(_acl(*entries))
    assert len(acl) == len(entries)
    assert may_search(0o040700, OTHER_UID, OTHER_GID, acl, QEMU) is allowed


def test_parse_acl_refuses_malformed_values() -> None:
    assert parse_acl(b"") == ()
    assert parse_acl(struct.pack("<I", 1) + struct.pack("<HHI", OTH, 1, 0)) == ()  # unknown version
    assert parse_acl(_acl((OTH, 1, 0))[:-1]) == ()  # truncated
    assert parse_acl(_acl((OTH, 1, 0))) == (AclEntry(OTH, 1, 0),)


def test_root_passes_everywhere() -> None:
    root = QemuIdentity(name="root", uid=0, gids=frozenset({0}))
    assert may_search(0o040000, OTHER_UID, OTHER_GID, (), root)


@pytest.fixture
def tree() -> Iterator[Path]:
    top = Path(tempfile.mkdtemp(prefix="pv-qa-", dir="/var/tmp"))
    top.chmod(0o711)
    try:
        yield top
    finally:
        shutil.rmtree(top)


def test_first_blocked_names_the_untraversable_parent(tree: Path) -> None:
    state = tree / "locked" / "state"
    state.mkdir(parents=True)
    (tree / "locked").chmod(0o700)
    assert first_blocked(state, QEMU) == tree / "locked"
    (tree / "locked").chmod(0o711)
    assert first_blocked(state, QEMU) is None
    state.chmod(0o700)
    assert first_blocked(state, QEMU) == state  # the directory itself must be searchable too
    # Parts not made yet are skipped: the agent creates them 0711.
    state.chmod(0o711)
    assert first_blocked(state / "not" / "yet", QEMU) is None


def test_symlinks_are_followed_to_the_real_directory(tree: Path) -> None:
    real = tree / "hidden" / "real"
    real.mkdir(parents=True)
    (tree / "hidden").chmod(0o700)
    os.symlink(real, tree / "link")
    assert first_blocked(tree / "link", QEMU) == tree / "hidden"


def test_traversal_problem_message_names_directory_and_fix(tree: Path, tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    conf.write_text('user = "nobody"\n')
    (tree / "locked" / "state").mkdir(parents=True)
    (tree / "locked").chmod(0o700)
    problem = traversal_problem({"state_dir": tree / "locked" / "state", "runtime_dir": tree}, conf)
    assert problem is not None
    assert f"cannot traverse {tree / 'locked'} on the way to state_dir {tree / 'locked' / 'state'}" in problem
    assert f"chmod o+x {tree / 'locked'}" in problem and "QEMU runs as nobody" in problem
    (tree / "locked").chmod(0o711)
    assert traversal_problem({"state_dir": tree / "locked" / "state", "runtime_dir": tree}, conf) is None


@pytest.mark.parametrize(("uri", "local"), [
    ("qemu:///system", True), ("qemu+unix:///system", True), ("qemu:///system?socket=/x", True),
    ("qemu:///session", False), ("qemu+ssh://host/system", False), ("test:///default", False),
])
def test_only_the_local_system_driver_is_checked(uri: str, local: bool) -> None:
    assert local_system_qemu(uri) is local
