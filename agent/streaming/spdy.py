"""SPDY/3.1 framing, the wire format under Kubernetes' exec, attach and
port-forward streams (kubectl, kubelet and crictl all speak it through the
Go library github.com/moby/spdystream).

Pure and I/O-free: frame values, an `Encoder` that turns them into bytes, a
`Decoder` fed with whatever a socket returned that hands back complete frames,
and `FlowControl`, the window arithmetic of SPDY/3.1. The server that owns
sockets and streams builds on these.

Wire format (SPDY draft 3 and 3.1, all integers big-endian):

- control frame: 1 bit set, 15-bit version (3), 16-bit type, 8-bit flags,
  24-bit payload length, payload;
- data frame: 1 bit clear, 31-bit stream id, 8-bit flags (FIN), 24-bit
  length, payload.

SYN_STREAM, SYN_REPLY and HEADERS carry a name/value block: a 32-bit count,
then per name a 32-bit length and the lowercase name, a 32-bit length and the
value; several values of one name are joined with NUL. The blocks of one
direction form a single zlib stream, primed with the dictionary from the
spec, and every block ends with a sync flush. Because that context spans the
whole connection, a block that cannot be decompressed breaks the session.

Errors the peer caused are `SessionError` (answer with GOAWAY and close) or
`StreamError` (answer with RST_STREAM; the decoder stays usable). Limits on
frame length and on the decompressed size of a header block keep a hostile
peer from making the decoder buffer or inflate without bound.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

VERSION = 3
FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02  # SYN_STREAM only
FLAG_CLEAR_SETTINGS = 0x01  # SETTINGS only
SETTING_PERSIST_VALUE = 0x01
SETTING_PERSISTED = 0x02

MAX_LENGTH = 0xFFFFFF  # 24-bit length field
MAX_STREAM_ID = 0x7FFFFFFF
MAX_WINDOW = 0x7FFFFFFF
INITIAL_WINDOW = 64 * 1024  # stream windows and, in 3.1, the session window

DEFAULT_MAX_FRAME_LENGTH = 1 << 20
DEFAULT_MAX_HEADER_BLOCK = 64 * 1024


class FrameType(IntEnum):
    SYN_STREAM = 1
    SYN_REPLY = 2
    RST_STREAM = 3
    SETTINGS = 4
    PING = 6
    GOAWAY = 7
    HEADERS = 8
    WINDOW_UPDATE = 9


class RstStatus(IntEnum):
    PROTOCOL_ERROR = 1
    INVALID_STREAM = 2
    REFUSED_STREAM = 3
    UNSUPPORTED_VERSION = 4
    CANCEL = 5
    INTERNAL_ERROR = 6
    FLOW_CONTROL_ERROR = 7
    STREAM_IN_USE = 8
    STREAM_ALREADY_CLOSED = 9
    FRAME_TOO_LARGE = 11


class GoAwayStatus(IntEnum):
    OK = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2


class SettingId(IntEnum):
    UPLOAD_BANDWIDTH = 1
    DOWNLOAD_BANDWIDTH = 2
    ROUND_TRIP_TIME = 3
    MAX_CONCURRENT_STREAMS = 4
    CURRENT_CWND = 5
    DOWNLOAD_RETRANS_RATE = 6
    INITIAL_WINDOW_SIZE = 7
    CLIENT_CERTIFICATE_VECTOR_SIZE = 8


class SpdyError(Exception):
    """The peer broke the protocol."""


class SessionError(SpdyError):
    """Fatal for the connection: send GOAWAY with `status`, then close."""

    def __init__(self, message: str, status: GoAwayStatus = GoAwayStatus.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.status = status


class StreamError(SpdyError):
    """Fatal for one stream: send RST_STREAM(`stream_id`, `status`)."""

    def __init__(self, stream_id: int, message: str, status: RstStatus = RstStatus.PROTOCOL_ERROR) -> None:
        super().__init__(f"stream {stream_id}: {message}")
        self.stream_id = stream_id
        self.status = status


# The zlib dictionary of SPDY/3 (draft 3, section 2.6.10.1): 65 words, each
# with a 32-bit length in front, then one run of bare text (1423 bytes).
_DICTIONARY_WORDS = (
    "options,head,post,put,delete,trace,accept,accept-charset,accept-encoding,accept-language,accept-ranges,age,"
    "allow,authorization,cache-control,connection,content-base,content-encoding,content-language,content-length,"
    "content-location,content-md5,content-range,content-type,date,etag,expect,expires,from,host,if-match,"
    "if-modified-since,if-none-match,if-range,if-unmodified-since,last-modified,location,max-forwards,pragma,"
    "proxy-authenticate,proxy-authorization,range,referer,retry-after,server,te,trailer,transfer-encoding,upgrade,"
    "user-agent,vary,via,warning,www-authenticate,method,get,status,200 OK,version,HTTP/1.1,url,public,set-cookie,"
    "keep-alive,origin"
)
_DICTIONARY_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized"
    "403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service Unavailable"
    "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT"
    "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,"
    "text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)


def _build_dictionary() -> bytes:
    words = [w.encode() for w in _DICTIONARY_WORDS.split(",")]
    return b"".join(struct.pack(">I", len(w)) + w for w in words) + _DICTIONARY_TAIL.encode()


DICTIONARY = _build_dictionary()

HeaderList = tuple[tuple[str, str], ...]


def _check_stream_id(stream_id: int, *, zero_ok: bool = False) -> None:
    if not (0 if zero_ok else 1) <= stream_id <= MAX_STREAM_ID:
        raise ValueError(f"stream id {stream_id} out of range")


@dataclass(frozen=True)
class Data:
    stream_id: int
    data: bytes = b""
    fin: bool = False

    def __post_init__(self) -> None:
        _check_stream_id(self.stream_id)
        if len(self.data) > MAX_LENGTH:
            raise ValueError("data frame longer than 2^24-1 bytes")


@dataclass(frozen=True)
class SynStream:
    stream_id: int
    headers: HeaderList = ()
    associated_to: int = 0
    priority: int = 0  # 0 (highest) to 7
    slot: int = 0
    fin: bool = False
    unidirectional: bool = False

    def __post_init__(self) -> None:
        _check_stream_id(self.stream_id)
        _check_stream_id(self.associated_to, zero_ok=True)
        if not 0 <= self.priority <= 7 or not 0 <= self.slot <= 0xFF:
            raise ValueError("priority must be 0..7 and slot 0..255")


@dataclass(frozen=True)
class _HeaderBlockFrame:
    """A stream id and a header block: the layout SYN_REPLY and HEADERS share."""

    frame_type: ClassVar[FrameType]
    stream_id: int
    headers: HeaderList = ()
    fin: bool = False

    def __post_init__(self) -> None:
        _check_stream_id(self.stream_id)


@dataclass(frozen=True)
class SynReply(_HeaderBlockFrame):
    frame_type: ClassVar[FrameType] = FrameType.SYN_REPLY


@dataclass(frozen=True)
class RstStream:
    stream_id: int
    status: int

    def __post_init__(self) -> None:
        _check_stream_id(self.stream_id)
        if not 1 <= self.status <= 0xFFFFFFFF:
            raise ValueError("RST_STREAM status must be non-zero")


@dataclass(frozen=True)
class Setting:
    id: int
    value: int
    flags: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.id <= MAX_LENGTH or not 0 <= self.value <= 0xFFFFFFFF or not 0 <= self.flags <= 0xFF:
            raise ValueError("setting id is 24-bit, value 32-bit, flags 8-bit")


@dataclass(frozen=True)
class Settings:
    entries: tuple[Setting, ...] = ()
    clear: bool = False


@dataclass(frozen=True)
class Ping:
    ping_id: int  # odd from the client, even from the server

    def __post_init__(self) -> None:
        if not 0 <= self.ping_id <= 0xFFFFFFFF:
            raise ValueError("ping id is 32-bit")


@dataclass(frozen=True)
class GoAway:
    last_good_stream_id: int
    status: int = GoAwayStatus.OK

    def __post_init__(self) -> None:
        _check_stream_id(self.last_good_stream_id, zero_ok=True)
        if not 0 <= self.status <= 0xFFFFFFFF:
            raise ValueError("GOAWAY status is 32-bit")


@dataclass(frozen=True)
class Headers(_HeaderBlockFrame):
    frame_type: ClassVar[FrameType] = FrameType.HEADERS


@dataclass(frozen=True)
class WindowUpdate:
    stream_id: int  # 0: the session window (SPDY/3.1)
    delta: int

    def __post_init__(self) -> None:
        _check_stream_id(self.stream_id, zero_ok=True)
        if not 1 <= self.delta <= MAX_WINDOW:
            raise ValueError("window delta must be 1..2^31-1")


Frame = Data | SynStream | SynReply | RstStream | Settings | Ping | GoAway | Headers | WindowUpdate


def pack_header_block(headers: Iterable[tuple[str, str]]) -> bytes:
    """The uncompressed name/value block; names are lowercased and repeated
    names merged into one NUL-joined value, in order of first appearance."""
    merged: dict[str, list[str]] = {}
    for name, value in headers:
        if not name or "\0" in name or "\0" in value:
            raise ValueError(f"invalid header {name!r}")
        merged.setdefault(name.lower(), []).append(value)
    parts = [struct.pack(">I", len(merged))]
    for name, values in merged.items():
        raw_name, raw_value = name.encode(), "\0".join(values).encode()
        parts += [struct.pack(">I", len(raw_name)), raw_name, struct.pack(">I", len(raw_value)), raw_value]
    return b"".join(parts)


def unpack_header_block(block: bytes, stream_id: int = 0) -> HeaderList:
    """The inverse of `pack_header_block`: one (name, value) pair per value.
    A malformed block is a `StreamError` (the zlib context is intact)."""

    def bad(why: str) -> StreamError:
        return StreamError(stream_id, f"bad header block: {why}")

    view, pos = memoryview(block), 0

    def take() -> bytes:
        nonlocal pos
        if pos + 4 > len(view):
            raise bad("truncated")
        (size,) = struct.unpack_from(">I", view, pos)
        if pos + 4 + size > len(view):
            raise bad("truncated")
        pos += 4 + size
        return bytes(view[pos - size : pos])

    if len(view) < 4:
        raise bad("truncated")
    (count,) = struct.unpack_from(">I", view, 0)
    pos = 4
    if count * 8 > len(view) - 4:
        raise bad("more names than the block can hold")
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    try:
        for _ in range(count):
            name, value = take().decode(), take().decode()
            if not name or name != name.lower() or name in seen or "\0" in name:
                raise bad(f"empty, uppercase or repeated name {name!r}")
            seen.add(name)
            pairs += [(name, v) for v in value.split("\0")]
    except UnicodeDecodeError as exc:
        raise bad("not UTF-8") from exc
    if pos != len(view):
        raise bad("trailing bytes")
    return tuple(pairs)


class HeaderCompressor:
    """The sending direction's zlib context; one per connection."""

    def __init__(self, level: int = zlib.Z_BEST_COMPRESSION) -> None:
        self._z = zlib.compressobj(level, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY, DICTIONARY)

    def compress(self, headers: Iterable[tuple[str, str]]) -> bytes:
        return self._z.compress(pack_header_block(headers)) + self._z.flush(zlib.Z_SYNC_FLUSH)


