"""Where a call came from: the unix socket, or the mTLS endpoint and which client.

The mTLS endpoint (agent.adapters.tls_endpoint) relays each admitted client
over its own unix connection, bound to a private abstract address; the
``OriginInterceptor`` asks it (``lookup``, wired by the daemon) whose
connection a call's peer is and keeps the answer for the call's duration.
``RoutedURLs`` then hands calls that came over mTLS the URLs of the HTTPS
streaming server, and every other call the URLs of the local one.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

import grpc
import structlog

from agent.domain.streaming import StreamRequest
from agent.services.ports import StreamURLs

# The verified client identity of the current call, or None (unix socket).
mtls_client: contextvars.ContextVar[str | None] = contextvars.ContextVar("mtls_client", default=None)


def _wrap(behavior: Callable[..., Any], lookup: Callable[[str], str | None]) -> Callable[..., Any]:
    def handler(request: Any, context: grpc.ServicerContext) -> Any:
        who = lookup(context.peer())
        if who is None:
            return behavior(request, context)
        token = mtls_client.set(who)
        try:
            with structlog.contextvars.bound_contextvars(mtls_client=who):
                return behavior(request, context)
        finally:
            mtls_client.reset(token)

    return handler


class OriginInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Outermost interceptor: marks unary calls relayed by the mTLS endpoint."""

    def __init__(self, lookup: Callable[[str], str | None]) -> None:
        self._lookup = lookup

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        return handler._replace(unary_unary=_wrap(handler.unary_unary, self._lookup))


class RoutedURLs:
    """A ``StreamURLs`` that picks the HTTPS streaming server for mTLS calls."""

    def __init__(self, local: StreamURLs, mtls: StreamURLs) -> None:
        self._local = local
        self._mtls = mtls

    def url_for(self, request: StreamRequest) -> str:
        target = self._mtls if mtls_client.get() is not None else self._local
        return target.url_for(request)
