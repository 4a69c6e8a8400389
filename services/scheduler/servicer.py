"""The Scheduler gRPC API: thin adapters from protos to SchedulerServer."""

from __future__ import annotations

import time

import grpc

from splitserve.common.auth import peer_role
from splitserve.common.logging import bind_request
from splitserve.common.net import host_is_peer
from splitserve.common.step_stats import check_step_histograms
from splitserve.v1 import common_pb2 as pb
from splitserve.v1 import scheduler_pb2 as spb
from splitserve.v1 import scheduler_pb2_grpc

from .registry import ROLE_NAMES
from .server import SchedulerServer

MAX_NAMESPACE_CHARS = 1024  # a worker's prefix_cache_namespace: its model name, dtype and block size
MAX_DTYPE_CHARS = 32  # a KV layout's dtype name ("bfloat16")


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, server: SchedulerServer, heartbeat_interval_s: float) -> None:
        self.server = server
        self.heartbeat_interval_s = heartbeat_interval_s

    async def Register(self, request: spb.RegisterRequest, context) -> spb.RegisterResponse:
        if request.worker.role == spb.WORKER_ROLE_UNSPECIFIED or not request.worker.instance_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a worker needs an instance id and a role")
        if len(request.worker.prefix_cache_namespace) > MAX_NAMESPACE_CHARS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"prefix_cache_namespace is longer than {MAX_NAMESPACE_CHARS} characters")
        await _check_stats(request.stats, context)
        tls = self.server.config.cluster_auth.tls is not None
        if tls and peer_role(context) != ROLE_NAMES.get(request.worker.role):
            # A prefill server's certificate cannot enrol a decode server (and be sent KV handles).
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"a {ROLE_NAMES.get(request.worker.role, 'worker')} server registers with "
                                f"its role's certificate; the caller's names {peer_role(context)}")
        address = request.worker.grpc_address
        if self.server.config.check_worker_addresses and not await host_is_peer(
                address.rpartition(":")[0].strip("[]"), context.peer()):
            # Else a member could point the scheduler's traffic (prompts, KV handles) elsewhere.
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"worker {request.worker.instance_id[:64]!r} advertises {address[:80]!r}, "
                                f"which does not resolve to the address it connected from ({context.peer()})")
        await _check_layout(request.worker.kv_layout, context)  # once the caller may register this worker
        self.server.register(request.worker, request.stats)
        self.server.heartbeat(self.server.registry.workers[request.worker.instance_id],
                              set(request.held_request_ids))
        return spb.RegisterResponse(heartbeat_interval_s=self.heartbeat_interval_s,
                                    leader=self.server.leading.is_set(), epoch=self.server.epoch)

    async def _check_instance(self, instance_id: str, context) -> None:
        """Under mutual TLS, a call for a registered worker must come with its role's certificate: a
        decode server's cannot report, hand back or drain for a prefill server. (Certificates name
        roles, not instances: one prefill server's can still speak for another.)"""
        if self.server.config.cluster_auth.tls is None:
            return
        worker = self.server.registry.workers.get(instance_id)
        role = peer_role(context)
        if worker is not None and role != ROLE_NAMES.get(worker.role) and role != "admin":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"worker {instance_id[:64]!r} is a {ROLE_NAMES.get(worker.role)} server; the "
                                f"caller's certificate names {role}")

    async def Heartbeat(self, request: spb.HeartbeatRequest, context) -> spb.HeartbeatResponse:
        await self._check_instance(request.instance_id, context)
        await _check_stats(request.stats, context)
        cached = None
        if request.HasField("cached_blocks"):
            cached = request.cached_blocks.keys
            if len(cached) > request.stats.num_blocks:  # the scheduler keeps them: bounded by the cache
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"{len(cached)} cached blocks listed, more than the worker's "
                                    f"{max(request.stats.num_blocks, 0)} KV blocks")
        if not self.server.registry.heartbeat(request.instance_id, request.stats, time.monotonic(), cached):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown worker {request.instance_id}; register")
        leading, held = self.server.leading.is_set(), set(request.held_request_ids)
        if leading:  # reports whose own call did not get through; a standby leaves them to the leader
            for done in [*request.prefill_done, *request.request_done]:
                if done.instance_id != request.instance_id:  # its own reports, not another worker's
                    continue
                if isinstance(done, spb.PrefillDoneRequest):
                    await self.server.prefill_done(done)
                else:
                    await self.server.request_done(done)
                if done.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                    held.discard(done.request_id)  # held only until this last report, now delivered
        worker = self.server.registry.workers.get(request.instance_id)
        awaited = self.server.heartbeat(worker, held) if worker is not None else []
        self.server.wake.set()  # its load changed: a waiting request may fit now
        return spb.HeartbeatResponse(leader=leading, epoch=self.server.epoch, kv_awaited_ids=awaited)

    async def _require_leader(self, context) -> None:
        if not self.server.leading.is_set():
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this scheduler does not lead (a standby, "
                                                                     "or taking over): report to the leader")

    async def PrefillDone(self, request: spb.PrefillDoneRequest, context) -> spb.PrefillDoneResponse:
        bind_request(request.request_id)
        await self._check_instance(request.instance_id, context)
        await self._require_leader(context)
        await self.server.prefill_done(request)
        return spb.PrefillDoneResponse()

    async def RequestDone(self, request: spb.RequestDoneRequest, context) -> spb.RequestDoneResponse:
        bind_request(request.request_id)
        await self._check_instance(request.instance_id, context)
        await self._require_leader(context)
        await self.server.request_done(request)
        return spb.RequestDoneResponse()

    async def GetClusterState(self, request: spb.ClusterStateRequest, context) -> spb.ClusterState:
        return self.server.cluster_state()

    async def Drain(self, request: spb.DrainRequest, context) -> spb.DrainResponse:
        await self._check_instance(request.instance_id, context)
        self.server.drain_worker(request.instance_id, request.finished)
        return spb.DrainResponse()

    async def GetRecommendation(self, request: spb.RecommendationRequest, context) -> spb.Recommendation:
        return self.server.recommendation()

    async def ResetPrefixCache(self, request: pb.ResetPrefixCacheRequest,
                               context) -> pb.ResetPrefixCacheResponse:
        await self._require_leader(context)
        return await self.server.reset_prefix_caches()

    async def HandBack(self, request: spb.HandBackRequest, context) -> spb.HandBackResponse:
        bind_request(request.request_id)
        await self._check_instance(request.instance_id, context)
        await self._require_leader(context)
        self.server.hand_back(request)
        return spb.HandBackResponse()


async def _check_layout(layout: pb.KvLayout, context) -> None:
    """The KV layout decode servers are matched and their blocks counted by (a block size of 0
    divided by zero in the scheduler's dispatch loop)."""
    sizes = (layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.block_size)
    if min(sizes) < 1 or len(layout.dtype) > MAX_DTYPE_CHARS:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"kv_layout: layers, KV heads, head dim and block size must be >= 1 (got {sizes}) "
                            f"and dtype at most {MAX_DTYPE_CHARS} characters")


async def _check_stats(stats: pb.WorkerStats, context) -> None:
    """The scheduler passes a worker's step histograms on to the gateways' /metrics: refuse any it
    could not have made."""
    try:
        check_step_histograms(stats.steps)
        if not 0 <= stats.prefix_cache_hits <= stats.prefix_cache_queries:
            raise ValueError(f"prefix cache hits {stats.prefix_cache_hits} are not within [0, queries "
                             f"{stats.prefix_cache_queries}]")
    except ValueError as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"worker stats: {exc}")
