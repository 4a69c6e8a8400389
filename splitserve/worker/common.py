"""Plumbing every worker (prefill, decode, colocated) shares: its registration, stats, the scheduler
link, ordered reply publishing, and the drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Protocol

import grpc
import structlog

from splitserve.common.net import advertised_host
from splitserve.common.protoconv import finish_to_proto, layout_to_proto, sampling_from_proto
from splitserve.common.rpc import NOT_SERVING, open_channel
from splitserve.common.service import Background, Progress
from splitserve.engine.engine import LLMEngine
from splitserve.engine.request import RequestState, StepOutput
from splitserve.queue.streams import ProtoCodec, ReplyWriter
from splitserve.v1 import common_pb2 as pb
from splitserve.v1 import scheduler_pb2 as spb
from splitserve.v1 import scheduler_pb2_grpc
from splitserve.worker.config import WorkerConfig
from splitserve.worker.engine_loop import EngineLoop

log = structlog.get_logger(__name__)
FLUSH_TIMEOUT_S = 10.0  # at exit, how long the last tokens and reports may take to go out


class Draining(Exception):
    """Raised by a worker's Submit while it shuts down (gRPC FAILED_PRECONDITION): place it elsewhere."""

    def __init__(self) -> None:
        super().__init__("this worker is draining (shutting down); it takes no new requests")


def worker_info(config: WorkerConfig, role: int, grpc_address: str, engine: LLMEngine) -> spb.WorkerInfo:
    return spb.WorkerInfo(
        instance_id=config.instance_id, role=role, grpc_address=grpc_address,
        model=engine.loaded.source.name, max_model_len=engine.max_model_len,
        token_budget=config.engine.token_budget, max_num_seqs=config.engine.max_num_seqs,
        kv_layout=layout_to_proto(engine.layout), kv_transport=config.kv_transport_proto,
        num_cores=_parallelism(config.engine.device),
    )


def _parallelism(device: str) -> int:
    """Cores on CPU (the torch threads it runs with), one device on a GPU."""
    import torch

    return torch.get_num_threads() if device == "cpu" else 1


def engine_stats(engine: LLMEngine) -> pb.WorkerStats:
    """Load and KV usage of an engine; call on the engine thread."""
    held = [s for s in engine.sequences.values() if s.state is RequestState.KV_READY]
    waiting = engine.scheduler.waiting
    return pb.WorkerStats(
        num_blocks=engine.blocks.num_blocks,
        num_free_blocks=engine.blocks.num_free_blocks,
        num_running=len(engine.scheduler.running) + len(engine.scheduler.prefilling) + len(held),
        num_waiting=len(waiting),
        num_queued_prompt_tokens=sum(s.num_prompt_tokens for s in waiting),
        num_held=len(held),
    )


