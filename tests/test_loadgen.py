"""`splitserve bench serve` / `bench plot`: the report's arithmetic, arrivals, workloads, prompts, SSE
parsing, and whole runs against small in-process fake servers (OpenAI HTTP and splitserve gRPC)."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import threading
from itertools import pairwise
from pathlib import Path
from typing import Self

import grpc
import numpy as np
import pytest
from aiohttp import web

from splitserve.bench import cli as bench_cli
from splitserve.bench.loadgen.arrivals import ArrivalProcess, arrival_times
from splitserve.bench.loadgen.client import read_sse
from splitserve.bench.loadgen.metrics import Slo, summarize
from splitserve.bench.loadgen.prompts import (NONCE_TOKENS, PromptFactory, SharedPrefix, max_cached_tokens,
                                              new_nonce)
from splitserve.bench.loadgen.trace import TraceError, arrivals_at_rate, native_rate, read_trace
from splitserve.bench.loadgen.records import RequestRecord
from splitserve.bench.loadgen.run import prefix_cache_line
from splitserve.bench.loadgen.sweep import sweep_goodput
from splitserve.bench.loadgen.workloads import WORKLOADS, get_workload, sample_lengths
from splitserve.common.net import free_port
from splitserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.timeout(120)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- the report on a hand-built timeline ----------------------------------------------------------


def _record(i: int, send: float, chunks: list[float], prompt: int, end: float | None = None,
            error: str | None = None) -> RequestRecord:
    return RequestRecord(i, prompt, len(chunks), scheduled_s=send, send_s=send, chunk_times_s=chunks,
                         end_s=end if end is not None else chunks[-1], prompt_tokens=prompt,
                         completion_tokens=len(chunks) if chunks else None, error=error)


def timeline() -> list[RequestRecord]:
    """r0: TTFT 100, TPOT 100, ITL 100 x3, E2E 400; r1: TTFT 300, TPOT 200, E2E 500;
    r2: one token, TTFT 200, E2E 200; r3 failed at 4.0 s (the last end: duration 4 s)."""
    return [_record(0, 0.0, [0.1, 0.2, 0.3, 0.4], 10, end=0.45),
            _record(1, 1.0, [1.3, 1.5], 20),
            _record(2, 2.0, [2.2], 30),
            _record(3, 3.0, [], 40, end=4.0, error="HTTP 400: too long")]


def test_report_arithmetic_on_a_known_timeline():
    report = summarize(timeline(), Slo(ttft_s=0.25, tpot_s=0.2, target=0.5))
    assert (report.num_requests, report.completed, report.failed) == (4, 3, 1)
    assert report.duration_s == pytest.approx(4.0)
    assert report.request_throughput == pytest.approx(3 / 4)
    assert report.input_token_throughput == pytest.approx((10 + 20 + 30) / 4)  # completed requests only
    assert report.output_token_throughput == pytest.approx((4 + 2 + 1) / 4)
    ttft, tpot, itl, e2e = report.ttft_ms, report.tpot_ms, report.itl_ms, report.e2e_ms
    assert (ttft.count, ttft.mean, ttft.p50, ttft.p90, ttft.p99) == pytest.approx((3, 200, 200, 280, 298))
    assert (tpot.count, tpot.mean, tpot.p50, tpot.p90, tpot.p99) == pytest.approx((2, 150, 150, 190, 199))
    assert (itl.count, itl.mean, itl.p50, itl.p90, itl.p99) == pytest.approx((4, 125, 100, 170, 197))
    assert (e2e.count, e2e.mean, e2e.p50, e2e.p90, e2e.p99) == pytest.approx((3, 1100 / 3, 400, 480, 498))
    assert e2e.p90 == pytest.approx(np.percentile([200, 400, 500], 90))
    slo = report.slo
    # r0 meets both; r1 misses TTFT (300 ms) but meets TPOT (200 ms); r2 has no TPOT (counts as met);
    # r3 failed and misses both.
    assert (slo.ttft_attainment, slo.tpot_attainment, slo.attainment) == pytest.approx((0.5, 0.75, 0.5))
    assert slo.goodput_rps == pytest.approx(2 / 4)
    assert slo.meets_target
    assert not summarize(timeline(), Slo(ttft_s=0.25, tpot_s=0.2, target=0.9)).slo.meets_target
    assert summarize(timeline()).slo is None


def test_report_of_nothing_completed_has_no_latencies():
    report = summarize([_record(0, 0.0, [], 8, end=1.0, error="boom")], Slo(ttft_s=1.0))
    assert (report.completed, report.failed, report.request_throughput) == (0, 1, 0)
    assert report.ttft_ms.count == 0 and report.ttft_ms.p50 is None
    assert report.slo.attainment == 0


def test_record_round_trips_through_json():
    r = timeline()[0]
    data = json.loads(json.dumps(r.to_json()))
    assert data["ttft_s"] == pytest.approx(0.1) and data["tpot_s"] == pytest.approx(0.1)
    assert RequestRecord.from_json(data) == r


def test_sweep_goodput_interpolates_between_last_pass_and_first_fail():
    points = [(3, 0.8), (1, 1.0), (4, 0.95), (2, 0.95)]  # any order; the later pass at 4 does not count
    g = sweep_goodput(points, 0.9)
    assert g.goodput_rps == pytest.approx(2 + (0.95 - 0.9) / (0.95 - 0.8) * (3 - 2))
    assert (g.last_passing_rate, g.first_failing_rate, g.lower_bound_only) == (2, 3, False)
    every_pass = sweep_goodput([(1, 1.0), (2, 0.92)], 0.9)
    assert (every_pass.goodput_rps, every_pass.lower_bound_only) == (2, True)
    first_fails = sweep_goodput([(1, 0.5), (2, 0.2)], 0.9)
    assert first_fails.goodput_rps is None and first_fails.first_failing_rate == 1


# -- arrivals, workloads, prompts -----------------------------------------------------------------


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in pairwise(times)]


def test_poisson_arrivals_have_the_mean_rate_and_are_reproducible():
    times = arrival_times(ArrivalProcess(rate=4.0), seed=7, num_requests=4000)
    gaps = _gaps(times)
    assert times[0] == 0 and times == sorted(times)
    assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.05)
    assert statistics.stdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, rel=0.1)  # exponential: CV 1
    assert arrival_times(ArrivalProcess(4.0), seed=7, num_requests=4000) == times
    assert arrival_times(ArrivalProcess(4.0), seed=8, num_requests=4000) != times


def test_gamma_burstiness_keeps_the_rate_and_changes_the_variance():
    bursty = _gaps(arrival_times(ArrivalProcess(4.0, burstiness=0.25), seed=1, num_requests=8000))
    regular = _gaps(arrival_times(ArrivalProcess(4.0, burstiness=4.0), seed=1, num_requests=8000))
    for gaps in (bursty, regular):
        assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.08)
    # Gamma(shape B): squared coefficient of variation 1/B.
    assert statistics.variance(bursty) / 0.25**2 == pytest.approx(4.0, rel=0.2)
    assert statistics.variance(regular) / 0.25**2 == pytest.approx(0.25, rel=0.2)


def test_arrivals_by_duration_and_infinite_rate():
    times = arrival_times(ArrivalProcess(10.0), seed=0, duration_s=50.0)
    assert max(times) < 50 and len(times) == pytest.approx(500, rel=0.15)
    assert arrival_times(ArrivalProcess(float("inf")), seed=0, num_requests=5) == [0.0] * 5
    with pytest.raises(ValueError, match="exactly one"):
        arrival_times(ArrivalProcess(1.0), seed=0)


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_workload_lengths_are_in_range_with_the_documented_medians(name):
    workload = WORKLOADS[name]
    lengths = sample_lengths(workload, 4000, seed=3)
    for dist, values in ((workload.input, [i for i, _ in lengths]), (workload.output, [o for _, o in lengths])):
        assert dist.min <= min(values) and max(values) <= dist.max
        assert statistics.median(values) == pytest.approx(dist.median, rel=0.1)
        assert len(set(values)) > 10  # a spread, not a constant
    assert sample_lengths(workload, 50, seed=3) == lengths[:50]
    assert sample_lengths(workload, 50, seed=4) != lengths[:50]


def test_documented_workload_table():
    table = {name: (w.input.median, w.input.sigma, w.input.min, w.input.max,
                    w.output.median, w.output.sigma, w.output.min, w.output.max) for name, w in WORKLOADS.items()}
    assert table == {"chatbot": (192, 0.8, 16, 1024, 48, 0.6, 8, 192),
                     "code": (128, 0.5, 32, 512, 24, 0.5, 8, 96),
                     "summarization": (768, 0.4, 256, 1536, 32, 0.5, 8, 96)}


def test_fixed_and_scaled_workloads():
    assert set(sample_lengths(get_workload("fixed", 32, 8), 20, seed=0)) == {(32, 8)}
    scaled = get_workload("chatbot", input_len=384, output_len=24)
    assert (scaled.input.median, scaled.input.min, scaled.input.max) == (384, 32, 2048)
    assert (scaled.output.median, scaled.output.min, scaled.output.max) == (24, 4, 96)
    assert scaled.input.sigma == WORKLOADS["chatbot"].input.sigma
    with pytest.raises(ValueError, match="unknown workload"):
        get_workload("poetry")


@pytest.mark.parametrize("name, lengths, slos", [("w1", (256, 64), (1.066, 0.0854)),
                                                  ("w2", (1024, 16), (4.474, 0.0919)),
                                                  ("w3", (64, 128), (0.367, 0.0817))])
def test_the_vllm_comparison_presets_fix_lengths_and_default_the_slos(name, lengths, slos):
    from splitserve.bench.loadgen.config import serve_config_from_args

    assert set(sample_lengths(get_workload(name), 10, seed=0)) == {lengths}
    with pytest.raises(ValueError, match="fixes its lengths"):
        get_workload(name, input_len=100)
    parser = argparse.ArgumentParser()
    bench_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    config = serve_config_from_args(parser.parse_args(["bench", "serve", "--workload", name]))
    assert (config.workload.name, config.slo.ttft_s, config.slo.tpot_s) == (name, *slos)
    mine = serve_config_from_args(parser.parse_args(["bench", "serve", "--workload", name, "--tpot-slo", "0.2"]))
    assert (mine.slo.ttft_s, mine.slo.tpot_s) == (slos[0], 0.2)  # a given SLO wins


def test_prompts_have_exact_lengths_and_are_unique_per_run():
    a = PromptFactory(seed=0, nonce=new_nonce())
    b = PromptFactory(seed=0, nonce=new_nonce())
    prompts = [a.token_ids(i, 64) for i in range(50)]
    assert all(len(p) == 64 and all(1000 <= t < 30000 for t in p) for p in prompts)
    assert len({tuple(p) for p in prompts}) == 50
    assert all(p[:NONCE_TOKENS] == list(a.nonce) for p in prompts)  # the run's nonce starts every prompt
    assert b.token_ids(0, 64)[:NONCE_TOKENS] != prompts[0][:NONCE_TOKENS]  # another run, another prefix
    assert len(a.token_ids(1, 2)) == 2  # shorter than the nonce
    fixed = PromptFactory(seed=5, token_range=(10, 20))
    assert fixed.token_ids(3, 16) == PromptFactory(seed=5, token_range=(10, 20)).token_ids(3, 16)
    assert all(10 <= t < 20 for t in fixed.token_ids(3, 16))
    assert PromptFactory(seed=5, point=1).token_ids(3, 16) != PromptFactory(seed=5).token_ids(3, 16)
    assert len(a.text(0, 30).split()) == 30 and a.text(0, 30) != b.text(0, 30)


def test_shared_system_prompts_are_the_only_shared_prefixes():
    shared = SharedPrefix(num_prompts=3, length=40)
    a = PromptFactory(seed=0, nonce=new_nonce(), shared_prefix=shared)
    prompts = [a.token_ids(i, 10) for i in range(30)]
    assert all(len(p) == 50 and p[:NONCE_TOKENS] == list(a.nonce) for p in prompts)
    systems = [a.system_prompt_of(i) for i in range(30)]
    assert set(systems) == {0, 1, 2}
    for p, k in zip(prompts, systems):
        assert p[:40] == a.system_prompt(k)
    assert len({tuple(p[:40]) for p in prompts}) == 3 and len({tuple(p[40:]) for p in prompts}) == 30
    b = PromptFactory(seed=0, nonce=new_nonce(), shared_prefix=shared)  # another run shares nothing
    assert all(b.system_prompt(k)[:NONCE_TOKENS] != a.system_prompt(k)[:NONCE_TOKENS] for k in range(3))


def test_the_prefix_cache_line_sets_the_hits_beside_the_workloads_most():
    factory = PromptFactory(seed=0, shared_prefix=SharedPrefix(num_prompts=2, length=40))
    prompts = {i: factory.token_ids(i, 10) for i in range(4)}
    records = [RequestRecord(i, 50, 4, 0.0, send_s=float(i), prompt_tokens=50,
                             cached_tokens=32 if i > 1 else 0) for i in range(4)]
    for r in records:
        r.add_chunk(1.0)
    uses = [factory.system_prompt_of(i) for i in range(4)]
    most = (4 - len(set(uses))) * 32  # every use but each prompt's first reuses 2 full blocks of 16
    assert prefix_cache_line(records, prompts) == (
        f"prefix cache: 64 of 200 prompt tokens cached (32.0%); this workload's most, 16-token blocks: {most} "
        f"({most / 200:.1%})")
    assert prefix_cache_line([RequestRecord(0, 50, 4, 0.0)], prompts) is None  # the server said nothing


def test_the_workloads_most_counts_leading_blocks_an_earlier_prompt_had():
    a = list(range(100, 148))  # 3 blocks of 16
    assert max_cached_tokens([a], 16) == 0
    assert max_cached_tokens([a, a], 16) == 32  # the block holding the last token is computed anyway
    assert max_cached_tokens([a, a + [7]], 16) == 48
    assert max_cached_tokens([a, [1] + a[1:] + [7]], 16) == 0  # a prefix, not any equal block
    assert max_cached_tokens([a + [7], a[:16] + [9] * 40], 16) == 16  # block 2 differs: the run stops
    assert max_cached_tokens([a[:20], a + [7]], 16) == 16  # block 1 of the first was partial: not cached


def test_a_trace_is_read_checked_and_replayed_at_any_rate(tmp_path: Path):
    path = tmp_path / "trace.jsonl"
    path.write_text(
        '{"timestamp": 1000, "input_length": 1100, "output_length": 20, "hash_ids": [5, 6, 7]}\n'
        '\n'
        '{"timestamp": 1500, "input_length": 700, "output_length": 10, "hash_ids": [5, 6]}\n'
        '{"timestamp": 3000, "input_length": 40, "output_length": 3, "hash_ids": [9]}\n')
    requests = read_trace(path)
    assert [(r.arrival_s, r.input_len, r.output_len, r.hash_ids) for r in requests] == [
        (0.0, 1100, 20, (5, 6, 7)), (0.5, 700, 10, (5, 6)), (2.0, 40, 3, (9,))]
    assert read_trace(path, limit=1) == requests[:1]
    assert native_rate(requests) == 1.0  # 2 gaps over 2 s
    assert arrivals_at_rate(requests, 4.0) == [0.0, 0.125, 0.5]
    assert arrivals_at_rate(requests, math.inf) == [0.0] * 3
    scaled = requests[0].scaled(0.1)
    assert (scaled.input_len, scaled.output_len, scaled.hash_ids) == (110, 2, (5, 6, 7))
    # Equal hash ids are equal blocks, cut to each request's length; every run draws them afresh.
    factory = PromptFactory(seed=0, nonce=new_nonce())
    first, second, third = (factory.trace_prompt(i, r.hash_ids, r.input_len, 512)
                            for i, r in enumerate(requests))
    assert (len(first), len(second), len(third)) == (1100, 700, 40)
    assert first[:700] == second and first[700:] != second[700:] and third != first[:40]
    assert factory.trace_prompt(3, (5,), 600, 512)[512:] != first[512:600]  # past its ids: its own tokens
    other = PromptFactory(seed=0, nonce=new_nonce())
    assert other.trace_prompt(0, (5, 6, 7), 1100, 512)[:16] != first[:16]


@pytest.mark.parametrize("line, fragment", [
    ("not json", "not JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"timestamp": -1, "input_length": 5, "output_length": 1}', "timestamp"),
    ('{"timestamp": "0", "input_length": 5, "output_length": 1}', "timestamp"),
    ('{"timestamp": 0, "input_length": 0, "output_length": 1}', "input_length"),
    ('{"timestamp": 0, "input_length": 5, "output_length": true}', "output_length"),
    ('{"timestamp": 0, "input_length": 5.5, "output_length": 1}', "input_length"),
    ('{"timestamp": 0, "input_length": 99999999999, "output_length": 1}', "input_length"),
    ('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1, -2]}', "hash_ids"),
    ('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": "12"}', "hash_ids"),
])
def test_a_malformed_trace_line_is_refused_with_its_line_number(tmp_path: Path, line, fragment):
    path = tmp_path / "trace.jsonl"
    good = '{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1]}'
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(TraceError, match=f"line 2: .*{fragment}"):
        read_trace(path)


def test_a_trace_out_of_order_or_empty_is_refused(tmp_path: Path):
    path = tmp_path / "trace.jsonl"
    path.write_text('{"timestamp": 5, "input_length": 5, "output_length": 1}\n'
                    '{"timestamp": 4, "input_length": 5, "output_length": 1}\n')
    with pytest.raises(TraceError, match="line 2: timestamp 4 is before"):
        read_trace(path)
    path.write_text("\n")
    with pytest.raises(TraceError, match="no requests"):
        read_trace(path)


# -- SSE ------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        self.t += 1.0
        return self.t


async def _pieces(data: bytes, size: int):
    for i in range(0, len(data), size):
        yield data[i:i + size]


CANNED = (b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
          b': a comment line\n\n'
          b'data: {"choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}],"usage":null}\r\n\r\n'
          b'data: {"choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"length"}]}\n\n'
          b'data: {"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15,'
          b'"prompt_tokens_details":{"cached_tokens":8}}}\n\n'
          b'data: [DONE]\n\n')


@pytest.mark.asyncio
@pytest.mark.parametrize("piece_size", [1, 7, 4096])
async def test_sse_stream_with_usage_in_any_pieces(piece_size):
    record = RequestRecord(0, 12, 3, 0.0, send_s=0.0)
    await read_sse(_pieces(CANNED, piece_size), record, FakeClock())
    assert record.ok and record.error is None
    assert len(record.chunk_times_s) == 2  # the role chunk carries no content
    assert (record.prompt_tokens, record.completion_tokens, record.finish_reason) == (12, 3, "length")
    assert record.cached_tokens == 8
    assert record.end_s > record.chunk_times_s[-1]
    assert record.tpot_s == pytest.approx((record.chunk_times_s[1] - record.chunk_times_s[0]) / 2)


@pytest.mark.asyncio
async def test_sse_error_chunk_and_truncated_stream_fail_the_request():
    record = RequestRecord(0, 12, 3, 0.0, send_s=0.0)
    stream = (b'data: {"choices":[{"index":0,"text":"a","finish_reason":null}]}\n\n'
              b'data: {"error":{"message":"generation failed: worker lost","type":"internal_error"}}\n\n'
              b'data: [DONE]\n\n')
    await read_sse(_pieces(stream, 5), record, FakeClock())
    assert not record.ok and record.error == "generation failed: worker lost"
    truncated = RequestRecord(1, 12, 3, 0.0, send_s=0.0)
    await read_sse(_pieces(b'data: {"choices":[{"index":0,"text":"a"}]}\n\n', 64), truncated, FakeClock())
    assert not truncated.ok and "before [DONE]" in truncated.error


# -- fake servers in a background thread ----------------------------------------------------------

FIRST_S, STEP_S = 0.05, 0.02  # the fake servers' time to the first token and between tokens


def _sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


class FakeOpenAI:
    """Streams one chunk per token (FIRST_S, then every STEP_S) and a usage chunk; the
    `fail_nth`-th request it receives gets HTTP 400."""

    def __init__(self, fail_nth: int | None = None) -> None:
        self.fail_nth, self.bodies = fail_nth, []
        self.app = web.Application()
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_post("/v1/completions", self.generate)
        self.app.router.add_post("/v1/chat/completions", self.generate)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if len(self.bodies) == self.fail_nth:
            return web.json_response({"error": {"message": "prompt too long", "type": "invalid_request_error"}},
                                     status=400)
        chat = "messages" in body
        prompt_tokens = len(body["messages"][0]["content"].split()) + 5 if chat else len(body["prompt"])
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        n = body["max_tokens"]
        for i in range(n):
            await asyncio.sleep(FIRST_S if i == 0 else STEP_S)
            choice = {"index": 0, "finish_reason": "length" if i == n - 1 else None}
            choice |= {"delta": {"content": f" t{i}"}} if chat else {"text": f" t{i}"}
            await response.write(_sse({"object": "text_completion", "choices": [choice], "usage": None}))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        await response.write(_sse({"choices": [], "usage": usage}))
        await response.write(b"data: [DONE]\n\n")
        return response


class FakeGateway(gateway_pb2_grpc.GatewayServicer):
    """splitserve's gRPC Generate: one token per message, usage on the last."""

    def __init__(self) -> None:
        self.requests = []

    async def Generate(self, request, context):
        self.requests.append(request)
        n = request.max_tokens
        for i in range(n):
            await asyncio.sleep(FIRST_S if i == 0 else STEP_S)
            last = i == n - 1
            yield gateway_pb2.GenerateResponse(
                request_id="r", text=f" t{i}", token_ids=[100 + i],
                finish_reason=common_pb2.FINISH_REASON_LENGTH if last else common_pb2.FINISH_REASON_UNSPECIFIED,
                usage=gateway_pb2.Usage(prompt_tokens=len(request.prompt_token_ids), completion_tokens=n)
                if last else None,
                # As if every prompt token's KV were pulled, a kB each.
                timeline=common_pb2.Timeline(kv_transfer_bytes=1000 * len(request.prompt_token_ids))
                if last else None)


