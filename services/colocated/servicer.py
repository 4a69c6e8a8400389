"""The colocated worker's gRPC API: the Prefill service's Submit, Abort and GetStats."""

from __future__ import annotations

import grpc

from splitserve.common.logging import bind_request
from splitserve.v1 import common_pb2 as pb
from splitserve.v1 import prefill_pb2, prefill_pb2_grpc

from .server import ColocatedServer

NO_KV = "a colocated worker decodes its requests itself: it holds no KV blocks for others to pull"


class ColocatedServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, server: ColocatedServer) -> None:
        self.server = server

    async def Submit(self, request: pb.QueuedRequest, context) -> prefill_pb2.SubmitResponse:
        bind_request(request.request_id)
        try:
            await self.server.submit(request)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return prefill_pb2.SubmitResponse()

    async def Release(self, request: prefill_pb2.ReleaseRequest, context) -> prefill_pb2.ReleaseResponse:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, NO_KV)

    async def PullKv(self, request: prefill_pb2.PullKvRequest, context):
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, NO_KV)
        yield  # a server-streaming handler must be a generator

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        bind_request(request.request_id)
        return pb.AbortResponse(found=await self.server.abort(request.request_id))

    async def GetStats(self, request: pb.StatsRequest, context) -> pb.WorkerStats:
        return self.server.loop.snapshot
