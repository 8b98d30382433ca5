"""A full filesystem is RESOURCE_EXHAUSTED, never INTERNAL or a corrupt-input
error: the adapters that write (blobs, layers, base disks, overlays, seeds,
the database) turn ENOSPC/EDQUOT into :class:`ResourceExhausted` naming what
could not be written and where, so an operator knows which filesystem to free.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from agent.domain.errors import ResourceExhausted

NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# What qemu-img prints when a write fails for lack of space.
NO_SPACE_TEXT = os.strerror(errno.ENOSPC)


def is_no_space(exc: BaseException) -> bool:
    """Whether ``exc`` says a filesystem (or a quota) is full."""
    if isinstance(exc, OSError):
        return exc.errno in NO_SPACE_ERRNOS
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
    return False


def exhausted(what: str, where: object) -> ResourceExhausted:
    """The error for ``what`` failing because the filesystem of ``where`` is full."""
    return ResourceExhausted(
        f"no space left on the filesystem of {where} while {what}; free space there (remove unused "
        "images or pods) and retry")


@contextmanager
def no_space_is_exhausted(what: str, where: object) -> Iterator[None]:
    """Turn a full filesystem inside the block into :func:`exhausted`."""
    try:
        yield
    except (OSError, sqlite3.Error) as exc:
        if is_no_space(exc):
            raise exhausted(what, where) from None
        raise