class SchedulerLink:
    """Registers this worker with the scheduler and heartbeats; re-registers when forgotten."""

    def __init__(self, config: WorkerConfig, info: spb.WorkerInfo, stats) -> None:
        # stats: async () -> WorkerStats, answered without waiting for an engine step
        self.config, self.info, self._stats = config, info, stats
        self.channel = open_channel(config.scheduler, config.cluster_auth, "scheduler")
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)
        self.draining = False
        self.gone = False  # drained and about to exit: no more heartbeats, never re-register

    async def run(self) -> None:
        """Register (retrying until the scheduler answers), then heartbeat forever."""
        await self._register()
        while not self.gone:
            await asyncio.sleep(self.config.heartbeat_interval_s)  # a timer, not a poll
            await self._heartbeat()
        await asyncio.Event().wait()  # gone: idle until the process ends

    async def _register(self) -> None:
        delay = 0.2
        while True:
            try:
                await self.stub.Register(spb.RegisterRequest(worker=self.info, stats=await self._stats()),
                                         timeout=5)
                log.info("registered", scheduler=self.config.scheduler, instance_id=self.info.instance_id)
                if self.draining:  # a scheduler that forgot us must not place work here again
                    await self.drain()
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    # A configuration error (the cluster token, the advertised address): say so loudly.
                    log.error("the scheduler refused this worker, retrying", code=exc.code().name,
                              reason=exc.details(), retry_in_s=delay)
                else:
                    log.warning("scheduler unreachable, retrying", code=exc.code().name, retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _heartbeat(self) -> None:
        request = spb.HeartbeatRequest(instance_id=self.info.instance_id, stats=await self._stats())
        try:
            await self.stub.Heartbeat(request, timeout=5)
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.NOT_FOUND and not self.gone:
                await self._register()
            else:
                log.warning("heartbeat failed", code=exc.code().name)

    async def drain(self, finished: bool = False) -> None:
        """Tell the scheduler this worker is draining (nothing new), or, finished, that it exits now."""
        self.draining = True
        self.gone = self.gone or finished
        request = spb.DrainRequest(instance_id=self.info.instance_id, finished=finished)
        await call_with_retries(self.stub.Drain, request, what="Drain", attempts=3, timeout_s=5.0)

    async def hand_back(self, request_id: str, kv_not_pulled: bool = False) -> None:
        """Give a request this draining worker will not finish back to the scheduler."""
        request = spb.HandBackRequest(request_id=request_id, instance_id=self.info.instance_id,
                                      kv_not_pulled=kv_not_pulled)
        await call_with_retries(self.stub.HandBack, request, what="HandBack")


def token_event(request: pb.QueuedRequest, index: int, out: StepOutput) -> pb.TokenEvent:
    """The event carrying one output token at position index; the last one of a request stamps
    `finish` and carries the whole Timeline. A failed step's event has no token, and says why."""
    token_ids = [] if out.token_id is None else [out.token_id]
    event = pb.TokenEvent(request_id=out.request_id, token_ids=token_ids, index=index,
                          finish_reason=finish_to_proto(out.finish_reason), error=out.error or "")
    if out.finish_reason is not None:
        request.timeline.finish = time.time()
        event.timeline.CopyFrom(request.timeline)
    return event


async def add_to_engine(loop, tracked: dict, request: pb.QueuedRequest, entry) -> None:
    """Track entry under the request's id, then queue the request in the engine (loop: EngineLoop).

    Tracked first, because the engine's step may end before the call returns; untracked again if
    the engine refuses the request (ValueError, raised here).
    """
    rid = request.request_id
    params = sampling_from_proto(request.sampling)
    ids = list(request.prompt_token_ids)
    tracked[rid] = entry
    try:
        await loop.call(lambda e: e.add_request(rid, ids, params))
    except ValueError:
        tracked.pop(rid, None)
        raise


class RunningServer(Protocol):
    """A decode or colocated server: requests that run to their last token here."""

    requests: dict
    progress: Progress

    async def drop(self, request_id: str, why: str = "aborted") -> bool:
        """Forget a request and free its blocks; False when it was not here."""


async def drain_requests(server: RunningServer, link: SchedulerLink, early: list[str], timeout_s: float,
                         kv_not_pulled: bool = False) -> None:
    """Hand back `early` at once; give the other requests timeout_s to finish; hand back the rest,
    to run again from their prompts. A request is dropped before it is handed back, so none of its
    tokens goes out once the scheduler has it back."""
    async def hand_back(rids: list[str], kv_intact: bool) -> None:
        async def one(rid: str) -> None:
            if await server.drop(rid, "handed back"):
                await link.hand_back(rid, kv_intact)
        await asyncio.gather(*map(one, rids))

    await hand_back(early, kv_not_pulled)
    log.info("draining", running=len(server.requests), handed_back_early=len(early), timeout_s=timeout_s)
    await server.progress.until(lambda: not server.requests, timeout_s)
    running = list(server.requests)
    await hand_back(running, False)
    log.info("drained", handed_back_early=len(early), handed_back_running=len(running))


class DrainableServer(Protocol):
    """What worker_shutdown needs of a prefill, decode or colocated server."""

    draining: bool
    loop: EngineLoop
    replies: ReplyPublisher

    async def drain(self, link: SchedulerLink, timeout_s: float) -> None:
        """Finish what it holds, within timeout_s, and hand the rest back through link."""


def worker_shutdown(health, grpc_server, server: DrainableServer, link: SchedulerLink, timeout_s: float):
    """What a worker does on SIGTERM: refuse new requests, tell the scheduler, finish or hand back what
    it holds (server.drain), send its last tokens and reports, say it is gone, and stop.

    After a failed engine step there is nothing to finish: the scheduler requeues the worker's
    requests when it hears it is gone.
    """
    async def shutdown() -> None:
        server.draining = True  # Submit refuses from here on
        await health.set("", NOT_SERVING)
        if not server.loop.failed.done():
            await link.drain()
            await server.drain(link, timeout_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.replies.flush(), FLUSH_TIMEOUT_S)
        await link.drain(finished=True)
        await grpc_server.stop(2)
        await server.loop.stop()
    return shutdown


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


class ReplyPublisher:
    """Appends TokenEvents to their reply streams in the order they were produced, batching what
    piles up.

    Concurrent appends from separate tasks could overtake one another on different Redis
    connections; one sender task keeps each request's tokens in order.
    """

    def __init__(self, client) -> None:
        self._writer = ReplyWriter(client, ProtoCodec(pb.TokenEvent))
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._background = Background()

    def send(self, events: list[tuple[str, pb.TokenEvent]], then=None) -> None:
        """Queue (stream, event) pairs; `then` (a coroutine function) runs once they are out."""
        self._outbox.put_nowait((events, then))

    async def run(self) -> None:
        while True:
            batch = [await self._outbox.get()]
            while not self._outbox.empty():
                batch.append(self._outbox.get_nowait())
            await self._writer.publish_many([e for events, _ in batch for e in events])
            for _, then in batch:
                if then is not None:
                    self._background.spawn(then())
                self._outbox.task_done()

    async def flush(self) -> None:
        """Until everything sent so far is published and its follow-ups (reports) have run."""
        await self._outbox.join()
        await self._background.wait()
