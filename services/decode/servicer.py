"""The Decode gRPC API: thin adapters from protos to DecodeServer."""

from __future__ import annotations

import grpc

from splitserve.common.logging import bind_request
from splitserve.common.tracing import grpc_traceparent
from splitserve.v1 import common_pb2 as pb
from splitserve.v1 import decode_pb2, decode_pb2_grpc
from splitserve.worker.common import Draining

from .server import DecodeServer, WaitingFull


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, server: DecodeServer) -> None:
        self.server = server

    async def Submit(self, request: decode_pb2.DecodeRequest, context) -> decode_pb2.DecodeSubmitResponse:
        bind_request(request.request.request_id)
        await self.server.fence.check(context)
        try:
            await self.server.submit(request, grpc_traceparent(context))
        except Draining as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except WaitingFull as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return decode_pb2.DecodeSubmitResponse()

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        bind_request(request.request_id)
        await self.server.fence.check(context)
        return pb.AbortResponse(found=await self.server.abort(request.request_id))

    async def GetStats(self, request: pb.StatsRequest, context) -> pb.WorkerStats:
        return await self.server.stats()
