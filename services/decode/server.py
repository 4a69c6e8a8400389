"""The decode server's state: admission by free blocks, KV pulls, and the running batch's tokens.

KV ownership: a request's destination blocks are reserved (engine.reserve) before its pull starts.
The payload lands in fresh memory, not in the cache, and import_kv writes it into the reserved
blocks on the engine thread only if the request still holds them. A request cancelled mid-pull
frees its reservation at once; its late payload is dropped, so no block is ever written after it
was handed to another request.

Draining (SIGTERM): Submit is refused; requests not admitted yet go back to the scheduler at once
(their KV still waits on the prefill server, so another decode server pulls it); running ones get
the drain timeout to finish, and those still running then go back to run again from their prompts.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import structlog
import torch

from splitserve.common.protoconv import sampling_from_proto
from splitserve.common.rpc import ChannelCache
from splitserve.common.service import Background, Progress
from splitserve.common.tracing import NO_TRACER, Tracer
from splitserve.engine.block_manager import OutOfBlocks
from splitserve.engine.engine import LLMEngine
from splitserve.kv_transfer.base import KvPuller, check_handle
from splitserve.v1 import common_pb2 as pb
from splitserve.v1 import decode_pb2, prefill_pb2, prefill_pb2_grpc
from splitserve.v1 import scheduler_pb2 as spb
from splitserve.worker.common import (
    Draining,
    Fence,
    ReplyPublisher,
    SchedulerLink,
    call_with_retries,
    drain_requests,
    engine_stats,
    grammar_matcher,
    loop_stats,
    token_event,
)
from splitserve.worker.config import WorkerConfig
from splitserve.worker.engine_loop import EngineLoop, StepResult
from splitserve.worker.trace import NO_SPANS, RequestSpans

log = structlog.get_logger(__name__)


class WaitingFull(Exception):
    """Submit past --max-waiting (gRPC RESOURCE_EXHAUSTED): the scheduler tries later or elsewhere."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"{limit} requests already wait for KV blocks here (--max-waiting); try later")


@dataclass
class Admitted:
    """A request this server took over, from Submit to finish."""

    submit: decode_pb2.DecodeRequest
    spans: RequestSpans = NO_SPANS
    num_emitted: int = 0  # output tokens sent so far (the prefill server sent the first)
    first_block: int = 0  # the prompt's blocks before this one came from the prefix cache: not pulled
    matcher: Any = None  # the grammar's, fed the tokens prefill sampled (built once, off the engine thread)

    @property
    def request(self) -> pb.QueuedRequest:
        return self.submit.request


