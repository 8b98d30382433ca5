"""Assemble the gRPC server: CRI services, podvisor.v1, health and reflection."""

from __future__ import annotations

from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from agent.api.gen.podvisor.v1 import podvisor_pb2
from agent.api.gen.runtime.v1 import api_pb2
from agent.api.host import HostServicer
from agent.api.image_import import ImagesServicer
from agent.api.images import ImageServicer
from agent.api.interceptor import ApiInterceptor
from agent.api.limits import CallLimiter
from agent.api.runtime_service import RuntimeServicer
from agent.domain.errors import InvalidArgument
from agent.services.ports import Metrics

# kubelet sends and accepts messages up to 16 MiB.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

SERVICE_NAMES = (
    api_pb2.DESCRIPTOR.services_by_name["RuntimeService"].full_name,
    api_pb2.DESCRIPTOR.services_by_name["ImageService"].full_name,
    podvisor_pb2.DESCRIPTOR.services_by_name["Host"].full_name,
    podvisor_pb2.DESCRIPTOR.services_by_name["Images"].full_name,
)


def _serialize(message: Any) -> bytes:
    """Responses are messages, or bytes a handler already encoded (hot paths)."""
    if isinstance(message, bytes):
        return message
    return message.SerializeToString()  # type: ignore[no-any-return]


class _Undecodable:
    """A request whose bytes are not its message (bad UTF-8, corrupt wire format, nested too deeply)."""

    def __init__(self, type_name: str, problem: str) -> None:
        self.type_name = type_name
        self.problem = problem


def _deserializer(request_cls: Any) -> Callable[[bytes], Any]:
    """Parse a request; never raise. grpc answers INTERNAL when a deserializer
    raises, but an undecodable request is the client's mistake: the handler
    (inside the interceptor) turns the marker into INVALID_ARGUMENT."""
    type_name = request_cls.DESCRIPTOR.full_name

    def parse(data: bytes) -> Any:
        try:
            return request_cls.FromString(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError and whatever upb raises: all the client's
            return _Undecodable(type_name, str(exc) or type(exc).__name__)

    return parse


def _decoded(behavior: Callable[..., Any]) -> Callable[..., Any]:
    def handler(request: Any, context: Any) -> Any:
        if isinstance(request, _Undecodable):
            raise InvalidArgument("request", f"is not a valid {request.type_name} message ({request.problem})")
        return behavior(request, context)

    return handler


def _generic_handler(servicer: object, service: ServiceDescriptor) -> grpc.GenericRpcHandler:
    """Register every method of a service from its descriptor.

    Same as the generated add_*_to_server, except that a handler may return
    pre-encoded bytes (ListPodSandbox serves cached encodings).
    """
    handlers = {}
    for method in service.methods:
        request_cls = message_factory.GetMessageClass(method.input_type)
        kind = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = kind(
            _decoded(getattr(servicer, method.name)),
            request_deserializer=_deserializer(request_cls),
            response_serializer=_serialize,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def build(
    runtime: RuntimeServicer,
    images: ImageServicer,
    host: HostServicer,
    workers: int,
    *,
    max_concurrent_rpcs: int | None = None,
    max_event_streams: int = 16,
    max_concurrent_stops: int = 16,
    outer_interceptors: tuple[grpc.ServerInterceptor, ...] = (),
    metrics: Metrics | None = None,
    image_import: ImagesServicer | None = None,
) -> tuple[grpc.Server, health.HealthServicer]:
    """The server, not started.

    Every accepted call gets a thread at once (``max_concurrent_rpcs`` ≤
    ``workers``; beyond it gRPC answers RESOURCE_EXHAUSTED rather than queueing
    a call behind held threads), and the calls that may run for long have
    their own smaller budgets (``CallLimiter``), so quick calls always find
    one free.
    """
    limit = max_concurrent_rpcs or workers
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
        interceptors=[*outer_interceptors, ApiInterceptor(metrics), CallLimiter({
            "GetContainerEvents": (max_event_streams, "max_event_streams"),
            "StopContainer": (max_concurrent_stops, "max_concurrent_stops"),
        })],
        maximum_concurrent_rpcs=limit,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    server.add_generic_rpc_handlers((
        _generic_handler(runtime, api_pb2.DESCRIPTOR.services_by_name["RuntimeService"]),
        _generic_handler(images, api_pb2.DESCRIPTOR.services_by_name["ImageService"]),
        _generic_handler(host, podvisor_pb2.DESCRIPTOR.services_by_name["Host"]),
    ))
    if image_import is not None:
        server.add_generic_rpc_handlers((
            _generic_handler(image_import, podvisor_pb2.DESCRIPTOR.services_by_name["Images"]),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME),
        server,
    )
    return server, health_servicer


def set_serving(health_servicer: health.HealthServicer, serving: bool) -> None:
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in ("", *SERVICE_NAMES):
        health_servicer.set(name, status)
