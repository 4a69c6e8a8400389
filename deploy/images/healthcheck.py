#!/usr/bin/env python3
"""The images' HEALTHCHECK: exit 0 when this container's service answers healthy, else 1.

    splitserve-healthcheck http   the gateway: GET /health on SPLITSERVE_HTTP_PORT (default 8000)
    splitserve-healthcheck grpc   the scheduler and the workers: the standard gRPC health service
                                  (grpc.health.v1, service "") on SPLITSERVE_PORT: SERVING or not

It dials the address the service binds to (SPLITSERVE_HOST; 127.0.0.1 for a wildcard), as
entrypoint.sh resolves it. Under mutual TLS (SPLITSERVE_CLUSTER_TLS_DIR) it dials with the service's
own certificate, and a gateway with SPLITSERVE_TLS_CERT is asked over HTTPS (its certificate is not
checked: this is the gateway's own container). Kubernetes probes the plaintext endpoints natively.
"""

import os
import socket
import ssl
import sys
import urllib.request
from pathlib import Path

TIMEOUT_S = 3.0


def service_host() -> str:
    host = os.environ.get("SPLITSERVE_HOST", "127.0.0.1")
    if host == "auto":
        return socket.gethostbyname(socket.gethostname())
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def http_healthy() -> bool:
    tls = bool(os.environ.get("SPLITSERVE_TLS_CERT"))
    url = f"{'https' if tls else 'http'}://{service_host()}:{os.environ.get('SPLITSERVE_HTTP_PORT', '8000')}/health"
    context = ssl._create_unverified_context() if tls else None  # noqa: S323 (its own container)
    with urllib.request.urlopen(url, timeout=TIMEOUT_S, context=context) as response:
        return response.status == 200


def grpc_healthy() -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    address = f"{service_host()}:{os.environ['SPLITSERVE_PORT']}"
    tls_dir = os.environ.get("SPLITSERVE_CLUSTER_TLS_DIR")
    if tls_dir:  # the cluster's CA, this service's certificate; servers carry the cluster's name
        folder = Path(tls_dir)
        credentials = grpc.ssl_channel_credentials((folder / "ca.crt").read_bytes(), (folder / "tls.key").read_bytes(),
                                                   (folder / "tls.crt").read_bytes())
        channel = grpc.secure_channel(address, credentials, options=[("grpc.ssl_target_name_override",
                                                                      "splitserve-cluster")])
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                              timeout=TIMEOUT_S)
        except grpc.RpcError as exc:  # refused or timed out: the same as a refused HTTP connection
            raise ConnectionError(f"{address}: {exc.code().name}") from None
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str]) -> int:
    checks = {"http": http_healthy, "grpc": grpc_healthy}
    if len(argv) != 1 or argv[0] not in checks:
        print("usage: splitserve-healthcheck http|grpc", file=sys.stderr)
        return 2
    try:
        healthy = checks[argv[0]]()
    except (OSError, KeyError) as exc:  # refused, timed out, HTTP error, no port set: unhealthy
        print(f"unhealthy: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print("healthy" if healthy else "unhealthy: not serving")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
