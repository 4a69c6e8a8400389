"""The colocated worker's gRPC API: the Prefill service's Submit, Abort and GetStats, as a prefill
server answers them; no KV blocks are ever held for a pull."""

from __future__ import annotations

import grpc
from splitserve.services.prefill.servicer import PrefillServicer

from splitserve.v1 import prefill_pb2

from .server import ColocatedServer

NO_KV = "a colocated worker decodes its requests itself: it holds no KV blocks for others to pull"


class ColocatedServicer(PrefillServicer):
    def __init__(self, server: ColocatedServer) -> None:
        super().__init__(server, grpc_kv=None)  # Submit, Abort and GetStats call the same server methods

    async def Release(self, request: prefill_pb2.ReleaseRequest, context) -> prefill_pb2.ReleaseResponse:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, NO_KV)

    async def PullKv(self, request: prefill_pb2.PullKvRequest, context):
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, NO_KV)
        yield  # a server-streaming handler must be a generator
