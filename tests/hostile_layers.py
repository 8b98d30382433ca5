"""Hostile layer tarballs shared by the adapter and integration tests."""

from __future__ import annotations

import tarfile
import zlib

_BLOCK = 512


def header_block(name: str, kind: bytes, size: int) -> bytes:
    """One 512-byte tar header of type ``kind`` claiming ``size`` bytes of data."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    return info.tobuf(format=tarfile.GNU_FORMAT)


def gzip_stream(parts: list[bytes], zeros: int = 0) -> bytes:
    """gzip of ``parts`` followed by ``zeros`` zero bytes, compressed as it goes
    (a large run of zeros never exists in memory)."""
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [z.compress(p) for p in parts]
    chunk = bytes(1 << 20)
    while zeros > 0:
        out.append(z.compress(chunk[:min(zeros, len(chunk))]))
        zeros -= len(chunk)
    out.append(z.flush())
    return b"".join(out)


def header_bomb(kind: bytes, claimed: int = 2 << 30, present: int = 64 << 20) -> bytes:
    """A small gzip layer whose first header (GNU long name ``L``, long link
    ``K``, pax ``x`` or global pax ``g``) claims ``claimed`` bytes, followed by
    ``present`` zero bytes: what CPython's tarfile would read into memory."""
    return gzip_stream([header_block("././@LongLink", kind, claimed)], present)


def pax_chain(count: int) -> bytes:
    """An uncompressed tar: ``count`` small pax headers in a row, then a file."""
    record = b"14 comment=abc\n"
    blocks = []
    for i in range(count):
        blocks.append(header_block(f"PaxHeaders/{i}", tarfile.XHDTYPE, len(record)))
        blocks.append(record.ljust(_BLOCK, b"\0"))
    blocks.append(header_block("etc/motd", tarfile.REGTYPE, 0))
    return b"".join(blocks) + bytes(2 * _BLOCK)


def endless_sparse_map(blocks: int) -> bytes:
    """An uncompressed tar: an old GNU sparse header whose extension blocks
    each say another one follows, ``blocks`` of them."""
    head = bytearray(header_block("disk/a.img", tarfile.GNUTYPE_SPARSE, 0))
    head[482] = 1  # isextended
    head[148:156] = b" " * 8  # the checksum counts its own field as spaces
    head[148:156] = b"%06o\0 " % sum(head)
    ext = bytearray(_BLOCK)
    ext[504] = 1
    return bytes(head) + bytes(ext) * blocks