class ServerThread:
    """An event loop in a thread serving the fake HTTP app and the fake gRPC gateway on 127.0.0.1."""

    def __init__(self, openai: FakeOpenAI) -> None:
        self.openai, self.gateway = openai, FakeGateway()
        self.http_port, self.grpc_port = free_port(), free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _start(self) -> None:
        self.runner = web.AppRunner(self.openai.app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.http_port).start()
        self.grpc_server = grpc.aio.server()
        gateway_pb2_grpc.add_GatewayServicer_to_server(self.gateway, self.grpc_server)
        self.grpc_server.add_insecure_port(f"127.0.0.1:{self.grpc_port}")
        await self.grpc_server.start()

    async def _stop(self) -> None:
        await self.grpc_server.stop(None)
        await self.runner.cleanup()

    def __enter__(self) -> Self:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def bench(*argv: str) -> int:
    """`splitserve bench ...` in this process, through the real argument parser."""
    parser = argparse.ArgumentParser()
    bench_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *argv])
    return args.func(args)


def _recomputed(records: list[dict]) -> dict:
    return summarize([RequestRecord.from_json(r) for r in records]).to_json()


# -- whole runs -----------------------------------------------------------------------------------


def test_run_records_and_json_end_to_end(tmp_path: Path):
    out = tmp_path / "run.json"
    with ServerThread(FakeOpenAI(fail_nth=2)) as server:
        code = bench("serve", "--url", server.url + "/v1", "--rate", "20", "--num-requests", "5",
                     "--input-len", "16", "--output-len", "4", "--seed", "1", "--ttft-slo", "0.5",
                     "--tpot-slo", "0.5", "--label", "fake", "--output", str(out))
    assert code == 0
    data = json.loads(out.read_text())
    config = data["config"]
    assert (config["backend"], config["url"], config["model"], config["label"], config["rates"]) == (
        "openai", server.url + "/v1", "fake-model", "fake", [20.0])
    assert config["workload"]["input"] == {"median": 16, "sigma": 0.0, "min": 16, "max": 16}
    assert config["slo"] == {"ttft_s": 0.5, "tpot_s": 0.5, "target": 0.9} and "api_key" not in config
    (point,) = data["points"]
    records, report = point["records"], point["report"]
    assert (report["num_requests"], report["completed"], report["failed"]) == (5, 4, 1)
    failed = [r for r in records if r["error"]]
    assert len(failed) == 1 and failed[0]["error"] == "HTTP 400: prompt too long"
    for body in server.openai.bodies:  # the request is standard OpenAI plus vLLM's extensions
        assert len(body["prompt"]) == 16 and body["model"] == "fake-model"
        assert (body["max_tokens"], body["min_tokens"], body["ignore_eos"], body["temperature"]) == (4, 4, True, 0)
        assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert len({tuple(b["prompt"]) for b in server.openai.bodies}) == 5
    for r in records:
        assert r["send_s"] >= r["scheduled_s"] - 1e-3
        if r["error"]:
            continue
        assert (r["prompt_tokens"], r["completion_tokens"], r["finish_reason"]) == (16, 4, "length")
        assert len(r["chunk_times_s"]) == 4 and r["chunk_times_s"] == sorted(r["chunk_times_s"])
        assert FIRST_S * 0.9 <= r["ttft_s"] < 2.0 and STEP_S * 0.9 <= r["tpot_s"] < 1.0
    assert report == {**_recomputed(records), "slo": report["slo"]}
    assert report["slo"]["attainment"] == pytest.approx(0.8)  # the failed request is a miss
    assert data["sweep"]["goodput_rps"] is None  # 80% < 90% at the only rate


