"""Per-method concurrency limits, so long-held calls cannot take every thread.

gRPC's synchronous server gives every call a thread for as long as it runs: a
GetContainerEvents stream holds one until the client leaves, a StopContainer
one until the guest shuts down. Without a bound, a client opening streams (or
stopping a VM that ignores ACPI, many times over) would hold every thread and
kubelet's Version and ListPodSandbox would wait behind them. Each limited
method has its own budget; a call beyond it fails at once with
RESOURCE_EXHAUSTED instead of waiting. ``grpc.server``'s
``maximum_concurrent_rpcs`` bounds the total the same way (agent/api/server.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from agent.domain.errors import ResourceExhausted


class _Budget:
    def __init__(self, method: str, limit: int, setting: str) -> None:
        self.method = method
        self.limit = limit
        self.setting = setting
        self._slots = threading.BoundedSemaphore(limit)

    def take(self) -> None:
        if not self._slots.acquire(blocking=False):
            raise ResourceExhausted(
                f"too many {self.method} calls in progress (at most {self.limit}, [server] {self.setting}); "
                "try again later")

    def give_back(self) -> None:
        self._slots.release()


def _limit_unary(budget: _Budget, behavior: Callable[..., Any]) -> Callable[..., Any]:
    def handler(request: Any, context: grpc.ServicerContext) -> Any:
        budget.take()
        try:
            return behavior(request, context)
        finally:
            budget.give_back()

    return handler


def _limit_stream(budget: _Budget, behavior: Callable[..., Any]) -> Callable[..., Any]:
    def handler(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        budget.take()
        try:
            yield from behavior(request, context)
        finally:
            budget.give_back()

    return handler


class CallLimiter(grpc.ServerInterceptor):  # type: ignore[misc]
    """Caps how many calls of each listed method run at once.

    ``limits`` maps a method's short name (``GetContainerEvents``) to its
    limit and the name of the setting that sets it (named in the error).
    Placed inside ``ApiInterceptor``, so a refusal is logged and mapped like
    any other domain error.
    """

    def __init__(self, limits: dict[str, tuple[int, str]]) -> None:
        self._budgets = {method: _Budget(method, limit, setting) for method, (limit, setting) in limits.items()}

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        budget = self._budgets.get(handler_call_details.method.rsplit("/", 1)[-1])
        if budget is None:
            return handler
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_limit_unary(budget, handler.unary_unary))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=_limit_stream(budget, handler.unary_stream))
        return handler  # no client-streaming method is limited
