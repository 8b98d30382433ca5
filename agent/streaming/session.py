"""One SPDY/3.1 connection after the HTTP upgrade, server side: a reader
thread decodes frames (agent.streaming.spdy) and routes them to `Stream`s;
any thread may write. Streams are opened by the client; `on_stream` decides
whether to accept each one (SYN_REPLY) or refuse it (RST_STREAM).

Windows are not enforced in either direction, as spdystream (kubectl,
kubelet) ignores them (docs/streaming-protocols.md). A stream buffers at
most `MAX_BUFFER` bytes its reader has not taken; beyond that the reader
thread waits, so a client that floods a stream is slowed down by TCP."""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from collections.abc import Callable

import structlog

from agent.streaming import spdy

log = structlog.get_logger(__name__)

MAX_BUFFER = 1 << 20
MAX_WRITE = 32 * 1024  # per DATA frame, as spdystream's peers write
ANSWER_WAIT = 10.0  # seconds a writer waits for the SYN_REPLY of its stream


def wait_readable(sock: socket.socket, timeout: float) -> bool:
    """Whether ``sock`` has something to read within ``timeout`` seconds (TLS:
    bytes already decrypted count). The socket itself stays blocking, so a
    slow reader on the other side only slows our writes down."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    readable, _, _ = select.select([sock], [], [], timeout)
    return bool(readable)


class Stream:
    """A client-opened stream: read what the client sent (b"" after its FIN
    or a reset), write to it, half-close with `close`."""

    def __init__(self, session: Session, stream_id: int, headers: spdy.HeaderList) -> None:
        self.session = session
        self.id = stream_id
        self.headers = dict(headers)  # names are lowercase on the wire
        self._cond = threading.Condition()
        self._buf = bytearray()
        self._remote_done = False  # FIN or reset received, or the session ended
        self._local_done = False  # FIN or reset sent
        self.reset_received = False
        # Set once the session answered the SYN_STREAM (SYN_REPLY or a refusal):
        # nothing of ours may reach the client before that answer, or
        # spdystream drops it (data) or fails the stream (a reset).
        self._answered = threading.Event()

    def header(self, name: str) -> str:
        return self.headers.get(name.lower(), "")

    # reader side (session thread) -----------------------------------------
    def _deliver(self, data: bytes, fin: bool) -> None:
        with self._cond:
            while len(self._buf) > MAX_BUFFER and not self._remote_done and not self.session.closed:
                self._cond.wait(1.0)
            if not self._remote_done:
                self._buf += data
                self._remote_done = fin
            self._cond.notify_all()

    def _end(self, reset: bool) -> None:
        with self._cond:
            self._remote_done = True
            if reset:
                self.reset_received = True
                self._local_done = True
            self._cond.notify_all()

    # application side -------------------------------------------------------
    def read(self, n: int = 65536, timeout: float | None = None) -> bytes:
        with self._cond:
            self._cond.wait_for(lambda: self._buf or self._remote_done, timeout)
            out = bytes(self._buf[:n])
            del self._buf[:n]
            self._cond.notify_all()
            return out

    def read_all(self, limit: int = 1 << 16) -> bytes:
        out = bytearray()
        while len(out) <= limit and (chunk := self.read()):
            out += chunk
        return bytes(out)

    def _await_answer(self) -> None:
        self._answered.wait(ANSWER_WAIT)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        if not view:
            return
        self._await_answer()
        for off in range(0, len(view), MAX_WRITE):
            with self._cond:
                if self._local_done:
                    raise BrokenPipeError(f"stream {self.id} is closed")
            self.session.send(spdy.Data(self.id, bytes(view[off:off + MAX_WRITE])))

    def close(self) -> None:
        """Half-close: FIN; no more writes. Harmless when done already."""
        with self._cond:
            if self._local_done:
                return
            self._local_done = True
        self._await_answer()
        try:
            self.session.send(spdy.Data(self.id, b"", fin=True))
        except OSError:
            pass

    def reset(self, status: int = spdy.RstStatus.CANCEL) -> None:
        with self._cond:
            done = self._local_done and self._remote_done
            self._local_done = self._remote_done = True
            self._cond.notify_all()
        if not done:
            self._await_answer()
            try:
                self.session.send(spdy.RstStream(self.id, status))
            except OSError:
                pass
        self.session._forget(self.id)


class Session:
    """Serve frames on `sock` until the client goes away, `close` is called or
    nothing moves for `idle_timeout` seconds. `on_stream(stream)` runs on the
    reader thread and must not block; it returns False to refuse the stream."""

    def __init__(self, sock: socket.socket, on_stream: Callable[[Stream], bool], idle_timeout: float,
                 initial: bytes = b"") -> None:
        self._sock = sock
        self._on_stream = on_stream
        self._idle = idle_timeout
        self._encoder = spdy.Encoder()
        self._decoder = spdy.Decoder()
        self._decoder.feed(initial)
        self._write_lock = threading.RLock()
        self._streams: dict[int, Stream] = {}
        self._last_id = 0
        self._last_activity = time.monotonic()
        self.closed = False
        self.done = threading.Event()

    def send(self, *frames: spdy.Frame) -> None:
        with self._write_lock:
            if self.closed:
                raise BrokenPipeError("the SPDY session is closed")
            data = b"".join(self._encoder.encode(f) for f in frames)
            try:
                self._sock.sendall(data)
            except OSError:
                self._fail()
                raise
            self._last_activity = time.monotonic()

    def _forget(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)

    def serve(self) -> None:
        """The reader loop; returns when the session is over."""
        try:
            self._handle_buffered()
            while not self.closed:
                try:
                    if not wait_readable(self._sock, min(self._idle, 5.0)):
                        if time.monotonic() - self._last_activity >= self._idle:
                            log.info("streaming session idle, closing", idle_seconds=self._idle)
                            self.close()
                            break
                        continue
                    chunk = self._sock.recv(65536)
                except OSError:
                    break
                if not chunk:
                    break
                self._last_activity = time.monotonic()
                self._decoder.feed(chunk)
                self._handle_buffered()
        except spdy.SessionError as exc:
            log.info("SPDY session error from the client", error=str(exc))
            try:
                self.send(spdy.GoAway(self._last_id, exc.status))
            except OSError:
                pass
        finally:
            self._fail()

    def _handle_buffered(self) -> None:
        while True:
            try:
                frame = self._decoder.next_frame()
            except spdy.StreamError as exc:
                self._reset_unknown(exc.stream_id, exc.status)
                continue
            if frame is None:
                return
            self._handle(frame)

    def _reset_unknown(self, stream_id: int, status: int) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            stream._end(reset=True)
        try:
            self.send(spdy.RstStream(stream_id, status))
        except OSError:
            pass

    def _handle(self, frame: spdy.Frame) -> None:
        match frame:
            case spdy.SynStream(sid, headers, fin=fin):
                if sid % 2 == 0 or sid <= self._last_id:
                    self._reset_unknown(sid, spdy.RstStatus.PROTOCOL_ERROR)
                    return
                self._last_id = sid
                stream = Stream(self, sid, headers)
                self._streams[sid] = stream
                if fin:
                    stream._end(reset=False)
                # reply before any data: spdystream drops data on unreplied streams
                try:
                    if self._on_stream(stream):
                        self.send(spdy.SynReply(sid))
                    else:
                        self._streams.pop(sid, None)
                        stream._end(reset=True)
                        self.send(spdy.RstStream(sid, spdy.RstStatus.REFUSED_STREAM))
                finally:
                    stream._answered.set()
            case spdy.Data(sid, data, fin):
                known = self._streams.get(sid)
                if known is not None:  # else late data on a stream we reset: drop
                    known._deliver(data, fin)
            case spdy.RstStream(sid):
                gone = self._streams.pop(sid, None)
                if gone is not None:
                    gone._end(reset=True)
            case spdy.Ping(ping_id):
                if ping_id % 2:
                    self.send(frame)
            case spdy.GoAway():
                self._fail()
            case _:
                pass  # SETTINGS, WINDOW_UPDATE, HEADERS: nothing to do

    def _fail(self) -> None:
        """End every stream (readers see EOF, writers an error)."""
        with self._write_lock:
            self.closed = True
        for stream in list(self._streams.values()):
            stream._end(reset=True)
        self._streams.clear()
        self.done.set()

    def close(self) -> None:
        """GOAWAY, then stop reading; the caller closes the socket."""
        try:
            self.send(spdy.GoAway(self._last_id))
        except OSError:
            pass
        self._fail()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
