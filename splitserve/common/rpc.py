"""gRPC plumbing shared by every service: message limits, servers, channels, health."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

# gRPC refuses messages over 4 MiB by default; KV chunks and long prompts need more headroom.
MAX_MESSAGE_BYTES = 64 << 20
OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
]


def make_server() -> grpc.aio.Server:
    return grpc.aio.server(options=OPTIONS)


def bind(server: grpc.aio.Server, host: str, port: int) -> int:
    """Bind host:port (port 0 picks a free one); returns the port bound."""
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC server to {host}:{port}")
    return bound


def open_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=OPTIONS)


def add_health(server: grpc.aio.Server) -> health.aio.HealthServicer:
    """The standard grpc.health.v1 service; the caller flips it to SERVING when ready."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
