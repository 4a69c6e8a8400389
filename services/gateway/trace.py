"""A request's trace at the gateway (splitserve/common/tracing.py): the `request` span that roots it,
under the client's own traceparent when it sent one, and the gateway's steps `admit` (checks and
tokenization, up to the stream) and `queue` (in the stream and the scheduler's queue, up to its
placement on a prefill server). n samples share one request span, a step span each."""

from __future__ import annotations

import time
from dataclasses import dataclass

from splitserve.common.tracing import NO_SPAN, Span, Tracer
from splitserve.v1 import common_pb2 as pb

from .schema import Finish, GenerationRequest, Usage


@dataclass
class RequestTrace:
    tracer: Tracer
    span: Span = NO_SPAN
    owned: bool = True  # this sample's own request span (n = 1), ended with it

    @classmethod
    def start(cls, tracer: Tracer, request: GenerationRequest, request_id: str, arrival: float) -> RequestTrace:
        if not tracer.enabled:
            return cls(tracer)
        span = tracer.start("request", request.traceparent or "", arrival, root=True, **{
            "gen_ai.request.id": request_id, "gen_ai.request.model": request.model or "",
            "splitserve.api": request.api.value, "splitserve.n": request.n})
        return cls(tracer, span)

    def sample(self) -> RequestTrace:
        """The trace of one of n samples: under this request span, which it does not end."""
        return RequestTrace(self.tracer, self.span, owned=False)

    @property
    def traceparent(self) -> str:
        return self.span.traceparent

    def queued(self, request_id: str, timeline: pb.Timeline, num_prompt_tokens: int) -> None:
        self.tracer.record("admit", self.traceparent, timeline.arrival, timeline.queued,
                           **{"gen_ai.request.id": request_id, "splitserve.prompt_tokens": num_prompt_tokens})

    def finished(self, request_id: str, queued: float | None, timeline: pb.Timeline | None,
                 finish: Finish | None, usage: Usage, error: str | None) -> None:
        """The queue step (to its placement, or to the end when it never left the queue), and the
        request span's end with its usage."""
        if not self.tracer.enabled:
            return
        now = time.time()
        if queued:
            placed = timeline.scheduled if timeline is not None and timeline.scheduled else now
            self.tracer.record("queue", self.traceparent, queued, placed, **{"gen_ai.request.id": request_id})
        if not self.owned:
            return
        self.span.set(**{"gen_ai.usage.input_tokens": usage.prompt_tokens,
                         "gen_ai.usage.output_tokens": usage.completion_tokens,
                         "splitserve.cached_tokens": usage.cached_tokens,
                         "gen_ai.response.finish_reasons": finish.value if finish else "error"})
        self.span.end(now, error)

    def end(self, error: str | None = None) -> None:
        """The request span of n samples, once they all ended."""
        if self.owned:
            self.span.end(error=error)
