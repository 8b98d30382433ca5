"""Assemble the gRPC server: CRI services, podvisor.v1, health and reflection."""

from __future__ import annotations

from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import agent.api.gen  # noqa: F401
from agent.api.interceptor import ApiInterceptor
from agent.api.podvisor_service import HostServicer
from agent.api.runtime_service import ImageServicer, RuntimeServicer
from podvisor.v1 import podvisor_pb2, podvisor_pb2_grpc
from runtime.v1 import api_pb2, api_pb2_grpc

# kubelet sends and accepts messages up to 16 MiB.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

SERVICE_NAMES = (
    api_pb2.DESCRIPTOR.services_by_name["RuntimeService"].full_name,
    api_pb2.DESCRIPTOR.services_by_name["ImageService"].full_name,
    podvisor_pb2.DESCRIPTOR.services_by_name["Host"].full_name,
)


def build(
    runtime: RuntimeServicer,
    images: ImageServicer,
    host: HostServicer,
    workers: int,
) -> tuple[grpc.Server, health.HealthServicer]:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
        interceptors=[ApiInterceptor()],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    api_pb2_grpc.add_RuntimeServiceServicer_to_server(runtime, server)
    api_pb2_grpc.add_ImageServiceServicer_to_server(images, server)
    podvisor_pb2_grpc.add_HostServicer_to_server(host, server)
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