def test_max_concurrency_holds_later_arrivals_back(tmp_path: Path):
    out = tmp_path / "capped.json"
    with ServerThread(FakeOpenAI()) as server:
        assert bench("serve", "--url", server.url, "--rate", "inf", "--num-requests", "3", "--input-len", "8",
                     "--output-len", "2", "--max-concurrency", "1", "--output", str(out)) == 0
    records = sorted(json.loads(out.read_text())["points"][0]["records"], key=lambda r: r["send_s"])
    assert all(r["scheduled_s"] == 0 for r in records)
    for before, after in pairwise(records):
        assert after["send_s"] >= before["end_s"]


def test_conversations_repeat_their_history_and_a_failed_turn_ends_one(tmp_path: Path):
    out = tmp_path / "chat.json"
    with ServerThread(FakeOpenAI(fail_nth=2)) as server:
        assert bench("serve", "--url", server.url, "--rate", "inf", "--num-requests", "6", "--turns", "3",
                     "--think-time", "0", "--input-len", "16", "--output-len", "4", "--output", str(out)) == 0
    bodies = server.openai.bodies
    records = json.loads(out.read_text())["points"][0]["records"]
    assert [r["index"] for r in records] == list(range(6))  # 2 conversations of 3 turns
    assert [r["input_len"] for r in records] == [16, 36, 56] * 2  # the history: prompts + 4-token replies
    broken = [r for r in records if r["error"]]
    # The second request received (both conversations start at once: a first turn) failed: its
    # conversation's later turns were never sent, and count as failed.
    assert len(bodies) == 4 and [r["error"] for r in broken] == [
        "HTTP 400: prompt too long", *["an earlier turn of its conversation failed"] * 2]
    assert [r["index"] % 3 for r in broken] == [0, 1, 2] and broken[1]["send_s"] is None
    prompts = [b["prompt"] for b in bodies]
    for later in [p for p in prompts if len(p) > 16]:  # each later turn extends an earlier one
        earlier = next(p for p in prompts if len(p) == len(later) - 20)
        assert later[:len(earlier)] == earlier and len(later) == len(earlier) + 20
    assert len({tuple(p[:16]) for p in prompts}) == 2  # two conversations, fresh first turns