class HeaderDecompressor:
    """The receiving direction's zlib context, refusing any block that would
    inflate beyond `max_size` bytes (checked while inflating, not after)."""

    def __init__(self, max_size: int = DEFAULT_MAX_HEADER_BLOCK) -> None:
        self.max_size = max_size
        self._z = zlib.decompressobj(zdict=DICTIONARY)

    def decompress(self, block: bytes) -> bytes:
        try:
            out = self._z.decompress(block, self.max_size + 1)
        except zlib.error as exc:
            raise SessionError(f"header block does not inflate: {exc}") from exc
        if len(out) > self.max_size or self._z.unconsumed_tail:
            raise SessionError(f"header block inflates beyond {self.max_size} bytes")
        if self._z.eof:
            raise SessionError("header compression stream ended")
        return out


def _control(kind: FrameType, flags: int, payload: bytes) -> bytes:
    if len(payload) > MAX_LENGTH:
        raise ValueError("control frame longer than 2^24-1 bytes")
    return struct.pack(">HHI", 0x8000 | VERSION, kind, flags << 24 | len(payload)) + payload


class Encoder:
    """Frames to bytes for one connection (it owns the outgoing header
    compression context, so frames must be sent in the order encoded)."""

    def __init__(self, compression_level: int = zlib.Z_BEST_COMPRESSION) -> None:
        self._headers = HeaderCompressor(compression_level)

    def encode(self, frame: Frame) -> bytes:
        match frame:
            case Data(stream_id, data, fin):
                return struct.pack(">II", stream_id, (FLAG_FIN if fin else 0) << 24 | len(data)) + data
            case SynStream():
                flags = (FLAG_FIN if frame.fin else 0) | (FLAG_UNIDIRECTIONAL if frame.unidirectional else 0)
                fixed = struct.pack(">IIBB", frame.stream_id, frame.associated_to, frame.priority << 5, frame.slot)
                return _control(FrameType.SYN_STREAM, flags, fixed + self._headers.compress(frame.headers))
            case _HeaderBlockFrame(stream_id, headers, fin):  # SynReply, Headers
                block = struct.pack(">I", stream_id) + self._headers.compress(headers)
                return _control(frame.frame_type, FLAG_FIN if fin else 0, block)
            case RstStream(stream_id, status):
                return _control(FrameType.RST_STREAM, 0, struct.pack(">II", stream_id, status))
            case Settings(entries, clear):
                body = b"".join(struct.pack(">II", s.flags << 24 | s.id, s.value) for s in entries)
                return _control(
                    FrameType.SETTINGS, FLAG_CLEAR_SETTINGS if clear else 0, struct.pack(">I", len(entries)) + body
                )
            case Ping(ping_id):
                return _control(FrameType.PING, 0, struct.pack(">I", ping_id))
            case GoAway(last_good, status):
                return _control(FrameType.GOAWAY, 0, struct.pack(">II", last_good, status))
            case WindowUpdate(stream_id, delta):
                return _control(FrameType.WINDOW_UPDATE, 0, struct.pack(">II", stream_id, delta))
        raise TypeError(f"not a SPDY frame: {frame!r}")


