"""The prefill server's state: its engine thread, the KV blocks it holds for pulls, and their leases.

KV ownership: a prefilled request's blocks stay allocated in this engine until (a) the decode server
acknowledges its pull (Release), (b) the lease runs out with no pull in progress, or (c) the request
is aborted. Each heartbeat answer of the leading scheduler that still awaits the pull starts the lease
again, so it runs out only once no leader has awaited the pull for that long (none answers, or the
leader no longer tracks the request, which it then aborts here anyway). A transport that is sending
a payload pins it (KvSource.open .. close) and the lease waits for the pin; the payload itself is a
copy (export_kv), so bytes on the wire never change.

Draining (SIGTERM): Submit is refused, the queue is prefilled, and held blocks wait for their pulls;
what is still held when the drain times out goes back to the scheduler, which runs it again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass

import structlog

from splitserve.common.protoconv import finish_to_proto, layout_to_proto
from splitserve.common.service import Background, Progress
from splitserve.common.tracing import NO_TRACER, Tracer
from splitserve.engine.engine import LLMEngine
from splitserve.engine.kv_cache import export_bytes
from splitserve.engine.request import StepOutput
from splitserve.kv_transfer.base import check_capability, pull_size
from splitserve.v1 import common_pb2 as pb
from splitserve.v1 import scheduler_pb2 as spb
from splitserve.worker.common import (
    Draining,
    Fence,
    ReplyPublisher,
    SchedulerLink,
    add_to_engine,
    engine_stats,
    loop_stats,
    token_event,
)
from splitserve.worker.config import WorkerConfig
from splitserve.worker.engine_loop import EngineLoop, StepResult
from splitserve.worker.trace import NO_SPANS, RequestSpans

log = structlog.get_logger(__name__)
PULL_GRACE_S = 5.0  # a drain that timed out still lets pulls already sending finish this long


@dataclass
class Held:
    """A request from Submit until its blocks are released."""

    request: pb.QueuedRequest
    spans: RequestSpans = NO_SPANS
    handle: pb.KvHandle | None = None
    pins: int = 0
    lease: asyncio.TimerHandle | None = None


class PrefillServer:
    def __init__(self, config: WorkerConfig, engine: LLMEngine, redis, kv_lease_s: float,
                 tracer: Tracer = NO_TRACER) -> None:
        self.config = config
        self.tracer = tracer
        self.loop = EngineLoop(engine, self._on_step, after_step=_block_tables, snapshot=engine_stats)
        self.replies = ReplyPublisher(redis)  # runs its follow-ups as background tasks
        self.link: SchedulerLink | None = None  # set once it exists: reports go through it
        self.fence = Fence()  # refuses a deposed scheduler's Submit and Abort
        self.kv_lease_s = kv_lease_s
        self.requests: dict[str, Held] = {}
        self.background = Background()
        self.draining = False
        self.progress = Progress()  # a request's blocks were freed, or a pull ended
        self.grpc_address = ""  # set once the gRPC server is bound
        self.kv_address = ""  # the KV server's address (UCX), set at start

    # -- requests -------------------------------------------------------------------------------

    async def submit(self, request: pb.QueuedRequest, traceparent: str = "") -> None:
        """Queue a request for prefill (its spans under traceparent, the Submit's); ValueError when the
        engine cannot serve it."""
        rid = request.request_id
        if self.draining:
            raise Draining()
        if not request.kv_capability:  # its KV would be open to anyone who guessed its id
            raise ValueError(f"request {rid!r} has no KV capability (the scheduler mints one per Submit)")
        if rid in self.requests:  # the scheduler reassigned it (its decode server died): start over
            await self._free(rid, "replayed")
        await add_to_engine(self.loop, self.requests, request,
                            Held(request, RequestSpans.of(self.tracer, request, traceparent)))

    async def release(self, request_id: str, capability: str) -> None:
        """Decode acknowledged its pull: free the blocks (unknown ids are a harmless retry).
        KvPermissionDenied, freeing nothing, when capability is not the request's."""
        held = self.requests.get(request_id)
        if held is None or held.handle is None:
            return
        check_capability(held.request.kv_capability, capability, request_id)
        await self._free(request_id, "pulled")

    async def abort(self, request_id: str) -> bool:
        """Drop a request at the scheduler's word (its client went away, or it runs elsewhere)."""
        if request_id not in self.requests:
            return False
        await self._free(request_id, "aborted")
        return True

    async def _free(self, request_id: str, why: str) -> None:
        held = self.requests.pop(request_id, None)
        if held is None:  # released and aborted at once: the first one freed it
            return
        if held.lease:
            held.lease.cancel()
        held.spans.released(held.request.timeline.prefill_end if held.handle else 0.0, why)
        # engine.abort frees the blocks whatever the state (queued, prefilling, kv_ready).
        await self.loop.call(lambda e: e.abort(request_id))
        self.progress.note()
        log.info("kv blocks freed", request_id=request_id, reason=why)

    async def stats(self) -> pb.WorkerStats:
        return loop_stats(self.loop)

    def held(self) -> list[str]:
        """Every request here, from Submit until its blocks are freed."""
        return list(self.requests)

    async def drain(self, link: SchedulerLink, timeout_s: float) -> None:
        """Prefill the queue and wait for the held blocks to be pulled (or their leases to end); hand
        back what is still here after timeout_s, once pulls already sending have ended."""
        log.info("draining", requests=len(self.requests), timeout_s=timeout_s)
        if not await self.progress.until(lambda: not self.requests, timeout_s):
            await self.progress.until(lambda: not any(h.pins for h in self.requests.values()), PULL_GRACE_S)
        left = list(self.requests)

        async def hand_back(rid: str) -> None:  # the scheduler first: it tells a decode server not to pull
            await link.hand_back(rid)
            await self._free(rid, "handed back")

        await asyncio.gather(*map(hand_back, left))
        log.info("drained", handed_back=len(left))

    # -- after each step ------------------------------------------------------------------------

    def _on_step(self, result: StepResult) -> None:
        events, done = [], []
        for out in result.outputs:
            held = self.requests.get(out.request_id)
            if held is None:  # aborted while its batch ran
                continue
            timeline = held.request.timeline
            timeline.prefill_start, timeline.prefill_end = result.started, result.ended
            timeline.first_token = time.time()
            held.spans.prefilled(held.request, out.num_cached_tokens, len(result.outputs))
            events.append(self._first_token_event(held, out, result.extra))
            done.append(self._prefill_done(held, out))
            self.link.owe(spb.PrefillDoneRequest, out.request_id)
        # The first tokens go toward the clients before the scheduler hears of the KV blocks.
        self.replies.send(events, then=lambda: asyncio.gather(*(self._report(d) for d in done)))

    def _first_token_event(self, held: Held, out: StepOutput,
                           block_tables: dict) -> tuple[str, pb.TokenEvent]:
        request = held.request
        event = token_event(request, 0, out)
        if out.finish_reason is not None:
            self.requests.pop(out.request_id)
            self.progress.note()
        else:
            held.handle = self._handle(out.request_id, block_tables[out.request_id])
            held.lease = asyncio.get_running_loop().call_later(self.kv_lease_s, self._expire, out.request_id)
        return request.reply_stream, event

    def _prefill_done(self, held: Held, out: StepOutput) -> spb.PrefillDoneRequest:
        return spb.PrefillDoneRequest(
            request_id=out.request_id, instance_id=self.config.instance_id, kv=held.handle,
            output_token_ids=[] if out.token_id is None else [out.token_id],
            finish_reason=finish_to_proto(out.finish_reason), error=out.error or "",
            timeline=held.request.timeline)

    def _handle(self, request_id: str, block_ids: list[int]) -> pb.KvHandle:
        engine = self.loop.engine
        request = self.requests[request_id].request
        return pb.KvHandle(
            request_id=request_id, prefill_instance_id=self.config.instance_id,
            prefill_grpc_address=self.grpc_address, transport=self.config.kv_transport_proto,
            ucx_address=self.kv_address, block_ids=block_ids, num_tokens=len(request.prompt_token_ids),
            layout=layout_to_proto(engine.layout), num_bytes=len(block_ids) * engine.layout.bytes_per_block,
            lease_expires=time.time() + self.kv_lease_s, capability=request.kv_capability)

    async def _report(self, done: spb.PrefillDoneRequest) -> None:
        # The lease frees the blocks if the scheduler never hears of them.
        await self.link.report(done)

    def extend_leases(self, request_ids: Iterable[str]) -> None:
        """The leading scheduler still awaits these requests' pulls (a decode server has them queued
        until its memory frees, or none has taken them yet): their leases start again from now. Ids
        of requests not held here, or not prefilled yet, are ignored."""
        loop = asyncio.get_running_loop()
        for rid in set(request_ids):
            held = self.requests.get(rid)
            if held is not None and held.lease is not None:
                held.lease.cancel()
                held.lease = loop.call_later(self.kv_lease_s, self._expire, rid)

    def _expire(self, request_id: str) -> None:
        held = self.requests.get(request_id)
        if held is None:
            return
        if held.pins:  # a pull is in progress: look again shortly
            held.lease = asyncio.get_running_loop().call_later(1.0, self._expire, request_id)
            return
        log.warning("kv lease expired before any pull", request_id=request_id)
        self.background.spawn(self._free(request_id, "lease expired"))

    # -- KvSource, for the transports ----------------------------------------------------------

    async def open(self, request_id: str, capability: str, first_block: int = 0) -> memoryview | None:
        held = self.requests.get(request_id)
        if held is None or held.handle is None:
            return None
        check_capability(held.request.kv_capability, capability, request_id)
        pull_size(held.handle, first_block)  # InvalidKvHandle when it names no block held
        held.pins += 1
        try:
            # Off the engine thread: a pinned request's blocks are written by no one until released.
            blocks = await asyncio.to_thread(self.loop.engine.export_kv, request_id, first_block)
        except BaseException:  # cancelled pulls too: a pin left behind would hold the blocks forever
            held.pins -= 1
            raise
        return export_bytes(blocks)

    def close(self, request_id: str) -> None:
        held = self.requests.get(request_id)
        if held is not None:
            held.pins -= 1
            self.progress.note()


def _block_tables(engine: LLMEngine, outputs: list[StepOutput]) -> dict[str, list[int]]:
    """On the engine thread after a step: block ids of every request now holding KV for a pull."""
    return {o.request_id: engine.blocks.block_table(o.request_id)
            for o in outputs if o.finish_reason is None}
