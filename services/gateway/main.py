"""`splitserve gateway`: the client-facing service (OpenAI HTTP and gRPC) in one asyncio loop."""

from __future__ import annotations

import argparse
import asyncio
import os

import structlog

from splitserve.common.auth import add_api_key_args, add_cluster_auth_args, add_redis_auth_args
from splitserve.common.engine_args import positive_float, positive_int
from splitserve.common.tracing import add_tracing_args

from .config import GatewayConfig
from .limits import DEFAULT_MAX_BODY_BYTES
from .server import serve


def add_parser(sub: argparse._SubParsersAction) -> None:
    env = os.environ.get
    p = sub.add_parser("gateway", help="run the client-facing gateway (OpenAI HTTP API and gRPC)",
                       description="Serve the OpenAI-compatible HTTP API and the gRPC Gateway API: "
                                   "tokenize requests, add them to the Redis request stream, and stream "
                                   "the tokens the workers send back.")
    p.add_argument("--redis-url", default=env("SPLITSERVE_REDIS_URL", "redis://127.0.0.1:6379/0"),
                   help="Redis holding the request stream (env SPLITSERVE_REDIS_URL; "
                        "default: redis://127.0.0.1:6379/0)")
    p.add_argument("--scheduler", default=env("SPLITSERVE_SCHEDULER", "127.0.0.1:50052"),
                   help="scheduler host:port, or several comma-separated (a leader and its standbys; env "
                        "SPLITSERVE_SCHEDULER; default: 127.0.0.1:50052)")
    add_redis_auth_args(p)
    add_cluster_auth_args(p)
    p.add_argument("--host", default=env("SPLITSERVE_HOST", "127.0.0.1"),
                   help="address to bind both servers (default: 127.0.0.1; 0.0.0.0 for other machines)")
    p.add_argument("--http-port", type=int, default=env("SPLITSERVE_HTTP_PORT", "8000"),
                   help="OpenAI-compatible HTTP port (default: 8000; 0 picks a free one)")
    p.add_argument("--grpc-port", type=int, default=env("SPLITSERVE_GRPC_PORT", "50051"),
                   help="gRPC Gateway port (default: 50051; 0 picks a free one)")
    p.add_argument("--model", default=env("SPLITSERVE_MODEL"),
                   help="model whose tokenizer and chat template to use: HF id, folder or .gguf "
                        "(default: the bundled SmolLM2-135M-Instruct); must match the workers'")
    p.add_argument("--served-model-name", default=env("SPLITSERVE_SERVED_MODEL_NAME"),
                   help="the name clients pass as 'model' (default: the model's name)")
    add_api_key_args(p)
    p.add_argument("--require-api-key", action=argparse.BooleanOptionalAction,
                   default=env("SPLITSERVE_REQUIRE_API_KEY", "0").lower() in ("1", "true", "yes"),
                   help="refuse to start without an API key, so that an open gateway is never an accident "
                        "(env SPLITSERVE_REQUIRE_API_KEY=1; the compose and Kubernetes files set it; "
                        "default: off)")
    p.add_argument("--tls-cert", default=env("SPLITSERVE_TLS_CERT"),
                   help="PEM certificate chain: serve HTTPS and gRPC over TLS to clients (env SPLITSERVE_TLS_CERT; "
                        "default: plaintext, for a gateway behind a TLS-terminating proxy or on localhost)")
    p.add_argument("--tls-key", default=env("SPLITSERVE_TLS_KEY"),
                   help="the certificate's PEM private key (env SPLITSERVE_TLS_KEY)")
    p.add_argument("--max-pending", type=positive_int, default=env("SPLITSERVE_MAX_PENDING", "256"),
                   help="requests in flight in this gateway before new ones get 429 / RESOURCE_EXHAUSTED "
                        "(default: 256)")
    p.add_argument("--max-body-bytes", type=positive_int,
                   default=env("SPLITSERVE_MAX_BODY_BYTES", str(DEFAULT_MAX_BODY_BYTES)),
                   help="HTTP request bodies larger than this get 413 before they are read in full "
                        f"(default: {DEFAULT_MAX_BODY_BYTES} = 8 MiB; see docs/security.md for every limit)")
    p.add_argument("--cluster-poll-interval", type=positive_float, default=1.0,
                   help="seconds between cluster state polls of the scheduler (default: 1)")
    p.add_argument("--request-idle-timeout", type=positive_float,
                   default=env("SPLITSERVE_REQUEST_IDLE_TIMEOUT", "300"),
                   help="seconds a request may go without a reply from the cluster (waiting in the queue "
                        "included) before the client gets a timeout error (HTTP 504, gRPC DEADLINE_EXCEEDED) "
                        "and the request is cancelled (env SPLITSERVE_REQUEST_IDLE_TIMEOUT; default: 300)")
    p.add_argument("--shutdown-grace", type=positive_float, default=5.0,
                   help="seconds in-flight requests get to finish on SIGTERM before they are aborted "
                        "(default: 5)")
    p.add_argument("--gateway-id", default=env("SPLITSERVE_GATEWAY_ID"),
                   help="unique name of this gateway, naming its reply stream "
                        "(default: gateway-<host>-<pid>-<random>)")
    add_tracing_args(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    config = GatewayConfig.from_args(args)
    structlog.contextvars.bind_contextvars(service="gateway", gateway_id=config.gateway_id)
    return asyncio.run(serve(config))
