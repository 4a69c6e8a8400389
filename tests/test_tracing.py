"""OpenTelemetry traces: one trace per request with spans from every service, the context carried in
gRPC metadata and the QueuedRequest, a hostile traceparent ignored, and nothing loaded when off.

The traced cluster is conftest's grpc_cluster (mutual TLS, gRPC KV transport), which exports to the
in-memory OTLP collector of tests/otlp.py; the colocated modes are traced in test_colocated.py."""

from __future__ import annotations

import argparse
import itertools
import json
import secrets
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from conftest import start_cluster, stop_cluster
from otlp import CollectedSpan

from splitserve.common.net import free_port
from splitserve.common.tracing import (
    NO_TRACER,
    SHUTDOWN_WAIT_S,
    add_tracing_args,
    parse_traceparent,
    tracer_from,
)
from splitserve.v1 import gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.timeout(180)

GATEWAY, SCHEDULER = "splitserve-gateway", "splitserve-scheduler"
PREFILL, DECODE = "splitserve-prefill", "splitserve-decode"
DISAGGREGATED_SPANS = {(GATEWAY, "request"), (GATEWAY, "admit"), (GATEWAY, "queue"),
                       (SCHEDULER, "placement"), (SCHEDULER, "decode placement"),
                       (PREFILL, "batch wait"), (PREFILL, "prefill"), (PREFILL, "kv hold"),
                       (DECODE, "admission wait"), (DECODE, "kv transfer"), (DECODE, "decode")}
EPS = 0.005  # clock rounding between services on one machine


def new_traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def complete(url: str, headers: dict, **body) -> dict:
    request = urllib.request.Request(url + "/v1/completions", method="POST", headers={
        "Content-Type": "application/json", **headers}, data=json.dumps(
        {"prompt": "Tracing check: count from one to five.", "max_tokens": 6, "ignore_eos": True, **body}).encode())
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def one(spans: list[CollectedSpan], service: str, name: str) -> CollectedSpan:
    found = [s for s in spans if (s.service, s.name) == (service, name)]
    assert len(found) == 1, (service, name, found)
    return found[0]


def test_one_request_is_one_trace_with_spans_from_all_four_services(grpc_cluster, otlp_collector):
    traceparent, trace_id, client_span = new_traceparent()
    body = complete(grpc_cluster.http_url, {"traceparent": traceparent})
    assert body["usage"]["completion_tokens"] == 6
    spans = otlp_collector.wait_for(trace_id, DISAGGREGATED_SPANS)
    assert {s.trace_id for s in spans} == {trace_id}
    assert all(s.attributes["gen_ai.request.id"] == body["id"] for s in spans)
    assert not [s for s in spans if s.error], [s for s in spans if s.error]
    span = {key: one(spans, *key) for key in DISAGGREGATED_SPANS}
    request = span[GATEWAY, "request"]
    # Nesting: the client's span > the gateway's request span > its steps and the scheduler's
    # placements (through the QueuedRequest) > each worker's spans (through the Submit's metadata).
    assert request.parent_id == client_span
    for key in [(GATEWAY, "admit"), (GATEWAY, "queue"), (SCHEDULER, "placement"), (SCHEDULER, "decode placement")]:
        assert span[key].parent_id == request.span_id, key
    for name in ("batch wait", "prefill", "kv hold"):
        assert span[PREFILL, name].parent_id == span[SCHEDULER, "placement"].span_id, name
    for name in ("admission wait", "kv transfer", "decode"):
        assert span[DECODE, name].parent_id == span[SCHEDULER, "decode placement"].span_id, name
    # The lifecycle in order, each step within the request span.
    steps = [span[GATEWAY, "admit"], span[SCHEDULER, "placement"], span[PREFILL, "batch wait"],
             span[PREFILL, "prefill"], span[DECODE, "admission wait"], span[DECODE, "kv transfer"],
             span[DECODE, "decode"]]
    for before, after in itertools.pairwise(steps):
        assert before.start <= after.start + EPS, (before, after)
    assert span[PREFILL, "prefill"].end <= span[DECODE, "kv transfer"].start + EPS
    assert span[DECODE, "kv transfer"].end <= span[DECODE, "decode"].start + EPS
    assert all(request.start - EPS <= s.start <= s.end <= request.end + EPS for s in steps)
    assert span[DECODE, "decode"].attributes["gen_ai.usage.output_tokens"] == 6
    assert span[DECODE, "kv transfer"].attributes["splitserve.kv_transport"] == "grpc"
    assert span[DECODE, "kv transfer"].attributes["splitserve.kv_bytes"] > 0
    assert request.attributes["gen_ai.usage.output_tokens"] == 6
    assert request.attributes["gen_ai.response.finish_reasons"] == "length"