def test_over_grpc_a_conversation_repeats_the_real_replies_and_reports_the_kv_pulled(tmp_path: Path):
    out = tmp_path / "grpc-chat.json"
    with ServerThread(FakeOpenAI()) as server:
        assert bench("serve", "--backend", "grpc", "--url", f"127.0.0.1:{server.grpc_port}", "--model", "m",
                     "--rate", "inf", "--num-requests", "2", "--turns", "2", "--think-time", "0",
                     "--input-len", "16", "--output-len", "4", "--output", str(out)) == 0
    first, second = sorted((list(r.prompt_token_ids) for r in server.gateway.requests), key=len)
    assert second[:16] == first and second[16:20] == [100, 101, 102, 103] and len(second) == 36
    point = json.loads(out.read_text())["points"][0]
    assert [r["kv_transfer_bytes"] for r in point["records"]] == [16_000, 36_000]
    assert point["kv_pulled"] == ("KV pulled: 0.1 MB for 2 requests (26.0 kB per request); kB per request by "
                                  "turn, 1: 16.0, 2: 36.0")


def test_a_trace_replays_its_lengths_and_shared_blocks(tmp_path: Path):
    trace, out = tmp_path / "trace.jsonl", tmp_path / "trace.json"
    trace.write_text("".join(json.dumps({"timestamp": 100 * i, "input_length": 600 + 400 * (i % 2),
                                         "output_length": 20, "hash_ids": [1, 2 + i % 2, 7 + i]}) + "\n"
                             for i in range(4)))
    with ServerThread(FakeOpenAI()) as server:
        assert bench("serve", "--url", server.url, "--trace", str(trace), "--trace-length-scale", "0.5",
                     "--rate", "40", "--output", str(out)) == 0
    data = json.loads(out.read_text())
    assert data["config"]["trace"] == {"path": str(trace), "num_requests": 4, "block_tokens": 512,
                                       "length_scale": 0.5, "native_rate_rps": 10.0}
    records = sorted(data["points"][0]["records"], key=lambda r: r["index"])
    assert [(r["input_len"], r["output_len"]) for r in records] == [(300, 10), (500, 10)] * 2
    assert [r["scheduled_s"] for r in records] == pytest.approx([0.0, 0.025, 0.05, 0.075])
    prompts = {len(b["prompt"]): [] for b in server.openai.bodies}
    for body in server.openai.bodies:
        prompts[len(body["prompt"])].append(body["prompt"])
    # Blocks of 256 tokens: [1, 2] (the third id is past 300 tokens) twice, and [1, 3] twice.
    (a, c), (b, d) = prompts[300], prompts[500]
    assert a == c and b == d and a[:256] == b[:256] and a[256:] != b[256:300]
    with pytest.raises(ValueError, match="--trace sets the lengths"):
        bench("serve", "--url", server.url, "--trace", str(trace), "--input-len", "5")