_FIXED_LENGTH = {FrameType.RST_STREAM: 8, FrameType.PING: 4, FrameType.GOAWAY: 8, FrameType.WINDOW_UPDATE: 8}
_MIN_LENGTH = {FrameType.SYN_STREAM: 10, FrameType.SYN_REPLY: 4, FrameType.HEADERS: 4, FrameType.SETTINGS: 4}


class Decoder:
    """Bytes to frames for one connection. `feed` what the socket gave, then
    take frames with `next_frame` (None: need more bytes) or by iterating.

    A `StreamError` leaves the decoder usable (take the next frame after
    resetting that stream); a `SessionError` does not. Data frames longer
    than `max_frame_length` are skipped and reported as a FRAME_TOO_LARGE
    stream error; longer control frames end the session, since a skipped
    header block would desynchronise the zlib context. Unknown control frame
    types are ignored, as the spec asks."""

    def __init__(
        self, max_frame_length: int = DEFAULT_MAX_FRAME_LENGTH, max_header_block: int = DEFAULT_MAX_HEADER_BLOCK
    ) -> None:
        self.max_frame_length = max_frame_length
        self._headers = HeaderDecompressor(max_header_block)
        self._buf = bytearray()
        self._pos = 0
        self._skip = 0  # bytes of a refused data frame still to discard
        self._broken: SessionError | None = None

    def feed(self, data: bytes) -> None:
        self._buf += data

    def __iter__(self) -> Iterator[Frame]:
        while (frame := self.next_frame()) is not None:
            yield frame

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def next_frame(self) -> Frame | None:
        if self._broken is not None:
            raise self._broken
        try:
            return self._next()
        except SessionError as exc:
            self._broken = exc
            raise
        finally:
            if self._pos > 65536 and self._pos * 2 > len(self._buf):
                del self._buf[: self._pos]
                self._pos = 0

    def _next(self) -> Frame | None:
        while True:
            if self._skip:
                dropped = min(self._skip, self.buffered)
                self._pos += dropped
                self._skip -= dropped
                if self._skip:
                    return None
            if self.buffered < 8:
                return None
            word, flags_length = struct.unpack_from(">II", self._buf, self._pos)
            flags, length, control = flags_length >> 24, flags_length & MAX_LENGTH, bool(word & 0x80000000)
            if not control and word == 0:
                raise SessionError("data frame on stream 0")
            if control and (word >> 16) & 0x7FFF != VERSION:
                raise SessionError(f"SPDY version {(word >> 16) & 0x7FFF}")
            if length > self.max_frame_length:
                if control:
                    raise SessionError(f"control frame of {length} bytes")
                self._pos, self._skip = self._pos + 8, length
                raise StreamError(word, f"data frame of {length} bytes", RstStatus.FRAME_TOO_LARGE)
            if self.buffered < 8 + length:
                return None
            payload = bytes(self._buf[self._pos + 8 : self._pos + 8 + length])
            self._pos += 8 + length
            if not control:
                return Data(word, payload, bool(flags & FLAG_FIN))
            if word & 0xFFFF in FrameType._value2member_map_:
                return self._control(FrameType(word & 0xFFFF), flags, payload)

    def _control(self, kind: FrameType, flags: int, payload: bytes) -> Frame:
        size = len(payload)
        if size != _FIXED_LENGTH.get(kind, size) or size < _MIN_LENGTH.get(kind, 0):
            raise SessionError(f"{kind.name} frame of {size} bytes")
        fin = bool(flags & FLAG_FIN)
        first = struct.unpack_from(">I", payload)[0]
        sid = first & MAX_STREAM_ID
        try:
            if kind is FrameType.SYN_STREAM:
                assoc, prio, slot = struct.unpack_from(">IBB", payload, 4)
                headers = self._block(payload[10:], sid)
                return SynStream(
                    sid, headers, assoc & MAX_STREAM_ID, prio >> 5, slot, fin, bool(flags & FLAG_UNIDIRECTIONAL)
                )
            if kind is FrameType.SYN_REPLY:
                return SynReply(sid, self._block(payload[4:], sid), fin)
            if kind is FrameType.HEADERS:
                return Headers(sid, self._block(payload[4:], sid), fin)
            second = struct.unpack_from(">I", payload, 4)[0] if size >= 8 else 0
            if kind is FrameType.RST_STREAM:
                return RstStream(sid, second)
            if kind is FrameType.SETTINGS:
                if size != 4 + 8 * first:
                    raise SessionError(f"SETTINGS of {size} bytes for {first} entries")
                pairs = struct.iter_unpack(">II", payload[4:])
                return Settings(
                    tuple(Setting(i & MAX_LENGTH, v, i >> 24) for i, v in pairs), bool(flags & FLAG_CLEAR_SETTINGS)
                )
            if kind is FrameType.PING:
                return Ping(first)
            if kind is FrameType.GOAWAY:
                return GoAway(sid, second)
            return WindowUpdate(sid, second & MAX_WINDOW)
        except ValueError as exc:
            if sid and kind is not FrameType.GOAWAY:
                raise StreamError(sid, str(exc)) from exc
            raise SessionError(f"{kind.name}: {exc}") from exc

    def _block(self, compressed: bytes, stream_id: int) -> HeaderList:
        # Inflate first, always: the shared zlib context must see every block.
        raw = self._headers.decompress(compressed)
        if stream_id == 0:
            raise SessionError("stream id 0")
        return unpack_header_block(raw, stream_id)


