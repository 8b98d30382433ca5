"""Port forward over SPDY (portforward.k8s.io): per forwarded connection the
client opens an ``error`` and a ``data`` stream with the same ``requestID``
and a ``port``; each complete pair gets a TCP connection to that port of the
pod (through the backend) and bytes are copied both ways, half-closes
included. A failure is written on the pair's error stream."""

from __future__ import annotations

import socket
import threading

import structlog

from agent.domain.errors import PodvisorError
from agent.domain.streaming import PortForwardRequest
from agent.streaming.backend import StreamBackend
from agent.streaming.session import Stream

log = structlog.get_logger(__name__)

PROTOCOL = "portforward.k8s.io"
PAIR_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0


def parse_port(text: str) -> int | None:
    if not text.isdigit() or len(text) > 5:
        return None
    port = int(text)
    return port if 1 <= port <= 65535 else None


class _Pair:
    def __init__(self, port: int) -> None:
        self.port = port
        self.data: Stream | None = None
        self.error: Stream | None = None
        self.timer: threading.Timer | None = None


class PortForwarder:
    """`on_stream` for the session; starts a copier thread per complete pair."""

    def __init__(self, request: PortForwardRequest, backend: StreamBackend,
                 pair_timeout: float = PAIR_TIMEOUT) -> None:
        self._request = request
        self._backend = backend
        self._pair_timeout = pair_timeout
        self._lock = threading.Lock()
        self._pairs: dict[str, _Pair] = {}

    def on_stream(self, stream: Stream) -> bool:
        kind = stream.header("streamtype")
        port = parse_port(stream.header("port"))
        if kind not in ("data", "error") or port is None:
            log.info("port-forward stream refused", stream_type=kind, port=stream.header("port"))
            return False
        if self._request.ports and port not in self._request.ports:
            log.info("port-forward to a port the request did not name", port=port)
            return False
        # old clients send no requestID: error stream id N, data stream id N + 2
        rid = stream.header("requestid") or str(stream.id if kind == "error" else stream.id - 2)
        with self._lock:
            pair = self._pairs.get(rid)
            if pair is None:
                pair = self._pairs[rid] = _Pair(port)
                pair.timer = threading.Timer(self._pair_timeout, self._expire, (rid,))
                pair.timer.daemon = True
                pair.timer.start()
            if getattr(pair, kind) is not None or pair.port != port:
                return False
            setattr(pair, kind, stream)
            if pair.data is None or pair.error is None:
                return True
            del self._pairs[rid]
        if pair.timer is not None:
            pair.timer.cancel()
        threading.Thread(target=self._forward, args=(pair,), name=f"portforward-{port}", daemon=True).start()
        return True

    def _expire(self, rid: str) -> None:
        with self._lock:
            pair = self._pairs.pop(rid, None)
        if pair is None:
            return
        if pair.error is not None:
            _report(pair.error, f"timed out waiting for the data and error streams of request {rid}")
            pair.error.reset()
        if pair.data is not None:
            pair.data.reset()

    def _forward(self, pair: _Pair) -> None:
        assert pair.data is not None and pair.error is not None
        data, error = pair.data, pair.error
        try:
            conn = self._backend.port_forward(self._request.sandbox_id, pair.port, CONNECT_TIMEOUT)
        except (PodvisorError, OSError) as exc:
            why = exc.message if isinstance(exc, PodvisorError) else str(exc)
            _report(error, f"error forwarding port {pair.port} to pod sandbox {self._request.sandbox_id}: {why}")
            error.close()
            data.close()  # as kubelet: both streams closed, the message on the error stream
            return
        conn.settimeout(None)
        try:
            copy_both_ways(conn, data, error)
        finally:
            conn.close()


def copy_both_ways(conn: socket.socket, data: Stream, error: Stream) -> None:
    """Client → pod on a helper thread, pod → client here; each direction's end
    is passed on as a half-close. When the pod's side ends, the error stream
    is closed too (client-go waits for it before it lets go of the pair)."""

    def upstream() -> None:
        try:
            while chunk := data.read():
                conn.sendall(chunk)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    up = threading.Thread(target=upstream, name="portforward-up", daemon=True)
    up.start()
    try:
        while chunk := conn.recv(65536):
            data.write(chunk)
    except OSError:
        pass
    data.close()
    error.close()
    up.join()


def _report(error: Stream, message: str) -> None:
    log.info("port forward failed", error=message)
    try:
        error.write(message.encode())
    except OSError:
        pass