@pytest.mark.parametrize("backend", ["openai-chat", "grpc"])
def test_chat_and_grpc_backends(tmp_path: Path, backend: str):
    out = tmp_path / f"{backend}.json"
    with ServerThread(FakeOpenAI()) as server:
        url = server.url if backend == "openai-chat" else f"127.0.0.1:{server.grpc_port}"
        assert bench("serve", "--backend", backend, "--url", url, "--rate", "50", "--num-requests", "3",
                     "--input-len", "12", "--output-len", "3", "--output", str(out)) == 0
    point = json.loads(out.read_text())["points"][0]
    assert point["report"]["completed"] == 3
    for r in point["records"]:
        assert len(r["chunk_times_s"]) == 3 and r["completion_tokens"] == 3 and r["ttft_s"] >= FIRST_S * 0.9
    if backend == "grpc":
        assert all(r["chunk_tokens"] == [1, 1, 1] and r["prompt_tokens"] == 12 for r in point["records"])
        sent = server.gateway.requests
        assert [(len(q.prompt_token_ids), q.min_tokens, q.ignore_eos) for q in sent] == [(12, 3, True)] * 3
    else:
        assert all(len(b["messages"][0]["content"].split()) == 12 for b in server.openai.bodies)
        assert all(r["prompt_tokens"] == 17 for r in point["records"])  # usage, not the word count


