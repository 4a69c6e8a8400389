"""The colocated worker's state: one engine runs each request from prompt to last token.

It is placed by the scheduler like a prefill server. When a request's first token is out it reports
PrefillDone (no KV handle: nothing moves), so the scheduler stops counting its prompt against this
worker's room; when the request ends it reports RequestDone. Tokens go to the request's gateway in
order through one sender task, as on the decode server.

Draining (SIGTERM): Submit is refused; requests with no token out yet go back to the scheduler at
once, running ones get the drain timeout to finish, and the rest go back then.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import structlog

from splitserve.common.service import Progress
from splitserve.common.tracing import NO_TRACER, Tracer
from splitserve.engine.engine import LLMEngine
from splitserve.v1 import common_pb2 as pb
from splitserve.v1 import scheduler_pb2 as spb
from splitserve.worker.common import (
    Draining,
    Fence,
    ReplyPublisher,
    SchedulerLink,
    add_to_engine,
    drain_requests,
    engine_stats,
    loop_stats,
    token_event,
)
from splitserve.worker.config import WorkerConfig
from splitserve.worker.engine_loop import EngineLoop, StepResult
from splitserve.worker.trace import NO_SPANS, RequestSpans

log = structlog.get_logger(__name__)


@dataclass
class Running:
    """A request from Submit to its last token."""

    request: pb.QueuedRequest
    spans: RequestSpans = NO_SPANS
    num_emitted: int = 0


class ColocatedServer:
    def __init__(self, config: WorkerConfig, engine: LLMEngine, redis, tracer: Tracer = NO_TRACER) -> None:
        self.config = config
        self.tracer = tracer
        self.loop = EngineLoop(engine, self._on_step, snapshot=engine_stats)
        self.replies = ReplyPublisher(redis)
        self.link: SchedulerLink | None = None  # set once it exists: reports and hand-backs go through it
        self.fence = Fence()  # refuses a deposed scheduler's Submit and Abort
        self.requests: dict[str, Running] = {}
        self.draining = False
        self.progress = Progress()  # a request finished or left

    async def submit(self, request: pb.QueuedRequest, traceparent: str = "") -> None:
        """Queue a request (its spans under traceparent, the Submit's); ValueError when the engine
        cannot serve it."""
        rid = request.request_id
        if self.draining:
            raise Draining()
        if rid in self.requests:  # the scheduler lost track of this copy and sent it again
            await self.drop(rid)
        await add_to_engine(self.loop, self.requests, request,
                            Running(request, RequestSpans.of(self.tracer, request, traceparent)))

    async def abort(self, request_id: str) -> bool:
        """Drop a request at the scheduler's word (its client went away, or it runs elsewhere)."""
        return await self.drop(request_id)

    async def drop(self, request_id: str, why: str = "aborted") -> bool:
        running = self.requests.pop(request_id, None)
        if running is None:
            return False
        running.spans.decoded(running.request.timeline.first_token, running.num_emitted, why)
        await self.loop.call(lambda e: e.abort(request_id))
        self.progress.note()
        log.info(f"{why}, blocks freed", request_id=request_id)
        return True

    async def drain(self, link: SchedulerLink, timeout_s: float) -> None:
        """Hand back the requests with no token out yet; give the running ones timeout_s to finish,
        then hand back the rest."""
        queued = [rid for rid, running in self.requests.items() if running.num_emitted == 0]
        await drain_requests(self, link, queued, timeout_s)

    def held(self) -> list[str]:
        """Every request here, from Submit to its last token."""
        return list(self.requests)

    async def stats(self) -> pb.WorkerStats:
        return loop_stats(self.loop)

    def _on_step(self, result: StepResult) -> None:
        events, prefilled, finished = [], [], []
        for out in result.outputs:
            running = self.requests.get(out.request_id)
            if running is None:  # aborted while its step ran
                continue
            timeline = running.request.timeline
            if running.num_emitted == 0:
                # With chunked prefill this is the step that ran the prompt's last chunk.
                timeline.prefill_start, timeline.prefill_end = result.started, result.ended
                timeline.first_token = time.time()
                running.spans.prefilled(running.request, out.num_cached_tokens, len(result.outputs))
            else:
                timeline.token_times.append(result.ended)
            event = token_event(running.request, running.num_emitted, out)
            running.num_emitted += 1
            if out.finish_reason is not None:
                del self.requests[out.request_id]
                self.progress.note()
                running.spans.decoded(timeline.first_token, running.num_emitted, out.finish_reason.value, out.error)
            if running.num_emitted == 1:  # its first event: a token, or the error of its first step
                prefilled.append(self._prefill_done(running, event))
                self.link.owe(spb.PrefillDoneRequest, out.request_id)
            elif out.finish_reason is not None:
                self.link.owe(spb.RequestDoneRequest, out.request_id)
                finished.append((out.request_id, event.finish_reason, event.index + len(event.token_ids),
                                 event.error))
            events.append((running.request.reply_stream, event))
        self.replies.send(events, then=lambda: asyncio.gather(
            *(self.link.report(d) for d in prefilled),
            *(self._report_done(*done) for done in finished)))

    def _prefill_done(self, running: Running, event: pb.TokenEvent) -> spb.PrefillDoneRequest:
        return spb.PrefillDoneRequest(request_id=running.request.request_id,
                                      instance_id=self.config.instance_id, output_token_ids=event.token_ids,
                                      finish_reason=event.finish_reason, error=event.error,
                                      timeline=running.request.timeline)

    async def _report_done(self, rid: str, reason: int, num_tokens: int, error: str = "") -> None:
        done = spb.RequestDoneRequest(request_id=rid, instance_id=self.config.instance_id,
                                      finish_reason=reason, error=error, num_output_tokens=num_tokens)
        await self.link.report(done)
