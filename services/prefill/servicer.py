"""The Prefill gRPC API: thin adapters from protos to PrefillServer."""

from __future__ import annotations

import grpc

from splitserve.common.logging import bind_request
from splitserve.common.tracing import grpc_traceparent
from splitserve.engine.request import RequestIdBusy
from splitserve.kv_transfer.base import KvPermissionDenied
from splitserve.kv_transfer.grpc import GrpcKvServer
from splitserve.v1 import common_pb2 as pb
from splitserve.v1 import prefill_pb2, prefill_pb2_grpc
from splitserve.worker.common import Draining

from .server import PrefillServer


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, server: PrefillServer, grpc_kv: GrpcKvServer | None) -> None:
        self.server = server
        self.grpc_kv = grpc_kv

    async def Submit(self, request: pb.QueuedRequest, context) -> prefill_pb2.SubmitResponse:
        bind_request(request.request_id)
        await self.server.fence.check(context)
        try:
            await self.server.submit(request, grpc_traceparent(context))
        except Draining as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except RequestIdBusy as exc:  # the scheduler places it again later, or elsewhere
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return prefill_pb2.SubmitResponse()

    async def Release(self, request: prefill_pb2.ReleaseRequest, context) -> prefill_pb2.ReleaseResponse:
        bind_request(request.request_id)
        try:
            await self.server.release(request.request_id, request.capability)
        except KvPermissionDenied as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        return prefill_pb2.ReleaseResponse()

    async def PullKv(self, request: prefill_pb2.PullKvRequest, context):
        if self.grpc_kv is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this prefill server serves KV over UCX, not gRPC")
        async for chunk in self.grpc_kv.pull_kv(request, context):
            yield chunk

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        bind_request(request.request_id)
        await self.server.fence.check(context)
        return pb.AbortResponse(found=await self.server.abort(request.request_id))

    async def GetStats(self, request: pb.StatsRequest, context) -> pb.WorkerStats:
        return await self.server.stats()

    async def ResetPrefixCache(self, request: pb.ResetPrefixCacheRequest,
                               context) -> pb.ResetPrefixCacheResponse:
        await self.server.fence.check(context)
        num_blocks = await self.server.loop.call(lambda engine: engine.reset_prefix_cache())
        return pb.ResetPrefixCacheResponse(num_workers=1, num_blocks=num_blocks)