def test_unreachable_server_is_a_clean_error(tmp_path: Path):
    with pytest.raises(ValueError, match="cannot reach"):
        bench("serve", "--url", f"http://127.0.0.1:{free_port()}", "--num-requests", "1")


def test_sweep_writes_every_point_and_plots(tmp_path: Path):
    runs = []
    with ServerThread(FakeOpenAI()) as server:
        for label in ("disaggregated", "colocated"):
            out, png = tmp_path / f"{label}.json", tmp_path / f"{label}.png"
            assert bench("serve", "--url", server.url, "--rates", "10", "20", "--num-requests", "3",
                         "--input-len", "8", "--output-len", "3", "--pause", "0.1", "--ttft-slo", "1",
                         "--tpot-slo", "0.001", "--label", label, "--output", str(out), "--plot", str(png)) == 0
            assert png.read_bytes().startswith(PNG_MAGIC)
            runs.append(out)
        assert len({tuple(b["prompt"]) for b in server.openai.bodies}) == 12  # fresh prompts per point
    data = json.loads(runs[0].read_text())
    assert [p["rate"] for p in data["points"]] == [10, 20]
    assert all(p["report"]["completed"] == 3 and p["report"]["slo"]["attainment"] == 0 for p in data["points"])
    sweep = data["sweep"]  # a 1 ms TPOT target fails every rate
    assert (sweep["goodput_rps"], sweep["first_failing_rate"], sweep["target"]) == (None, 10, 0.9)
    assert "last passing rate" in sweep["definition"]
    cmp = tmp_path / "cmp.png"
    assert bench("plot", *map(str, runs), "--output", str(cmp), "--title", "fake") == 0
    assert cmp.read_bytes().startswith(PNG_MAGIC) and cmp.stat().st_size > 10_000


def test_plot_rejects_a_file_that_is_not_a_sweep(tmp_path: Path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a `bench serve --output` file"):
        bench("plot", str(bad), "--output", str(tmp_path / "x.png"))
