"""An OpenTelemetry collector for tests: a real OTLP/gRPC TraceService on 127.0.0.1 that keeps in
memory every span the services export to it."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class CollectedSpan:
    service: str  # the resource's service.name
    name: str
    trace_id: str  # hex
    span_id: str
    parent_id: str  # "" for a root
    start: float  # seconds
    end: float
    attributes: dict
    error: str  # the status message when its status is ERROR, else ""


class OtlpCollector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self._spans: list[CollectedSpan] = []
        self._lock = threading.Lock()
        self._server = grpc.server(ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpCollector:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None)

    def Export(self, request, context):
        spans = [_span(resource_spans, span) for resource_spans in request.resource_spans
                 for scope in resource_spans.scope_spans for span in scope.spans]
        with self._lock:
            self._spans.extend(spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[CollectedSpan]:
        with self._lock:
            return [s for s in self._spans if s.trace_id == trace_id]

    def wait_for(self, trace_id: str, names: set[tuple[str, str]], timeout_s: float = 30.0) -> list[CollectedSpan]:
        """The trace's spans once it has every (service, name) of names; AssertionError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            spans = self.trace(trace_id)
            if names <= {(s.service, s.name) for s in spans}:
                return spans
            if time.monotonic() > deadline:
                raise AssertionError(f"missing spans {names - {(s.service, s.name) for s in spans}}; have "
                                     f"{sorted((s.service, s.name) for s in spans)}")
            time.sleep(0.1)

    def find(self, service: str, name: str, timeout_s: float = 30.0, **attributes) -> list[CollectedSpan]:
        """The spans named so with these attributes, once there is one; AssertionError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                found = [s for s in self._spans if (s.service, s.name) == (service, name)
                         and all(s.attributes.get(k) == v for k, v in attributes.items())]
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"no span {service} {name} with {attributes}")
            time.sleep(0.1)


def _span(resource_spans, span) -> CollectedSpan:
    resource = _attributes(resource_spans.resource.attributes)
    error = span.status.message if span.status.code == span.status.STATUS_CODE_ERROR else ""
    return CollectedSpan(resource.get("service.name", ""), span.name, span.trace_id.hex(), span.span_id.hex(),
                         span.parent_span_id.hex(), span.start_time_unix_nano / 1e9, span.end_time_unix_nano / 1e9,
                         _attributes(span.attributes), error)


def _attributes(key_values) -> dict:
    out = {}
    for kv in key_values:
        kind = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, kind) if kind else None
    return out
