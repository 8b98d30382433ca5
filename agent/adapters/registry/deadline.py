"""A total deadline per registry request, enforced at every socket operation.

httpx only bounds each socket read (``read`` timeout): a registry sending one
byte every few seconds — headers or body — would hold a pull forever. Every
connection of the registry client goes through :class:`DeadlineBackend`, whose
streams shorten each read/write timeout to what is left of the deadline the
current thread set (:func:`set_deadline`, once per request attempt) and fail
with a timeout once it has passed. httpx maps that to ``httpx.ReadTimeout``/
``WriteTimeout`` (transport errors: retried, then ``Unavailable``).
"""

from __future__ import annotations

import threading
import time
import typing
from collections.abc import Callable
from typing import TypeVar

import httpcore
import httpx

_local = threading.local()
_T = TypeVar("_T")


def set_deadline(seconds: float) -> None:
    """Requests of this thread must be done within ``seconds`` from now."""
    _local.at = time.monotonic() + seconds
    _local.seconds = seconds


def _bounded(operation: Callable[[float | None], _T], timeout: float | None, error: type[Exception]) -> _T:
    """``operation(timeout)`` with the timeout cut to what is left of the deadline."""
    at: float | None = getattr(_local, "at", None)
    if at is None:
        return operation(timeout)
    left = at - time.monotonic()
    message = f"the registry request took longer than its total deadline of {_local.seconds:.1f} s"
    if left <= 0:
        raise error(message)
    if timeout is not None and timeout <= left:
        return operation(timeout)
    try:
        return operation(left)
    except error:
        raise error(message) from None


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return _bounded(lambda t: self._inner.read(max_bytes, t), timeout, httpcore.ReadTimeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        # Big uploads are written in one call: bound each piece, not the whole.
        for start in range(0, len(buffer), 65536):
            piece = buffer[start:start + 65536]

            def write(t: float | None, piece: bytes = piece) -> None:
                self._inner.write(piece, t)

            _bounded(write, timeout, httpcore.WriteTimeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: typing.Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        inner = _bounded(lambda t: self._inner.start_tls(ssl_context, server_hostname, t), timeout,
                         httpcore.ConnectTimeout)
        return _DeadlineStream(inner)

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


class DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's network backend with the current thread's deadline applied."""

    def __init__(self, inner: httpcore.NetworkBackend) -> None:
        self._inner = inner

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[typing.Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = _bounded(lambda t: self._inner.connect_tcp(host, port, t, local_address, socket_options),
                          timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(stream)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[typing.Any] | None = None,
    ) -> httpcore.NetworkStream:  # pragma: no cover - registries are reached over TCP
        stream = _bounded(lambda t: self._inner.connect_unix_socket(path, t, socket_options), timeout,
                          httpcore.ConnectTimeout)
        return _DeadlineStream(stream)

    def sleep(self, seconds: float) -> None:  # pragma: no cover - used by httpcore's connect retries only
        self._inner.sleep(seconds)


def install(client: httpx.Client) -> None:
    """Route every connection of ``client`` (direct and through proxies) via deadlines.

    httpx builds its connection pools itself; this swaps their network
    backend. Fails loudly if httpx's layout changes, rather than leaving a
    client without deadlines.
    """
    transports = [client._transport, *(t for t in client._mounts.values() if t is not None)]
    for transport in transports:
        pool = getattr(transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if backend is None:
            raise RuntimeError(f"cannot install request deadlines on {transport!r}")
        if not isinstance(backend, DeadlineBackend):
            pool._network_backend = DeadlineBackend(backend)  # type: ignore[union-attr]
