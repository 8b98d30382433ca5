"""CallLimiter inside ApiInterceptor on a real gRPC server: budgets per method, RESOURCE_EXHAUSTED beyond."""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.api.interceptor import ApiInterceptor
from agent.api.limits import CallLimiter

SERVICE = "runtime.v1.RuntimeService"


class Held:
    """Handlers that hold their call until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)

    def stop(self, request: bytes, context: Any) -> bytes:
        self.entered.release()
        self.release.wait(30)
        return b""

    def events(self, request: bytes, context: Any) -> Iterator[bytes]:
        self.entered.release()
        yield b"first"
        self.release.wait(30)

    def version(self, request: bytes, context: Any) -> bytes:
        return b"v"


@pytest.fixture
def served() -> Iterator[tuple[Held, grpc.Channel]]:
    held = Held()
    ident = {"request_deserializer": None, "response_serializer": None}
    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "StopContainer": grpc.unary_unary_rpc_method_handler(held.stop, **ident),
        "GetContainerEvents": grpc.unary_stream_rpc_method_handler(held.events, **ident),
        "Version": grpc.unary_unary_rpc_method_handler(held.version, **ident),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16),
                         interceptors=[ApiInterceptor(), CallLimiter({
                             "GetContainerEvents": (2, "max_event_streams"),
                             "StopContainer": (3, "max_concurrent_stops")})],
                         maximum_concurrent_rpcs=16)
    server.add_generic_rpc_handlers((handler,))
    sock = Path(tempfile.mkdtemp(prefix="pvlim-", dir="/tmp")) / "s.sock"
    server.add_insecure_port(f"unix:{sock}")
    server.start()
    channel = grpc.insecure_channel(f"unix:{sock}")
    try:
        yield held, channel
    finally:
        held.release.set()
        channel.close()
        server.stop(None).wait(5)
        sock.unlink(missing_ok=True)
        sock.parent.rmdir()


def _unary(channel: grpc.Channel, method: str) -> Any:
    return channel.unary_unary(f"/{SERVICE}/{method}")


def test_streams_beyond_their_budget_are_refused_and_others_still_answer(served: tuple[Held, grpc.Channel]) -> None:
    held, channel = served
    stream = channel.unary_stream(f"/{SERVICE}/GetContainerEvents")
    open_streams = [stream(b"") for _ in range(2)]
    for s in open_streams:
        assert next(s) == b"first"  # both hold their thread now
    with pytest.raises(grpc.RpcError) as exc_info:
        next(stream(b"", timeout=10))
    assert exc_info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_event_streams" in exc_info.value.details()
    assert _unary(channel, "Version")(b"", timeout=10) == b"v"
    held.release.set()
    for s in open_streams:
        assert list(s) == []
    # The budget is given back when a stream ends.
    held.release.clear()
    again = stream(b"")
    assert next(again) == b"first"
    held.release.set()
    assert list(again) == []


def test_stops_beyond_their_budget_are_refused(served: tuple[Held, grpc.Channel]) -> None:
    held, channel = served
    stop = _unary(channel, "StopContainer")
    pending = [stop.future(b"") for _ in range(3)]
    for _ in range(3):
        assert held.entered.acquire(timeout=10)
    with pytest.raises(grpc.RpcError) as exc_info:
        stop(b"", timeout=10)
    assert exc_info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_concurrent_stops" in exc_info.value.details()
    assert _unary(channel, "Version")(b"", timeout=10) == b"v"
    held.release.set()
    assert [p.result(timeout=10) for p in pending] == [b"", b"", b""]
    assert stop(b"", timeout=10) == b""
