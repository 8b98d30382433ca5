"""Exec and attach over SPDY: protocols channel.k8s.io (v1) to
v4.channel.k8s.io. The client opens one stream per channel, named by its
``streamType`` header; the server waits for all the CRI request implies,
runs the command, then reports on the error stream (v4: JSON Status,
older: plain text) and closes."""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog

from agent.domain.streaming import AttachRequest, ExecRequest
from agent.streaming import command, status
from agent.streaming.backend import StreamBackend, Streams
from agent.streaming.session import Stream

log = structlog.get_logger(__name__)

V1, V2, V3, V4 = "channel.k8s.io", "v2.channel.k8s.io", "v3.channel.k8s.io", "v4.channel.k8s.io"
PROTOCOLS = (V4, V3, V2, V1)  # the server's preference: newest first
STREAM_CREATION_TIMEOUT = 30.0
STREAM_TYPES = ("error", "stdin", "stdout", "stderr", "resize")


def expected_streams(request: ExecRequest | AttachRequest, protocol: str) -> set[str]:
    want = {"error"}
    if request.stdin:
        want.add("stdin")
    if request.stdout:
        want.add("stdout")
    if request.stderr and not request.tty:
        want.add("stderr")
    if request.tty and protocol in (V3, V4):
        want.add("resize")
    return want


class StreamCollector:
    """`on_stream` for the session: takes each expected stream type once."""

    def __init__(self, want: set[str]) -> None:
        self.want = want
        self.streams: dict[str, Stream] = {}
        self._cond = threading.Condition()

    def on_stream(self, stream: Stream) -> bool:
        kind = stream.header("streamtype")
        with self._cond:
            if kind not in self.want or kind in self.streams:
                log.info("unexpected remotecommand stream refused", stream_type=kind)
                return False
            self.streams[kind] = stream
            self._cond.notify_all()
            return True

    def wait(self, timeout: float, session_done: threading.Event) -> bool:
        with self._cond:
            return self._cond.wait_for(
                lambda: set(self.streams) == self.want or session_done.is_set(), timeout
            ) and set(self.streams) == self.want


class _In:
    def __init__(self, stream: Stream) -> None:
        self._s = stream

    def read(self, n: int = 65536) -> bytes:
        return self._s.read(n)


class _Out:
    def __init__(self, stream: Stream) -> None:
        self._s = stream

    def write(self, data: bytes) -> None:
        self._s.write(data)


def serve(request: ExecRequest | AttachRequest, protocol: str, backend: StreamBackend,
          collector: StreamCollector, session_done: threading.Event,
          timeout: float = STREAM_CREATION_TIMEOUT) -> None:
    if not collector.wait(timeout, session_done):
        log.info("remotecommand streams not all created in time", got=sorted(collector.streams),
                 want=sorted(collector.want))
        for s in collector.streams.values():
            s.reset()
        return
    got = collector.streams
    resizes = None
    pump: threading.Thread | None = None
    if "resize" in got:
        resizes = command.ResizeQueue()
        pump = threading.Thread(target=_pump_resizes, args=(got["resize"], resizes.feed, resizes.end),
                                name="resize", daemon=True)
        pump.start()
    streams = Streams(
        stdin=_In(got["stdin"]) if "stdin" in got else None,
        stdout=_Out(got["stdout"]) if "stdout" in got else None,
        stderr=_Out(got["stderr"]) if "stderr" in got else None,
        resize=resizes,
    )
    result = command.run(backend, request, streams)
    for kind in ("stdout", "stderr"):
        if kind in got:
            got[kind].close()
    err = got["error"]
    try:
        err.write(status.status_json(result) if protocol == V4 else status.status_text(result))
    except OSError:
        pass
    err.close()
    if resizes is not None:
        resizes.end()


def _pump_resizes(stream: Stream, feed: Callable[[bytes], None], end: Callable[[], None]) -> None:
    while chunk := stream.read():
        feed(chunk)
    end()
