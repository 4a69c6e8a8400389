"""A worker's spans of a request (splitserve/common/tracing.py), recorded from the timestamps it keeps
anyway (the Timeline, the engine step's times) once each step is over.

Their parent is the context the Submit's gRPC metadata carried (the scheduler's placement span), or
else the gateway's request span in the QueuedRequest. Prefill server: `batch wait` (Submit to its
batch's start), `prefill`, `kv hold` (until the blocks are freed: pulled, lease, abort). Decode
server: `admission wait` (Submit to its blocks reserved), `kv transfer`, `decode`. Colocated
worker: `batch wait`, `prefill`, `decode`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from splitserve.common.tracing import NO_TRACER, Tracer
from splitserve.v1 import common_pb2 as pb


@dataclass(frozen=True)
class RequestSpans:
    tracer: Tracer
    request_id: str
    parent: str  # traceparent
    received: float = field(default_factory=time.time)  # the Submit arrived (wall clock)

    @classmethod
    def of(cls, tracer: Tracer, request: pb.QueuedRequest, submit_traceparent: str) -> RequestSpans:
        if not tracer.enabled:
            return NO_SPANS
        return cls(tracer, request.request_id, submit_traceparent or request.trace_context)

    def _record(self, name: str, start: float, end: float, **attributes: str | float) -> None:
        attributes = {f"splitserve.{k}": v for k, v in attributes.items()}
        self.tracer.record(name, self.parent, start, end, **{"gen_ai.request.id": self.request_id}, **attributes)

    def prefilled(self, request: pb.QueuedRequest, num_cached_tokens: int, batch_size: int) -> None:
        """Its batch ran its prompt (the Timeline's prefill_start and prefill_end)."""
        if not self.tracer.enabled:
            return
        timeline = request.timeline
        self._record("batch wait", self.received, timeline.prefill_start)
        self._record("prefill", timeline.prefill_start, timeline.prefill_end,
                     prompt_tokens=len(request.prompt_token_ids), cached_tokens=num_cached_tokens,
                     batch_size=batch_size)

    def released(self, since: float, reason: str) -> None:
        """Its KV blocks, held for a pull since `since`, were freed."""
        if self.tracer.enabled and since:
            self._record("kv hold", since, time.time(), reason=reason)

    def admitted(self, at: float) -> None:
        """Its destination blocks were reserved: the pull starts."""
        if self.tracer.enabled:
            self._record("admission wait", self.received, at)

    def pulled(self, start: float, num_bytes: int, num_blocks: int, transport: str,
               error: str | None = None) -> None:
        if not self.tracer.enabled:
            return
        span = self.tracer.start("kv transfer", self.parent, start, **{
            "gen_ai.request.id": self.request_id, "splitserve.kv_bytes": num_bytes,
            "splitserve.kv_blocks": num_blocks, "splitserve.kv_transport": transport})
        span.end(time.time(), error)

    def decoded(self, start: float, num_output_tokens: int, finish: str, error: str | None = None) -> None:
        """Its decode ended: at its last token (finish is its reason; error, a failed step's), or when
        it was dropped (finish says why: aborted, handed back)."""
        if self.tracer.enabled and start:
            span = self.tracer.start("decode", self.parent, start, **{
                "gen_ai.request.id": self.request_id, "gen_ai.usage.output_tokens": num_output_tokens,
                "gen_ai.response.finish_reasons": finish})
            span.end(time.time(), error)


NO_SPANS = RequestSpans(NO_TRACER, "", "", 0.0)  # tracing off: every method returns at once
