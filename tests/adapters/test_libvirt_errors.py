"""Classifying libvirt errors (#10 item 14): only a lost connection is UNAVAILABLE and reconnects."""

from __future__ import annotations

import errno
from typing import Any

import libvirt
import pytest

from agent.adapters.libvirt import Libvirt, classify_error
from agent.domain.errors import FailedPrecondition, Internal, NotFound, Unavailable

PERMISSION = ("Cannot access storage file '/var/lib/podvisor/sandboxes/a/disk.qcow2' "
              "(as uid:64055, gid:64055): Permission denied")


@pytest.mark.parametrize(("code", "domain", "sys_errno", "alive", "kind"), [
    # The case of the issue: libvirtd's QEMU user cannot open a disk.
    (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_STORAGE, errno.EACCES, True, "access"),
    (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_QEMU, errno.EPERM, True, "access"),
    (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_STORAGE, errno.ENOENT, True, "other"),
    # A system error of the RPC layer is the connection's ("Cannot write data: Broken pipe").
    (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC, errno.EPIPE, True, "lost"),
    (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_REMOTE, errno.ECONNRESET, True, "lost"),
    (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_FROM_NONE, 0, True, "lost"),
    (libvirt.VIR_ERR_INVALID_CONN, libvirt.VIR_FROM_NONE, 0, True, "lost"),
    (libvirt.VIR_ERR_RPC, libvirt.VIR_FROM_RPC, 0, True, "lost"),
    (libvirt.VIR_ERR_AUTH_FAILED, libvirt.VIR_FROM_NONE, 0, True, "lost"),
    # Any error on a connection that is no longer alive.
    (libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_QEMU, 0, False, "lost"),
    (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_STORAGE, errno.EACCES, False, "lost"),
    # A job or lock timeout: libvirtd is busy, the connection is fine.
    (libvirt.VIR_ERR_OPERATION_TIMEOUT, libvirt.VIR_FROM_QEMU, 0, True, "busy"),
    (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_FROM_QEMU, 0, True, "not_found"),
    (libvirt.VIR_ERR_NO_NETWORK, libvirt.VIR_FROM_NETWORK, 0, True, "not_found"),
    (libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_QEMU, 0, True, "other"),
    (libvirt.VIR_ERR_OPERATION_FAILED, libvirt.VIR_FROM_QEMU, errno.EACCES, True, "other"),
    (libvirt.VIR_ERR_XML_ERROR, libvirt.VIR_FROM_DOMAIN, 0, True, "other"),
])
def test_classify(code: int, domain: int, sys_errno: int, alive: bool, kind: str) -> None:
    assert classify_error(code, domain, sys_errno, alive) == kind


class FakeError:
    def __init__(self, code: int, domain: int, int1: int, message: str) -> None:
        self._v = (code, domain, int1, message)

    def get_error_code(self) -> int:
        return self._v[0]

    def get_error_domain(self) -> int:
        return self._v[1]

    def get_int1(self) -> int:
        return self._v[2]

    def get_error_message(self) -> str:
        return self._v[3]


class FakeConn:
    def __init__(self, alive: bool) -> None:
        self.alive = alive
        self.closed = False

    def isAlive(self) -> int:  # noqa: N802 - libvirt's name
        return int(self.alive)

    def close(self) -> int:
        self.closed = True
        return 0


def _translate(err: FakeError, alive: bool = True) -> tuple[Exception, FakeConn, Libvirt]:
    lv = Libvirt("qemu:///system")
    conn = FakeConn(alive)
    lv._conn = conn
    return lv._translate(err, conn), conn, lv


def test_a_permission_error_is_failed_precondition_naming_the_path_and_keeps_the_connection() -> None:
    exc, conn, lv = _translate(FakeError(libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_STORAGE,
                                         errno.EACCES, PERMISSION))
    assert isinstance(exc, FailedPrecondition)
    assert "/var/lib/podvisor/sandboxes/a/disk.qcow2" in exc.message
    assert "Permission denied" in exc.message
    assert lv._conn is conn and not conn.closed  # no reconnect


def test_a_dropped_connection_is_unavailable_and_reconnects() -> None:
    exc, conn, lv = _translate(FakeError(libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC, errno.EPIPE,
                                         "Cannot write data: Broken pipe"))
    assert isinstance(exc, Unavailable)
    assert exc.message == "libvirt unavailable: Cannot write data: Broken pipe"
    assert lv._conn is None and conn.closed


def test_an_error_on_a_dead_connection_reconnects() -> None:
    exc, conn, lv = _translate(FakeError(libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_QEMU, 0,
                                         "client socket is closed"), alive=False)
    assert isinstance(exc, Unavailable)
    assert lv._conn is None and conn.closed


@pytest.mark.parametrize(("code", "domain", "expected"), [
    (libvirt.VIR_ERR_OPERATION_TIMEOUT, libvirt.VIR_FROM_QEMU, Unavailable),
    (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_FROM_QEMU, NotFound),
    (libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_QEMU, Internal),
])
def test_other_errors_keep_the_connection(code: int, domain: int, expected: type[Exception]) -> None:
    exc, conn, lv = _translate(FakeError(code, domain, 0, "something"))
    assert type(exc) is expected
    assert lv._conn is conn and not conn.closed


def test_is_alive_raising_counts_as_dead() -> None:
    class Broken(FakeConn):
        def isAlive(self) -> Any:  # noqa: N802
            raise libvirt.libvirtError("gone")

    lv = Libvirt("qemu:///system")
    conn = Broken(True)
    lv._conn = conn
    exc = lv._translate(FakeError(libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_QEMU, 0, "x"), conn)
    assert isinstance(exc, Unavailable)
