"""Bounds on what CPython's tarfile reads into memory for tar headers.

tarfile reads a GNU long name or long link (``././@LongLink``, types ``L``
and ``K``) and a pax extended header (``x``, ``g``) whole into memory, with
the size the header claims, before anything can look at it: a 300 KB gzip
layer whose long-name header claims gigabytes makes the agent allocate
gigabytes. Old GNU sparse headers (``S``) and pax sparse maps are read in a
loop as long as the stream says more follows; each extension header makes
tarfile recurse once more.

``HeaderGuard`` sits between the decompressed layer and tarfile and bounds
all of it before tarfile allocates anything:

- every header block tarfile parses goes through ``GuardedTarInfo.frombuf``
  (tarfile's own public hook, ``tarfile.open(tarinfo=...)``), which refuses a
  long-name, long-link or pax header larger than ``MAX_EXTENSION_HEADER``
  and more than ``MAX_EXTENSION_CHAIN`` extension headers in a row, from the
  512-byte header block alone;
- the reader refuses to hand tarfile more than ``MAX_HEADER_BYTES`` past the
  end of the last entry's data: whatever tarfile reads between two entries
  (headers, sparse maps) is bounded, whatever the header type.

Entry data (read by the extractor, or skipped by tarfile) lies before the
next header and is never limited here.
"""

from __future__ import annotations

import io
import tarfile
from typing import Any

# One GNU long name / long link or pax header's data. Names are at most
# PATH_MAX (4 KiB) on Linux; pax records of real images are a few hundred bytes.
MAX_EXTENSION_HEADER = 64 << 10
# Extension headers before one entry: a global pax header, a pax header, a
# long name and a long link make four in the worst real case.
MAX_EXTENSION_CHAIN = 16
# Everything tarfile may read between the end of one entry's data and the
# start of the next one's (headers, extension headers, sparse maps).
MAX_HEADER_BYTES = 1 << 20

_EXTENSIONS = {
    tarfile.GNUTYPE_LONGNAME: "GNU long name",
    tarfile.GNUTYPE_LONGLINK: "GNU long link",
    tarfile.XHDTYPE: "pax",
    tarfile.XGLTYPE: "pax global",
    tarfile.SOLARIS_XHDTYPE: "Solaris extended",
}


class HeaderRefused(Exception):
    """A tar header beyond the bounds above (the caller names image and layer)."""


class HeaderGuard(io.RawIOBase):
    """The reader tarfile reads a layer through; see the module docstring.

    ``bufsize`` is tarfile's read size: it reads that much ahead of what it
    parses, so the bound on delivered bytes leaves room for it.
    """

    def __init__(self, raw: Any, bufsize: int) -> None:
        super().__init__()
        self._raw = raw
        self._slack = MAX_HEADER_BYTES + 2 * bufsize
        self._pos = 0
        self._limit = self._slack
        self._chain = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self._pos >= self._limit:
            raise HeaderRefused(
                f"the tar headers before one entry take more than {MAX_HEADER_BYTES} bytes"
            )
        data: bytes = self._raw.read(size if size >= 0 else self._limit - self._pos)
        self._pos += len(data)
        return data

    def entry_read(self, next_header: int) -> None:
        """tarfile returned an entry; its next header starts at ``next_header``."""
        self._limit = next_header + self._slack

    def header(self, info: tarfile.TarInfo) -> None:
        """Judge one parsed 512-byte header block before tarfile acts on it."""
        kind = _EXTENSIONS.get(info.type)
        if kind is None:
            self._chain = 0
            return
        if info.size > MAX_EXTENSION_HEADER:
            raise HeaderRefused(
                f"a {kind} header claims {info.size} bytes (at most {MAX_EXTENSION_HEADER} are allowed)"
            )
        self._chain += 1
        if self._chain > MAX_EXTENSION_CHAIN:
            raise HeaderRefused(f"more than {MAX_EXTENSION_CHAIN} extension headers in a row")


def open_guarded(plain: Any, bufsize: int) -> tuple[tarfile.TarFile, HeaderGuard]:
    """A streaming TarFile over ``plain`` whose headers ``HeaderGuard`` bounds."""
    guard = HeaderGuard(plain, bufsize)

    class GuardedTarInfo(tarfile.TarInfo):
        @classmethod
        def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Any:
            info = super().frombuf(buf, encoding, errors)
            guard.header(info)
            return info

    tar = tarfile.open(fileobj=guard, mode="r|", bufsize=bufsize, tarinfo=GuardedTarInfo)
    return tar, guard


def entries(tar: tarfile.TarFile, guard: HeaderGuard) -> Any:
    """tar's entries, one at a time, without tarfile's list of every entry
    (a layer of millions of empty entries must not grow the agent)."""
    for member in tar:
        guard.entry_read(tar.offset)
        tar.members.clear()  # type: ignore[attr-defined]  # a plain list; the stub omits it
        yield member
