"""The one wrapper around every RPC: request id, logging, error → status code.

Handlers raise only the domain errors of agent.domain.errors; this is the only
place that turns them into gRPC status codes. Anything else is a bug: it is
logged with its traceback and the client gets INTERNAL with the request id,
never the traceback.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import structlog

from agent import faults
from agent.domain.errors import PodvisorError
from agent.services.ports import Metrics, NoMetrics

log = structlog.get_logger("agent.api")

# Frequent read-only calls (kubelet polls them every second) are logged at
# debug level when they succeed, so an info-level log shows what changed.
_QUIET = frozenset({
    "Version", "Status", "ListPodSandbox", "PodSandboxStatus", "ListContainers",
    "ContainerStatus", "ListImages", "ImageStatus", "ImageFsInfo", "ContainerStats",
    "ListContainerStats", "PodSandboxStats", "ListPodSandboxStats",
    "ListMetricDescriptors", "ListPodSandboxMetrics", "Check", "Info",
    "ServerReflectionInfo",
})
_CLIENT_ERRORS = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.OUT_OF_RANGE,
})


class _Call:
    """Bookkeeping for one RPC."""

    def __init__(self, full_method: str, metrics: Metrics) -> None:
        self.full_method = full_method
        self.service, _, self.method = full_method.lstrip("/").rpartition("/")
        self.metrics = metrics
        self.request_id = uuid.uuid4().hex[:16]
        self.started = time.perf_counter()
        self.code = grpc.StatusCode.OK
        self.detail = ""

    def fail(self, context: grpc.ServicerContext, exc: BaseException) -> None:
        """Record and send the status for an exception; always raises (abort)."""
        if isinstance(exc, PodvisorError):
            self.code = grpc.StatusCode[exc.code_name]
            self.detail = exc.message
        else:
            existing = context.code()
            if existing is not None and existing != grpc.StatusCode.OK:
                # The handler (or grpc) already aborted with a status: keep it.
                self.code = existing
                self.detail = context.details() or ""
                raise exc
            self.code = grpc.StatusCode.INTERNAL
            self.detail = f"internal error in podvisor (request id {self.request_id})"
            log.error("rpc raised an unexpected exception", method=self.full_method,
                      request_id=self.request_id, exc_info=exc)
        context.abort(self.code, self.detail)

    def done(self) -> None:
        seconds = time.perf_counter() - self.started
        self.metrics.rpc_done(self.service, self.method, self.code.name, seconds)
        ms = round(seconds * 1000, 3)
        fields = {"method": self.full_method, "request_id": self.request_id,
                  "code": self.code.name, "duration_ms": ms}
        if self.code == grpc.StatusCode.OK:
            if self.method in _QUIET:
                log.debug("rpc", **fields)
            else:
                log.info("rpc", **fields)
        elif self.code in _CLIENT_ERRORS:
            log.info("rpc", error=self.detail, **fields)
        else:
            log.warning("rpc", error=self.detail, **fields)


def _wrap_unary(full_method: str, behavior: Callable[..., Any], metrics: Metrics) -> Callable[..., Any]:
    def handler(request: Any, context: grpc.ServicerContext) -> Any:
        faults.wedge("grpc")  # tests only: a serving path that hangs (the watchdog's self-probe)
        call = _Call(full_method, metrics)
        structlog.contextvars.bind_contextvars(request_id=call.request_id)
        try:
            return behavior(request, context)
        except BaseException as exc:  # noqa: BLE001 - mapped in one place
            call.fail(context, exc)
        finally:
            call.done()
            structlog.contextvars.clear_contextvars()

    return handler


def _wrap_stream(full_method: str, behavior: Callable[..., Any], metrics: Metrics) -> Callable[..., Any]:
    def handler(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        call = _Call(full_method, metrics)
        structlog.contextvars.bind_contextvars(request_id=call.request_id)
        try:
            yield from behavior(request, context)
        except GeneratorExit:
            call.code = grpc.StatusCode.CANCELLED
            raise
        except BaseException as exc:  # noqa: BLE001
            call.fail(context, exc)
        finally:
            call.done()
            structlog.contextvars.clear_contextvars()

    return handler


class ApiInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, metrics: Metrics | None = None) -> None:
        self._metrics = metrics or NoMetrics()

    def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: Any
    ) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        m = self._metrics
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_wrap_unary(method, handler.unary_unary, m))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=_wrap_stream(method, handler.unary_stream, m))
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=_wrap_unary(method, handler.stream_unary, m))
        if handler.stream_stream is not None:
            return handler._replace(stream_stream=_wrap_stream(method, handler.stream_stream, m))
        return handler
