"""Plumbing every worker (prefill or decode) shares: flags, config, stats, the scheduler link, cancels."""

from __future__ import annotations

import asyncio
import time

import grpc
import structlog

from splitserve.common.net import advertised_host
from splitserve.common.rpc import open_channel
from splitserve.engine.engine import LLMEngine
from splitserve.engine.request import RequestState
from splitserve.queue.streams import CANCEL_CHANNEL, ProtoCodec, PubSub, TextCodec
from splitserve.v1 import common_pb2 as pb
from splitserve.v1 import scheduler_pb2 as spb
from splitserve.v1 import scheduler_pb2_grpc
from splitserve.worker.config import WorkerConfig

log = structlog.get_logger(__name__)
def engine_stats(engine: LLMEngine) -> pb.WorkerStats:
    """Load and KV usage of an engine; call on the engine thread."""
    held = [s for s in engine.sequences.values() if s.state is RequestState.KV_READY]
    waiting = engine.scheduler.waiting
    return pb.WorkerStats(
        num_blocks=engine.blocks.num_blocks,
        num_free_blocks=engine.blocks.num_free_blocks,
        num_running=len(engine.scheduler.running) + len(held),
        num_waiting=len(waiting),
        num_queued_prompt_tokens=sum(s.num_prompt_tokens for s in waiting),
        num_held=len(held),
    )


class SchedulerLink:
    """Registers this worker with the scheduler and heartbeats; re-registers when forgotten."""

    def __init__(self, config: WorkerConfig, info: spb.WorkerInfo, stats) -> None:
        # stats: async () -> WorkerStats, answered without waiting for an engine step
        self.config, self.info, self._stats = config, info, stats
        self.channel = open_channel(config.scheduler)
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)

    async def run(self) -> None:
        """Register (retrying until the scheduler answers), then heartbeat forever."""
        await self._register()
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_s)  # a timer, not a poll
            await self._heartbeat()

    async def _register(self) -> None:
        delay = 0.2
        while True:
            try:
                await self.stub.Register(spb.RegisterRequest(worker=self.info, stats=await self._stats()),
                                         timeout=5)
                log.info("registered", scheduler=self.config.scheduler, instance_id=self.info.instance_id)
                return
            except grpc.aio.AioRpcError as exc:
                log.warning("scheduler unreachable, retrying", code=exc.code().name, retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _heartbeat(self) -> None:
        request = spb.HeartbeatRequest(instance_id=self.info.instance_id, stats=await self._stats())
        try:
            await self.stub.Heartbeat(request, timeout=5)
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.NOT_FOUND:
                await self._register()
            else:
                log.warning("heartbeat failed", code=exc.code().name)


def advertised_address(config: WorkerConfig, port: int) -> str:
    return f"{advertised_host(config.host)}:{port}"


async def call_with_retries(rpc, request, what: str, attempts: int = 5, timeout_s: float = 10.0):
    """Call a unary RPC, retrying with backoff: a lost PrefillDone/RequestDone strands a request."""
    delay = 0.2
    for attempt in range(1, attempts + 1):
        try:
            return await rpc(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            if attempt == attempts or exc.code() is grpc.StatusCode.INVALID_ARGUMENT:
                log.error(f"{what} failed", code=exc.code().name, attempts=attempt)
                return None
            await asyncio.sleep(delay)
            delay *= 2


class Tombstones:
    """Ids of cancelled requests, remembered for a while so a late Submit is refused."""

    def __init__(self, ttl_s: float = 300.0) -> None:
        self.ttl_s = ttl_s
        self._ids: dict[str, float] = {}

    def add(self, request_id: str) -> None:
        now = time.monotonic()
        self._ids = {k: t for k, t in self._ids.items() if now - t < self.ttl_s}
        self._ids[request_id] = now

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._ids


async def listen_for_cancels(client, on_cancel) -> None:
    """Call on_cancel(request_id) for every id published on the cancel channel."""
    async for request_id in PubSub(client, TextCodec()).subscribe(CANCEL_CHANNEL):
        await on_cancel(request_id)


class ReplyPublisher:
    """Publishes TokenEvents in the order they were produced, batching what piles up.

    Concurrent publishes from separate tasks could overtake one another on different Redis
    connections; one sender task keeps each request's tokens in order.
    """

    def __init__(self, client) -> None:
        self._pubsub = PubSub(client, ProtoCodec(pb.TokenEvent))
        self._outbox: asyncio.Queue = asyncio.Queue()

    def send(self, events: list[tuple[str, pb.TokenEvent]], then=None) -> None:
        """Queue (channel, event) pairs; `then` (a coroutine function) runs once they are out."""
        self._outbox.put_nowait((events, then))

    async def run(self) -> None:
        while True:
            batch = [await self._outbox.get()]
            while not self._outbox.empty():
                batch.append(self._outbox.get_nowait())
            await self._pubsub.publish_many([e for events, _ in batch for e in events])
            for _, then in batch:
                if then is not None:
                    asyncio.ensure_future(then())
