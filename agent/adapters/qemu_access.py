"""Can libvirt's QEMU user reach the agent's directories? Checked once, at start.

libvirt runs system QEMU as an unprivileged user (``libvirt-qemu`` on Debian,
``user``/``group`` in /etc/libvirt/qemu.conf). It chowns the disk files it is
given, but not the directories above them: every directory from ``/`` down to
``state_dir`` (the VMs' overlays and seeds) and ``runtime_dir`` (their serial
sockets) needs search (x) permission for that user, through the owner, group
or other bits or a POSIX ACL. Otherwise every StartContainer fails with
"Cannot access storage file … Permission denied". The agent refuses to start
instead, naming the directory and the fix.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

QEMU_CONF = Path("/etc/libvirt/qemu.conf")
# Debian's build default, used when qemu.conf leaves user/group commented out.
DEFAULT_USER = "libvirt-qemu"
DEFAULT_GROUP = "libvirt-qemu"

_SETTING = re.compile(r'^\s*(user|group)\s*=\s*"([^"]*)"\s*(#.*)?$')

# POSIX ACL xattr (system.posix_acl_access): a 4-byte version, then entries of
# (tag u16, perm u16, id u32), little-endian.
_ACL_VERSION = 2
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_MASK, _ACL_OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_X = 1


@dataclass(frozen=True)
class QemuIdentity:
    """The user and groups QEMU runs with."""

    name: str
    uid: int
    gids: frozenset[int]


@dataclass(frozen=True)
class AclEntry:
    tag: int
    perm: int
    id: int


def qemu_conf_settings(text: str) -> dict[str, str]:
    """The uncommented ``user`` and ``group`` settings of a qemu.conf."""
    out = {}
    for line in text.splitlines():
        m = _SETTING.match(line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def _uid(user: str) -> tuple[int, int, str]:
    """uid, primary gid and name for ``user`` ("name" or "+uid"); KeyError if unknown."""
    if user.startswith("+"):
        uid = int(user[1:])
        try:
            pw = pwd.getpwuid(uid)
            return uid, pw.pw_gid, pw.pw_name
        except KeyError:
            return uid, -1, user
    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid, pw.pw_name


def _gid(group: str) -> int:
    return int(group[1:]) if group.startswith("+") else grp.getgrnam(group).gr_gid


def qemu_identity(conf: Path = QEMU_CONF) -> QemuIdentity | None:
    """Who libvirt runs QEMU as; None when that user does not exist here."""
    try:
        settings = qemu_conf_settings(conf.read_text(errors="replace"))
    except OSError:
        settings = {}
    try:
        uid, primary, name = _uid(settings.get("user", DEFAULT_USER))
        gid = _gid(settings.get("group", DEFAULT_GROUP))
    except (KeyError, ValueError):
        return None
    # libvirt gives QEMU the configured group plus the user's supplementary groups.
    gids = {gid}
    if primary >= 0:
        gids.update(os.getgrouplist(name, primary))
    return QemuIdentity(name=name, uid=uid, gids=frozenset(gids))


def parse_acl(raw: bytes) -> tuple[AclEntry, ...]:
    """Entries of a ``system.posix_acl_access`` value; () for a malformed one."""
    if len(raw) < 4 or (len(raw) - 4) % 8 or struct.unpack_from("<I", raw)[0] != _ACL_VERSION:
        return ()
    return tuple(AclEntry(*struct.unpack_from("<HHI", raw, off)) for off in range(4, len(raw), 8))


def may_search(mode: int, owner: int, group: int, acl: tuple[AclEntry, ...], who: QemuIdentity) -> bool:
    """POSIX access check for search (x) permission on a directory (acl(5))."""
    if who.uid == 0:
        return True
    if not acl:
        if who.uid == owner:
            return bool(mode & stat.S_IXUSR)
        if group in who.gids:
            return bool(mode & stat.S_IXGRP)
        return bool(mode & stat.S_IXOTH)
    mask = next((e.perm for e in acl if e.tag == _ACL_MASK), 7)
    if who.uid == owner:
        return bool(next((e.perm for e in acl if e.tag == _ACL_USER_OBJ), 0) & _X)
    named = [e for e in acl if e.tag == _ACL_USER and e.id == who.uid]
    if named:
        return bool(named[0].perm & mask & _X)
    groups = [e for e in acl if (e.tag == _ACL_GROUP_OBJ and group in who.gids)
              or (e.tag == _ACL_GROUP and e.id in who.gids)]
    if groups:
        return any(e.perm & mask & _X for e in groups)
    return bool(next((e.perm for e in acl if e.tag == _ACL_OTHER), 0) & _X)


def _acl(path: Path) -> tuple[AclEntry, ...]:
    try:
        return parse_acl(os.getxattr(path, "system.posix_acl_access"))
    except OSError:
        return ()  # no ACL, or a filesystem without ACLs: the mode bits decide


def first_blocked(path: Path, who: QemuIdentity) -> Path | None:
    """The first directory from ``/`` down to ``path`` that ``who`` cannot search.

    Parts of ``path`` that do not exist yet are skipped (the agent creates them
    0711). Symlinks are followed, as QEMU would follow them.
    """
    current = Path("/")
    for part in ("/", *Path(os.path.realpath(path)).relative_to("/").parts):
        current = current / part
        try:
            st = os.stat(current)
        except FileNotFoundError:
            return None
        if stat.S_ISDIR(st.st_mode) and not may_search(st.st_mode, st.st_uid, st.st_gid, _acl(current), who):
            return current
    return None


def traversal_problem(directories: dict[str, Path], conf: Path = QEMU_CONF) -> str | None:
    """A message for the first of ``directories`` (setting → path) QEMU's user cannot reach, else None."""
    who = qemu_identity(conf)
    if who is None:
        return None  # no such user here: libvirt is not a local system QEMU, nothing to check
    for setting, directory in directories.items():
        blocked = first_blocked(directory, who)
        if blocked is not None:
            return (f"QEMU runs as {who.name} (uid {who.uid}), which cannot traverse {blocked} on the way to "
                    f"{setting} {directory}: VMs would fail to start with 'Permission denied'. Fix: "
                    f"`chmod o+x {blocked}` or `setfacl -m u:{who.name}:x {blocked}`, or choose a {setting} "
                    f"whose every parent directory is searchable (x) by {who.name}")
    return None


def local_system_qemu(uri: str) -> bool:
    """Whether ``uri`` is this host's system QEMU driver (the one that runs QEMU as its user)."""
    return uri.split("?", 1)[0] in ("qemu:///system", "qemu+unix:///system")