def test_grpc_metadata_carries_the_clients_context_and_n_samples_share_one_request_span(
        grpc_cluster, otlp_collector):
    traceparent, trace_id, client_span = new_traceparent()
    with grpc.insecure_channel(grpc_cluster.grpc_address) as channel:
        responses = list(gateway_pb2_grpc.GatewayStub(channel).Generate(
            gateway_pb2.GenerateRequest(prompt="Tracing over gRPC.", max_tokens=3, ignore_eos=True),
            metadata=(("traceparent", traceparent),), timeout=120))
    assert sum(len(r.token_ids) for r in responses) == 3
    spans = otlp_collector.wait_for(trace_id, DISAGGREGATED_SPANS)
    assert one(spans, GATEWAY, "request").parent_id == client_span

    traceparent, trace_id, _ = new_traceparent()
    body = complete(grpc_cluster.http_url, {"traceparent": traceparent}, n=2, max_tokens=2)
    assert len(body["choices"]) == 2
    spans = otlp_collector.wait_for(trace_id, DISAGGREGATED_SPANS)
    request = one(spans, GATEWAY, "request")
    samples = {s.attributes["gen_ai.request.id"] for s in spans if (s.service, s.name) == (DECODE, "decode")}
    assert samples == {f"{body['id']}-0", f"{body['id']}-1"}
    admits = [s for s in spans if (s.service, s.name) == (GATEWAY, "admit")]
    assert len(admits) == 2 and all(s.parent_id == request.span_id for s in admits)


@pytest.mark.parametrize("hostile", ["00-" + "0" * 32 + "-" + "1" * 16 + "-01",  # an all-zero trace id
                                     "ff-" + "a" * 32 + "-" + "b" * 16 + "-01",  # an unknown version
                                     "00-" + "A" * 32 + "-" + "b" * 16 + "-01",  # upper case
                                     "00-" + "a" * 32 + "-" + "b" * 16 + "-01" + "x" * 4000])
def test_a_malformed_traceparent_is_ignored_and_the_request_starts_its_own_trace(
        grpc_cluster, otlp_collector, hostile):
    body = complete(grpc_cluster.http_url, {"traceparent": hostile}, max_tokens=1)
    assert body["choices"][0]["finish_reason"] == "length"
    (request,) = otlp_collector.find(GATEWAY, "request", **{"gen_ai.request.id": body["id"]})
    assert request.parent_id == "" and request.trace_id != "a" * 32


def test_traceparent_parsing_takes_only_the_w3c_form():
    assert parse_traceparent("00-" + "a" * 32 + "-" + "b" * 16 + "-01") == (int("a" * 32, 16), int("b" * 16, 16), 1)
    for bad in ("", None, "00-" + "a" * 32 + "-" + "0" * 16 + "-01", "00-" + "a" * 31 + "-" + "b" * 16 + "-01",
                "00_" + "a" * 32 + "-" + "b" * 16 + "-01", " 00-" + "a" * 32 + "-" + "b" * 16 + "-01",
                "00-" + "a" * 32 + "-" + "b" * 16 + "-01\n"):
        assert parse_traceparent(bad) is None, bad


def test_the_endpoint_comes_from_the_flag_or_the_standard_variables(monkeypatch):
    def endpoint(*argv: str) -> str | None:
        parser = argparse.ArgumentParser()
        add_tracing_args(parser)
        return parser.parse_args(argv).otlp_endpoint

    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert endpoint() is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    assert endpoint() == "http://collector:4317"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317")
    assert endpoint() == "http://traces:4317"
    assert endpoint("--otlp-endpoint", "http://flag:4317") == "http://flag:4317"


def test_tracing_off_loads_nothing():
    """Without an endpoint every service runs with NO_TRACER: no span is made, and OpenTelemetry's
    tracing SDK and exporter are never imported (redis-py imports its API and metrics by itself)."""
    assert tracer_from(None, "gateway") is NO_TRACER and tracer_from("", "decode") is NO_TRACER
    code = ("import sys\n"
            "import splitserve.services.gateway.server, splitserve.services.scheduler.main\n"
            "import splitserve.services.prefill.app, splitserve.services.decode.app, splitserve.services.colocated.app\n"
            "from splitserve.common.tracing import tracer_from\n"
            "tracer = tracer_from(None, 'gateway')\n"
            "span = tracer.start('request', '', root=True)\n"
            "assert not tracer.enabled and span.traceparent == '' and span.metadata() == ()\n"
            "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk.trace', "
            "'opentelemetry.exporter'))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_collector_that_is_down_costs_the_cluster_nothing(tmp_path):
    """Spans to an endpoint nobody listens on are retried and dropped on the exporters' threads:
    requests are served, and every service still stops at once on SIGTERM (its last spans get
    SHUTDOWN_WAIT_S at most)."""
    cluster = start_cluster(tmp_path / "logs", "--mode", "colocated", "--threads-per-worker", "1",
                            "--otlp-endpoint", f"http://127.0.0.1:{free_port()}")
    try:
        for _ in range(3):
            body = complete(cluster.http_url, {}, max_tokens=4)
            assert body["usage"]["completion_tokens"] == 4
    finally:
        started = time.monotonic()
        code = stop_cluster(cluster)
    stop_s = time.monotonic() - started
    assert code == 0, cluster.log_tail()
    assert stop_s < 30 + SHUTDOWN_WAIT_S
