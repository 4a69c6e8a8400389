"""Picking a KV transport by name: what the services' `--kv-transport {ucx,grpc}` flag selects."""

from __future__ import annotations

from typing import TYPE_CHECKING

from splitserve.common.auth import ClusterAuth
from splitserve.kv_transfer.base import KvPuller, KvServer
from splitserve.kv_transfer.grpc import GrpcKvPuller, GrpcKvServer
from splitserve.kv_transfer.ucx import UcxKvPuller, UcxKvServer
from splitserve.v1 import common_pb2 as pb

if TYPE_CHECKING:
    from splitserve.engine.kv_cache import KVLayout

TRANSPORTS: dict[str, int] = {"ucx": pb.KV_TRANSPORT_UCX, "grpc": pb.KV_TRANSPORT_GRPC}
DEFAULT_TRANSPORT = "ucx"


def transport_value(name: str) -> int:
    """"ucx" -> pb.KV_TRANSPORT_UCX; ValueError for an unknown name."""
    if name not in TRANSPORTS:
        raise ValueError(f"unknown KV transport {name!r}; choose from {', '.join(TRANSPORTS)}")
    return TRANSPORTS[name]


def transport_name(value: int) -> str:
    """pb.KV_TRANSPORT_UCX -> "ucx"; ValueError for UNSPECIFIED or an unknown value."""
    for name, known in TRANSPORTS.items():
        if known == value:
            return name
    raise ValueError(f"no KV transport for enum value {value}")


def make_kv_server(transport: str, host: str, port: int = 0) -> KvServer:
    """The prefill side. host:port is the UCX listener's (the gRPC transport rides the prefill
    server's own gRPC API and ignores both)."""
    if transport_value(transport) == pb.KV_TRANSPORT_UCX:
        return UcxKvServer(host, port)
    return GrpcKvServer()


def make_kv_puller(transport: str, auth: ClusterAuth, layout: KVLayout | None = None) -> KvPuller:
    """The decode side; with the decode cache's layout, handles that do not fit it are refused
    before anything is allocated (benchmarks of synthetic payloads pass none). gRPC pulls carry
    auth's cluster token (UCX pulls are not gRPC calls)."""
    if transport_value(transport) == pb.KV_TRANSPORT_UCX:
        return UcxKvPuller(layout=layout)
    return GrpcKvPuller(auth, layout=layout)
