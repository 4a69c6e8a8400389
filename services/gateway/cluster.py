"""What the gateway knows of the cluster: the scheduler's ClusterState, polled in the background."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
import structlog

from splitserve.v1 import common_pb2 as pb
from splitserve.v1 import scheduler_pb2 as spb
from splitserve.v1 import scheduler_pb2_grpc

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ClusterSnapshot:
    """The last answer from the scheduler (None: it has not answered, or the last poll failed)."""

    state: spb.ClusterState | None = None

    def num_workers(self, role: int) -> int:
        """Workers of this role registered and taking work (a draining one takes none)."""
        workers = self.state.workers if self.state else []
        return sum(1 for w in workers if w.worker.role == role and not w.draining)

    @property
    def ready(self) -> bool:
        """At least one prefill and one decode worker taking work, or one colocated worker."""
        disaggregated = all(self.num_workers(role) > 0 for role in (spb.WORKER_ROLE_PREFILL, spb.WORKER_ROLE_DECODE))
        return disaggregated or self.num_workers(spb.WORKER_ROLE_COLOCATED) > 0

    @property
    def max_model_len(self) -> int | None:
        """The smallest context limit among registered workers; None with no workers."""
        workers = self.state.workers if self.state else []
        return min((w.worker.max_model_len for w in workers if w.worker.max_model_len), default=None)


OnUpdate = Callable[[ClusterSnapshot], Awaitable[None]]


class ClusterView:
    """Polls Scheduler.GetClusterState of every scheduler every interval_s and keeps the leader's
    answer (a standby's, when none leads: it knows the workers too); readiness, the context limit and
    the load gauges all read the latest snapshot."""

    def __init__(self, stubs: list[scheduler_pb2_grpc.SchedulerStub], interval_s: float,
                 on_update: OnUpdate) -> None:
        self.stubs, self.interval_s, self.on_update = stubs, interval_s, on_update
        self.snapshot = ClusterSnapshot()

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            await self.poll()
            await asyncio.sleep(self.interval_s)

    async def poll(self) -> None:
        states = [s for s in await asyncio.gather(*map(self._ask, self.stubs)) if s is not None]
        state = next((s for s in states if s.leader), states[0] if states else None)
        if state is None and self.snapshot.state is not None:  # log the transition, not every failed poll
            log.warning("no scheduler answers")
        snapshot = ClusterSnapshot(state)
        if snapshot.ready != self.snapshot.ready:
            log.info("cluster readiness changed", ready=snapshot.ready,
                     prefill_workers=snapshot.num_workers(spb.WORKER_ROLE_PREFILL),
                     decode_workers=snapshot.num_workers(spb.WORKER_ROLE_DECODE),
                     colocated_workers=snapshot.num_workers(spb.WORKER_ROLE_COLOCATED))
        self.snapshot = snapshot
        await self.on_update(snapshot)

    async def reset_prefix_caches(self) -> pb.ResetPrefixCacheResponse | None:
        """Ask every scheduler; the leader's answer (standbys refuse), or None when no scheduler leads."""
        async def ask(stub: scheduler_pb2_grpc.SchedulerStub) -> pb.ResetPrefixCacheResponse | None:
            try:
                return await stub.ResetPrefixCache(pb.ResetPrefixCacheRequest(), timeout=30.0)
            except grpc.aio.AioRpcError as exc:
                log.info("prefix cache reset refused", code=exc.code().name, details=exc.details())
                return None
        return next((a for a in await asyncio.gather(*map(ask, self.stubs)) if a is not None), None)

    async def _ask(self, stub: scheduler_pb2_grpc.SchedulerStub) -> spb.ClusterState | None:
        try:
            return await stub.GetClusterState(spb.ClusterStateRequest(), timeout=max(1.0, self.interval_s))
        except grpc.aio.AioRpcError as exc:
            log.debug("scheduler unreachable", code=exc.code().name, details=exc.details())
            return None