class DecodeServer:
    def __init__(self, config: WorkerConfig, engine: LLMEngine, redis, puller: KvPuller,
                 tracer: Tracer = NO_TRACER) -> None:
        self.config = config
        self.tracer = tracer
        self.loop = EngineLoop(engine, self._on_step, snapshot=engine_stats)
        self.replies = ReplyPublisher(redis)
        self.puller = puller
        self.link: SchedulerLink | None = None  # set once it exists: reports and hand-backs go through it
        self.fence = Fence()  # refuses a deposed scheduler's Submit and Abort
        self.requests: dict[str, Admitted] = {}
        self.waiting: deque[str] = deque()  # FCFS, until blocks are free
        self.room = asyncio.Event()  # set when blocks may have been freed
        self.background = Background()
        self.draining = False
        self.progress = Progress()  # a request finished, failed or left
        self._prefill_channels = ChannelCache(config.cluster_auth)  # for Release, one per prefill server

    # -- requests -------------------------------------------------------------------------------

    async def submit(self, submit: decode_pb2.DecodeRequest, traceparent: str = "") -> None:
        """Queue a prefilled request for admission (its spans under traceparent, the Submit's);
        ValueError when it can never run here (a KV handle that does not fit this cache included),
        WaitingFull when too many wait already."""
        rid = submit.request.request_id
        if self.draining:
            raise Draining()
        if rid in self.requests:  # the scheduler reassigned it after losing track of this copy
            await self.drop(rid)
        self._check_kv(submit)
        sampling_from_proto(submit.request.sampling)  # validates
        if len(self.waiting) >= self.config.waiting_limit:
            raise WaitingFull(self.config.waiting_limit)
        spans = RequestSpans.of(self.tracer, submit.request, traceparent)
        self.requests[rid] = Admitted(submit, spans, num_emitted=len(submit.output_token_ids))
        self.waiting.append(rid)
        self.room.set()

    def _check_kv(self, submit: decode_pb2.DecodeRequest) -> None:
        """The handle must describe this request's prompt in this cache's layout: its num_bytes is
        what the pull allocates."""
        num_prompt_tokens = len(submit.request.prompt_token_ids)
        if submit.kv.num_tokens != num_prompt_tokens:
            raise ValueError(f"the KV handle holds {submit.kv.num_tokens} tokens, the prompt has "
                             f"{num_prompt_tokens}")
        check_handle(submit.kv, self.loop.engine.layout)

    async def abort(self, request_id: str) -> bool:
        """Drop a request at the scheduler's word (its client went away, or it runs elsewhere)."""
        return await self.drop(request_id)

    async def drop(self, request_id: str, why: str = "aborted") -> bool:
        """Forget a request and free its blocks, wherever it is."""
        admitted = self.requests.pop(request_id, None)
        if admitted is None:
            return False
        if request_id in self.waiting:
            self.waiting.remove(request_id)
        admitted.spans.decoded(admitted.request.timeline.kv_transfer_end, admitted.num_emitted, why)
        await self.loop.call(lambda e: e.abort(request_id))
        self.room.set()
        self.progress.note()
        log.info(f"{why}, blocks freed", request_id=request_id)
        return True

    async def drain(self, link: SchedulerLink, timeout_s: float) -> None:
        """Hand back the requests not admitted yet (admission stopped with `draining`: their KV waits
        on the prefill server still, so another decode server pulls it); give the running ones
        timeout_s to finish, then hand back the rest."""
        await drain_requests(self, link, list(self.waiting), timeout_s, kv_not_pulled=True)

    def held(self) -> list[str]:
        """Every request here, from Submit (waiting for blocks included) to its last token."""
        return list(self.requests)

    async def stats(self) -> pb.WorkerStats:
        stats = loop_stats(self.loop)
        stats.num_waiting += len(self.waiting)
        return stats

    # -- admission: reserve, pull, acknowledge -------------------------------------------------

    async def admit_forever(self) -> None:
        """Admit waiting requests FCFS whenever blocks may have been freed."""
        while True:
            await self.room.wait()
            self.room.clear()
            while self.waiting and not self.draining and await self._try_admit(self.waiting[0]):
                pass

    async def _try_admit(self, rid: str) -> bool:
        """Reserve blocks for the head request and start its pull; False when there is no room yet."""
        admitted = self.requests[rid]
        submit, params = admitted.submit, sampling_from_proto(admitted.request.sampling)
        prompt, output = list(submit.request.prompt_token_ids), list(submit.output_token_ids)
        salt = submit.request.cache_salt or None
        try:
            matcher = admitted.matcher = admitted.matcher or await grammar_matcher(self.loop.engine, params, output)
        except ValueError as exc:  # the grammar refuses what prefill sampled
            return self._refuse(rid, admitted, str(exc))
        if self.requests.get(rid) is not admitted:  # dropped while its grammar was built
            return True

        def reserve(e: LLMEngine) -> int:
            e.reserve(rid, prompt, output, params, salt, matcher)
            return e.sequences[rid].num_cached_tokens // e.blocks.block_size

        try:
            admitted.first_block = await self.loop.call(reserve)
        except OutOfBlocks:
            return False
        except ValueError as exc:
            return self._refuse(rid, admitted, str(exc))
        self._dequeue(rid)
        if self.requests.get(rid) is not admitted:  # cancelled while reserving: the free is queued
            return True
        self.background.spawn(self._pull(rid, admitted))
        return True

    def _refuse(self, rid: str, admitted: Admitted, error: str) -> bool:
        """Fail the head request, unless it was dropped while it was checked: a copy the scheduler
        sent again meanwhile waits in the queue on its own (failing it would leave its id queued
        without a request, which admission cannot take)."""
        if self.requests.get(rid) is admitted:
            self._dequeue(rid)
            self.background.spawn(self._fail(rid, error))
        return True

    def _dequeue(self, rid: str) -> None:
        # abort() may have removed it while reserve() ran, so never pop blindly.
        if self.waiting and self.waiting[0] == rid:
            self.waiting.popleft()

    async def _pull(self, rid: str, admitted: Admitted) -> None:
        timeline, handle = admitted.request.timeline, admitted.submit.kv
        timeline.kv_transfer_start = time.time()
        admitted.spans.admitted(timeline.kv_transfer_start)
        num_blocks = len(handle.block_ids) - admitted.first_block
        try:
            pulled = await self._pull_into_cache(rid, admitted)
        except Exception as exc:  # any failure fails this pull, never the server
            admitted.spans.pulled(timeline.kv_transfer_start, 0, num_blocks, self.config.kv_transport, repr(exc))
            # The KV is gone or out of reach (its prefill server left, its lease ran out): the
            # request runs again from its prompt; the scheduler gives up after a few tries.
            log.warning("KV pull failed, handing the request back", request_id=rid,
                        prefill=handle.prefill_instance_id, error=repr(exc))
            if self.requests.get(rid) is admitted and await self.drop(rid, "kv pull failed"):
                await self.link.hand_back(rid)
            await self._acknowledge(handle)  # the prefill server need not wait for its lease
            return
        if self.requests.get(rid) is not admitted:  # cancelled or replaced during the pull
            await self._acknowledge(handle)
            return
        timeline.kv_transfer_end = time.time()
        timeline.kv_transfer_bytes = pulled
        admitted.spans.pulled(timeline.kv_transfer_start, pulled, num_blocks, self.config.kv_transport)
        await self._acknowledge(handle)

    async def _pull_into_cache(self, rid: str, admitted: Admitted) -> int:
        """Pull the blocks the prefix cache lacks into the reserved ones; returns the bytes pulled."""
        handle = admitted.submit.kv
        payload = await self.puller.pull(handle, admitted.first_block)
        if self.requests.get(rid) is not admitted:  # its reservation was freed meanwhile
            return payload.nbytes
        layout = self.loop.engine.layout
        blocks = torch.frombuffer(payload, dtype=torch.uint8).view(layout.dtype).view(
            layout.export_shape(len(handle.block_ids) - admitted.first_block))
        # The payload is this pull's own memory: converted to the cache's layout here, off the engine
        # thread, which then only copies it in.
        blocks = await asyncio.to_thread(self.loop.engine.cache.to_memory_layout, blocks)
        # On the engine thread, after abort()'s free if one was queued first: import_kv then refuses.
        await self.loop.call(lambda e: e.import_kv(rid, blocks, in_memory_layout=True))
        return payload.nbytes

    async def _acknowledge(self, handle: pb.KvHandle) -> None:
        """Tell the prefill server its blocks were pulled, so it frees them. Should every try fail, they
        are freed when the request ends (the leader, which extends their lease until then, aborts it
        there), or once no leader answers for the lease's length."""
        stub = prefill_pb2_grpc.PrefillStub(self._prefill_channels.get(handle.prefill_grpc_address, "prefill"))
        release = prefill_pb2.ReleaseRequest(request_id=handle.request_id, capability=handle.capability)
        await call_with_retries(stub.Release, release, what="Release", attempts=3,
                                request_id=handle.request_id)

    async def _fail(self, rid: str, error: str) -> None:
        log.warning("request failed", request_id=rid, error=error)
        admitted = self.requests.pop(rid, None)
        await self.loop.call(lambda e: e.abort(rid))
        self.room.set()
        self.progress.note()
        if admitted is None:
            return
        self.link.owe(spb.RequestDoneRequest, rid)
        event = pb.TokenEvent(request_id=rid, index=admitted.num_emitted,
                              finish_reason=pb.FINISH_REASON_ERROR, error=error)
        self.replies.send([(admitted.request.reply_stream, event)],
                          then=lambda: self._report_done(rid, pb.FINISH_REASON_ERROR, admitted.num_emitted, error))

    # -- after each step ------------------------------------------------------------------------

    def _on_step(self, result: StepResult) -> None:
        events, finished = [], []
        for out in result.outputs:
            admitted = self.requests.get(out.request_id)
            if admitted is None:
                continue
            admitted.request.timeline.token_times.append(result.ended)
            event = token_event(admitted.request, admitted.num_emitted, out)
            admitted.num_emitted += 1
            if out.finish_reason is not None:
                del self.requests[out.request_id]
                admitted.spans.decoded(admitted.request.timeline.kv_transfer_end, admitted.num_emitted,
                                       out.finish_reason.value, out.error)
                self.link.owe(spb.RequestDoneRequest, out.request_id)
                finished.append((out.request_id, event.finish_reason, event.index + len(event.token_ids),
                                 event.error))
            events.append((admitted.request.reply_stream, event))
        if finished:
            self.room.set()
            self.progress.note()
        self.replies.send(events, then=lambda: asyncio.gather(
            *(self._report_done(*done) for done in finished)))

    async def _report_done(self, rid: str, reason: int, num_tokens: int, error: str = "") -> None:
        done = spb.RequestDoneRequest(request_id=rid, instance_id=self.config.instance_id,
                                      finish_reason=reason, error=error, num_output_tokens=num_tokens)
        await self.link.report(done)