class FlowControl:
    """The windows of one SPDY/3.1 session, as arithmetic: per stream and for
    the whole session, in both directions. Sending: ask `send_window`, report
    `sent`, apply the peer's WINDOW_UPDATE and SETTINGS. Receiving: report
    `received` when data arrives and `consumed` when the application has taken
    it; `consumed` returns the WINDOW_UPDATE frames to send.

    With `enforce_receive=False` a peer that overruns its window is tolerated
    (spdystream, and so kubectl and kubelet, never look at windows)."""

    def __init__(self, receive_window: int = INITIAL_WINDOW, *, enforce_receive: bool = True) -> None:
        self.enforce_receive = enforce_receive
        self.initial_send = INITIAL_WINDOW  # until the peer's SETTINGS say otherwise
        self.initial_receive = receive_window  # advertise it with SETTINGS if not 64 KiB
        self.session_send = INITIAL_WINDOW
        self.session_receive = INITIAL_WINDOW
        self._session_unacked = 0
        self._send: dict[int, int] = {}
        self._receive: dict[int, int] = {}
        self._unacked: dict[int, int] = {}

    def open(self, stream_id: int) -> None:
        self._send[stream_id] = self.initial_send
        self._receive[stream_id] = self.initial_receive
        self._unacked[stream_id] = 0

    def close(self, stream_id: int) -> None:
        for table in (self._send, self._receive, self._unacked):
            table.pop(stream_id, None)

    def send_window(self, stream_id: int) -> int:
        return max(0, min(self.session_send, self._send.get(stream_id, 0)))

    def sent(self, stream_id: int, size: int) -> None:
        if size > self.send_window(stream_id):
            raise ValueError(f"{size} bytes exceed the send window of stream {stream_id}")
        self._send[stream_id] -= size
        self.session_send -= size

    def on_window_update(self, frame: WindowUpdate) -> None:
        if frame.stream_id == 0:
            if self.session_send + frame.delta > MAX_WINDOW:
                raise SessionError("session window beyond 2^31-1")
            self.session_send += frame.delta
        elif frame.stream_id in self._send:
            if self._send[frame.stream_id] + frame.delta > MAX_WINDOW:
                raise StreamError(frame.stream_id, "window beyond 2^31-1", RstStatus.FLOW_CONTROL_ERROR)
            self._send[frame.stream_id] += frame.delta

    def on_settings(self, frame: Settings) -> None:
        for setting in frame.entries:
            if setting.id == SettingId.INITIAL_WINDOW_SIZE:
                if setting.value > MAX_WINDOW:
                    raise SessionError("initial window beyond 2^31-1")
                delta, self.initial_send = setting.value - self.initial_send, setting.value
                for stream_id in self._send:  # may go negative; the session window is untouched
                    self._send[stream_id] += delta

    def received(self, stream_id: int, size: int) -> None:
        self.session_receive -= size
        if stream_id in self._receive:
            self._receive[stream_id] -= size
            if self.enforce_receive and self._receive[stream_id] < 0:
                raise StreamError(stream_id, "peer overran the stream window", RstStatus.FLOW_CONTROL_ERROR)
        if self.enforce_receive and self.session_receive < 0:
            raise SessionError("peer overran the session window")

    def consumed(self, stream_id: int, size: int) -> list[WindowUpdate]:
        updates = []
        if stream_id in self._unacked:
            self._unacked[stream_id] += size
            if self._unacked[stream_id] >= self.initial_receive // 2:
                updates.append(WindowUpdate(stream_id, self._unacked[stream_id]))
                self._receive[stream_id] += self._unacked[stream_id]
                self._unacked[stream_id] = 0
        self._session_unacked += size
        if self._session_unacked >= INITIAL_WINDOW // 2:
            updates.append(WindowUpdate(0, self._session_unacked))
            self.session_receive += self._session_unacked
            self._session_unacked = 0
        return updates
