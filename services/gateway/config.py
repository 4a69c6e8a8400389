"""The gateway's settings: one frozen record, built once in main() from flags and environment."""

from __future__ import annotations

import argparse
import os
import secrets
import socket
from dataclasses import dataclass

from splitserve.common.auth import (
    ClusterAuth,
    RedisCredentials,
    api_key_from_args,
    cluster_auth_from_args,
    redis_credentials_from_args,
)


@dataclass(frozen=True)
class GatewayConfig:
    """Everything the gateway needs to start; never mutated after main() builds it."""

    redis_url: str
    redis_credentials: RedisCredentials
    scheduler: str  # host:port of the scheduler's gRPC API, or several comma-separated
    cluster_auth: ClusterAuth  # the token the gateway's calls to the scheduler carry
    host: str
    http_port: int  # 0 picks a free port
    grpc_port: int  # 0 picks a free port
    model: str | None  # --model: whose tokenizer and chat template to use; None is the default model
    served_model_name: str | None  # the name clients must use; None is the model's own name
    api_key: str | None  # None: no authentication
    max_pending: int  # requests in flight in this gateway before new ones get 429
    max_body_bytes: int  # HTTP request bodies past this get 413 unread
    cluster_poll_interval_s: float
    shutdown_grace_s: float  # on SIGTERM, in-flight requests get this long before they are aborted
    gateway_id: str  # unique per process; names this gateway's reply stream
    # --tls-cert / --tls-key: HTTPS and gRPC over TLS for clients; None: plaintext (behind a TLS proxy).
    tls_cert: str | None = None
    tls_key: str | None = None
    # A request that hears nothing from the cluster this long (queue wait included) fails with a
    # timeout error and is cancelled upstream: a lost reply must not hold a client forever.
    request_idle_timeout_s: float = 300.0
    otlp_endpoint: str | None = None  # OpenTelemetry collector for request traces; None: no tracing

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> GatewayConfig:
        if bool(args.tls_cert) != bool(args.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        api_key = api_key_from_args(args)
        if args.require_api_key and api_key is None:
            raise ValueError("--require-api-key (SPLITSERVE_REQUIRE_API_KEY=1) and no API key: give one with "
                             "--api-key-file or SPLITSERVE_API_KEY, or turn the requirement off")
        return cls(
            redis_url=args.redis_url, redis_credentials=redis_credentials_from_args(args),
            scheduler=args.scheduler, cluster_auth=cluster_auth_from_args(args),
            host=args.host,
            http_port=args.http_port, grpc_port=args.grpc_port, model=args.model,
            served_model_name=args.served_model_name, api_key=api_key,
            max_pending=args.max_pending, max_body_bytes=args.max_body_bytes,
            cluster_poll_interval_s=args.cluster_poll_interval,
            shutdown_grace_s=args.shutdown_grace,
            gateway_id=args.gateway_id or new_gateway_id(),
            tls_cert=args.tls_cert, tls_key=args.tls_key, request_idle_timeout_s=args.request_idle_timeout,
            otlp_endpoint=args.otlp_endpoint,
        )


def new_gateway_id() -> str:
    """gateway-<host>-<pid>-<random>: unique even when a pid is reused on another host or restart."""
    return f"gateway-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
