"""OpenTelemetry traces: one trace per request, a span per lifecycle step in every service.

The gateway starts a request's trace (its `request` span, under the client's own `traceparent` when it
sent one) and puts the span's W3C `traceparent` into the QueuedRequest. The scheduler's placement
spans hang under it; each Submit carries the placement span's context in its gRPC metadata, and the
worker's spans (batch wait, prefill, admission wait, KV transfer, decode) hang under that. Spans are
recorded from the timestamps the services keep anyway (the Timeline), mostly after the fact.

Off unless an OTLP endpoint is given (`--otlp-endpoint`, or the standard
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT): then `NO_TRACER` stands in, whose
every call returns at once, and opentelemetry is not even imported. On, spans go to the collector over
OTLP/gRPC in batches from a thread of their own (at most 2,048 waiting; past that they are dropped,
never the requests). The standard OTEL_* variables (sampler, headers, batch delay, timeout) apply.
A context is only ever taken from a well-formed `traceparent`; anything else is ignored, as W3C
says, so a hostile one can at most start its own request's trace.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import structlog

log = structlog.get_logger(__name__)

TRACEPARENT = "traceparent"  # the W3C header, and the gRPC metadata key
ENDPOINT_ENVS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
# version 00: 32 hex trace id, 16 hex span id, 2 hex flags; all-zero ids are invalid
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_TRACEPARENT_CHARS = 55
SHUTDOWN_WAIT_S = 2.0  # what an exiting service gives its last spans to reach the collector (ms when it is up)

AttributeValue = str | float  # OpenTelemetry attribute values: strings, numbers (ints and bools count)


def add_tracing_args(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--otlp-endpoint", default=next(filter(None, map(env, ENDPOINT_ENVS)), None),
                        help="OpenTelemetry collector to send each request's trace spans to over OTLP/gRPC, "
                             "e.g. http://127.0.0.1:4317 (env OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or "
                             "OTEL_EXPORTER_OTLP_ENDPOINT; default: no tracing)")


def parse_traceparent(value: str | None) -> tuple[int, int, int] | None:
    """(trace id, span id, flags) of a well-formed W3C traceparent; None for anything else."""
    if not value or len(value) > _TRACEPARENT_CHARS:
        return None
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return None
    trace_id, span_id, flags = (int(g, 16) for g in match.groups())
    return (trace_id, span_id, flags) if trace_id and span_id else None


def grpc_traceparent(context: Any) -> str:
    """The traceparent in a gRPC call's metadata, or ""."""
    for key, value in context.invocation_metadata() or ():
        if key == TRACEPARENT:
            return value if isinstance(value, str) else ""
    return ""


class Span:
    """A span under way; ends once. This base class is the no-op one (tracing off, or no parent)."""

    traceparent = ""  # its context for its children, "" when it records nothing

    def set(self, **attributes: AttributeValue) -> None:
        pass

    def end(self, end: float | None = None, error: str | None = None) -> None:
        pass

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """gRPC metadata carrying its context to the callee."""
        return ((TRACEPARENT, self.traceparent),) if self.traceparent else ()


NO_SPAN = Span()


class Tracer:
    """Tracing off: every call is a no-op. `tracer_from(endpoint, ...)` gives the real one."""

    enabled = False

    def start(self, name: str, parent: str, start: float | None = None, root: bool = False,
              **attributes: AttributeValue) -> Span:
        """A span under the context `parent` (a traceparent) from `start` (wall-clock seconds; now when
        None). Without a valid parent it records nothing, unless root (the gateway's request span,
        which then starts a trace)."""
        return NO_SPAN

    def record(self, name: str, parent: str, start: float, end: float,
               **attributes: AttributeValue) -> None:
        """A finished span, from timestamps kept anyway (wall-clock seconds)."""

    def flush(self) -> None:
        """Until every span recorded so far has been sent."""

    def shutdown(self) -> None:
        pass


NO_TRACER = Tracer()


@dataclass
class _OtelSpan(Span):
    span: Any  # opentelemetry.trace.Span

    @property
    def traceparent(self) -> str:  # type: ignore[override]
        ctx = self.span.get_span_context()
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}" if ctx.is_valid else ""

    def set(self, **attributes: AttributeValue) -> None:
        self.span.set_attributes(attributes)

    def end(self, end: float | None = None, error: str | None = None) -> None:
        if error is not None:
            from opentelemetry.trace import Status, StatusCode

            self.span.set_status(Status(StatusCode.ERROR, error[:256]))
        self.span.end(end_time=None if end is None else _ns(end))


class _OtelTracer(Tracer):
    enabled = True

    def __init__(self, provider: Any) -> None:
        from opentelemetry import trace

        self._trace = trace
        self._provider = provider
        self._tracer = provider.get_tracer("splitserve")

    def start(self, name: str, parent: str, start: float | None = None, root: bool = False,
              **attributes: AttributeValue) -> Span:
        context = self._context(parent)
        if context is None and not root:
            return NO_SPAN
        kind = self._trace.SpanKind.SERVER if root else self._trace.SpanKind.INTERNAL
        span = self._tracer.start_span(name, context=context, kind=kind, attributes=attributes,
                                       start_time=None if start is None else _ns(start))
        return _OtelSpan(span)

    def record(self, name: str, parent: str, start: float, end: float,
               **attributes: AttributeValue) -> None:
        self.start(name, parent, start, **attributes).end(max(start, end))

    def _context(self, parent: str):
        parsed = parse_traceparent(parent)
        if parsed is None:
            return None
        trace_id, span_id, flags = parsed
        remote = self._trace.SpanContext(trace_id, span_id, is_remote=True,
                                         trace_flags=self._trace.TraceFlags(flags & 0x01))
        return self._trace.set_span_in_context(self._trace.NonRecordingSpan(remote))

    def flush(self) -> None:
        self._provider.force_flush()

    def shutdown(self) -> None:
        """Send what is left, waiting at most SHUTDOWN_WAIT_S (a collector that is down must not hold
        the exit)."""
        done = threading.Thread(target=self._provider.shutdown, name="otel-shutdown", daemon=True)
        done.start()
        done.join(SHUTDOWN_WAIT_S)


def tracer_from(endpoint: str | None, service: str, instance_id: str | None = None) -> Tracer:
    """The service's tracer: NO_TRACER without an endpoint; else spans of `service` (the resource's
    service.name, splitserve-<service>) exported to endpoint. RuntimeError when opentelemetry is not
    installed (every role's extra has it)."""
    if not endpoint:
        return NO_TRACER
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise RuntimeError(f"--otlp-endpoint needs OpenTelemetry: pip install 'splitserve[tracing]' ({exc})") from None
    attributes = {"service.name": f"splitserve-{service}", "service.namespace": "splitserve"}
    if instance_id:
        attributes["service.instance.id"] = instance_id
    provider = TracerProvider(resource=Resource.create(attributes), shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    log.info("exporting traces", otlp_endpoint=endpoint)
    return _OtelTracer(provider)


@contextlib.asynccontextmanager
async def exporting(endpoint: str | None, service: str, instance_id: str | None = None) -> AsyncIterator[Tracer]:
    """The service's tracer (tracer_from) for as long as it serves; its last spans are sent at the end."""
    tracer = tracer_from(endpoint, service, instance_id)
    try:
        yield tracer
    finally:
        await asyncio.to_thread(tracer.shutdown)


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)
