"""The baselines behind the same gateway, scheduler and stream: `splitserve up --mode colocated` (new
prompts first, vLLM's order), `--mode chunked` (chunked prefill) and `--mode layered` (layered
prefill), as real processes."""

from __future__ import annotations

import asyncio
import random
import time
import urllib.request

import grpc
import openai
import pytest
import torch
from conftest import make_prompts, start_cluster, stop_cluster
from test_cluster import (
    MODEL,
    _generate_ids,
    _post,
    _stream_one,
    assert_scored_equal,
    scored_reference,
    scored_through,
)
from test_tracing import EPS, complete, new_traceparent, one

from splitserve.engine import EngineConfig, LLMEngine, SamplingParams
from splitserve.v1 import common_pb2, prefill_pb2, prefill_pb2_grpc, scheduler_pb2_grpc
from splitserve.v1 import scheduler_pb2 as spb

pytestmark = pytest.mark.timeout(300)
CHUNK_SIZE = 64
# The colocated worker runs without the prefix cache; the chunked ones with it (the default), two of
# them, between which the scheduler routes by what they cache.
MODES = {"colocated": ("--no-prefix-caching",),
         "chunked": ("--chunk-size", str(CHUNK_SIZE), "--colocated", "2"),
         # one layer part per slice: every pass beside a decode slices
         "layered": ("--prefill-slice-ms", "0.001")}


@pytest.fixture(scope="module", params=["colocated", "chunked"])  # layered: where it slices (below)
def mode_cluster(request, tmp_path_factory, otlp_collector):
    mode = request.param
    # One torch thread, as the in-process reference below: the same arithmetic, the same tokens.
    cluster = start_cluster(tmp_path_factory.mktemp(mode), "--mode", mode, "--threads-per-worker", "1",
                            "--otlp-endpoint", otlp_collector.endpoint, *MODES[mode])
    cluster.wait_workers(2 if mode == "chunked" else 1)  # the tests count them, and route between them
    yield mode, cluster
    code = stop_cluster(cluster)
    assert code == 0, f"splitserve up exited {code} on SIGTERM\n{cluster.log_tail()}"


def _reference(model, mode: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    chunk_size = CHUNK_SIZE if mode == "chunked" else None
    engine = LLMEngine(EngineConfig(kv_cache_bytes=1 << 28, chunk_size=chunk_size), loaded=model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        params = SamplingParams(temperature=0.0, max_new_tokens=max_tokens, ignore_eos=True)
        return [engine.generate([p], params)[0] for p in prompts]
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("mode_cluster", list(MODES), indirect=True)
def test_colocated_workers_serve_whole_requests_equal_to_the_engine(mode_cluster, model_bf16):
    mode, cluster = mode_cluster
    roles = [w.worker.role for w in cluster.workers()]
    assert roles == [spb.WORKER_ROLE_COLOCATED] * (2 if mode == "chunked" else 1)
    prompts = make_prompts(model_bf16.tokenizer, [7, 60, 333])  # 333 tokens: six chunks of 64
    for prompt, expected in zip(prompts, _reference(model_bf16, mode, prompts, 24)):
        tokens, last = _generate_ids(cluster.grpc_address, prompt, len(expected))
        assert tokens == expected
        t = last.timeline
        steps = [t.arrival, t.queued, t.scheduled, t.prefill_start, t.prefill_end, t.first_token,
                 t.token_times[0], t.finish]
        assert all(s > 0 for s in steps) and steps == sorted(steps)
        assert len(t.token_times) == len(expected) - 1
        assert t.kv_transfer_bytes == 0  # nothing moved


def test_logprobs_and_penalties_equal_the_engine_and_so_the_disaggregated_path(mode_cluster, model_bf16):
    """The same reference as test_cluster's disaggregated cluster must equal: both paths give the same."""
    mode, cluster = mode_cluster
    expected = scored_reference(model_bf16, CHUNK_SIZE if mode == "chunked" else None)
    assert_scored_equal(scored_through(cluster.grpc_address, model_bf16.tokenizer), expected)


@pytest.mark.parametrize("mode_cluster", list(MODES), indirect=True)
def test_concurrent_streams_complete_and_free_every_block(mode_cluster, model_bf16):
    _, cluster = mode_cluster
    lengths = [5 + 53 * i % 300 for i in range(16)]
    prompts = make_prompts(model_bf16.tokenizer, lengths)
    max_tokens = [4 + 7 * i % 30 for i in range(16)]

    async def run_all():
        async with openai.AsyncOpenAI(base_url=cluster.http_url + "/v1", api_key="unused") as client:
            return await asyncio.gather(*(_stream_one(client, p, m) for p, m in zip(prompts, max_tokens)))

    for (text, usage, finish), prompt, m in zip(asyncio.run(run_all()), prompts, max_tokens):
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt), m)
        assert finish == "length" and text
    stats = cluster.wait_all_blocks_free()
    assert all(s.num_free_blocks == s.num_blocks and s.num_running == 0 for s in stats.values()), stats
    assert _scheduler_running(cluster) == 0  # every request acknowledged, none left tracked


def _scheduler_running(cluster, timeout_s: float = 10.0) -> int:
    """The scheduler's count of requests in flight, once it reaches 0 or the timeout passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        with grpc.insecure_channel(cluster.scheduler_address) as channel:
            state = scheduler_pb2_grpc.SchedulerStub(channel).GetClusterState(spb.ClusterStateRequest(), timeout=5,
                                                                              metadata=cluster.metadata)
        if state.num_running == 0 or time.monotonic() > deadline:
            return state.num_running
        time.sleep(0.2)


def test_it_refuses_kv_pulls(mode_cluster):
    _, cluster = mode_cluster
    worker = cluster.workers()[0]
    with grpc.insecure_channel(worker.worker.grpc_address) as channel:
        stub = prefill_pb2_grpc.PrefillStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.Release(prefill_pb2.ReleaseRequest(request_id="x"), timeout=5, metadata=cluster.metadata)
        assert error.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert stub.GetStats(common_pb2.StatsRequest(), timeout=5, metadata=cluster.metadata).num_blocks > 0


def test_a_repeated_prompt_hits_the_cache_unless_it_is_off(mode_cluster):
    mode, cluster = mode_cluster
    prompt = [random.randrange(1000, 40000) for _ in range(90)]  # this test's own: nothing else cached it
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
    cached = []
    for _ in range(2):
        status, reply = _post(cluster.http_url + "/v1/completions", body)
        assert status == 200, reply
        cached.append(reply["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert cached == ([0, 0] if mode == "colocated" else [0, 80])


@pytest.mark.parametrize("mode_cluster", ["chunked"], indirect=True)
def test_a_prompt_goes_to_the_worker_holding_its_prefix_though_that_one_is_busier(mode_cluster):
    """KV-aware routing between two workers: a prompt cached on one, which now also decodes another
    request, still goes there (least-loaded placement would pick the idle one and compute it all)."""
    _, cluster = mode_cluster
    prompt = [random.randrange(1000, 40000) for _ in range(200)]  # this test's own: cached nowhere
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
    status, reply = _post(cluster.http_url + "/v1/completions", body)
    assert status == 200 and reply["usage"]["prompt_tokens_details"]["cached_tokens"] == 0, reply
    time.sleep(1.5)  # its worker reported it done and listed its blocks: both workers are idle again
    # A long request on the same worker (the first of equals, as the prompt was): it decodes meanwhile.
    status, reply = _beside_a_stream(cluster, 50, 400,
                                     lambda: _post(cluster.http_url + "/v1/completions", body))
    assert status == 200, reply
    # 12 full blocks before the one holding the last token
    assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == 192


@pytest.mark.parametrize("mode_cluster", ["layered"], indirect=True)
def test_a_prompt_arriving_while_one_decodes_runs_in_slices_with_the_engines_tokens(mode_cluster, model_bf16):
    """A layered worker: while one request decodes, a prompt's pass runs a layer part per step with the
    decode steps between; its tokens are the engine's whole prefill's, and the worker's step
    histogram (the gateway's /metrics) counts the slices."""
    _, cluster = mode_cluster
    (prompt,) = make_prompts(model_bf16.tokenizer, [300])
    (expected,) = _reference(model_bf16, "layered", [prompt], 8)
    tokens, _ = _beside_a_stream(cluster, 40, 300,
                                 lambda: _generate_ids(cluster.grpc_address, prompt, len(expected)))
    assert tokens == expected
    layers = model_bf16.spec.num_layers
    deadline = time.monotonic() + 10  # the histograms come with the worker's next heartbeat
    while _slices(cluster) < 2 * layers - 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _slices(cluster) >= 2 * layers - 1  # a slice per layer part


def _beside_a_stream(cluster, prompt_len: int, max_tokens: int, call):
    """call() (on a thread) while a streamed request of a random prompt decodes, once its first
    token is out; the stream is cancelled after."""
    busy = [random.randrange(1000, 40000) for _ in range(prompt_len)]

    async def run():
        async with openai.AsyncOpenAI(base_url=cluster.http_url + "/v1", api_key="unused") as client:
            stream = await client.completions.create(model=MODEL, prompt=busy, max_tokens=max_tokens,
                                                     stream=True, extra_body={"ignore_eos": True})
            async for _ in stream:  # its first token: it is placed and decoding
                break
            result = await asyncio.to_thread(call)
            await stream.close()  # cancels it
            return result

    return asyncio.run(run())


def _slices(cluster) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(cluster.http_url + "/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "splitserve:engine_step_seconds_count"
               and s.labels.get("kind") == "prefill_slice")


def test_a_request_is_one_trace_across_gateway_scheduler_and_worker(mode_cluster, otlp_collector):
    _, cluster = mode_cluster
    traceparent, trace_id, client_span = new_traceparent()
    body = complete(cluster.http_url, {"traceparent": traceparent})
    worker = "splitserve-colocated"
    spans = otlp_collector.wait_for(trace_id, {
        ("splitserve-gateway", "request"), ("splitserve-gateway", "admit"), ("splitserve-gateway", "queue"),
        ("splitserve-scheduler", "placement"), (worker, "batch wait"), (worker, "prefill"), (worker, "decode")})
    assert all(s.attributes["gen_ai.request.id"] == body["id"] for s in spans)
    request = one(spans, "splitserve-gateway", "request")
    placement = one(spans, "splitserve-scheduler", "placement")
    assert request.parent_id == client_span and placement.parent_id == request.span_id
    steps = [one(spans, worker, name) for name in ("batch wait", "prefill", "decode")]
    assert all(s.parent_id == placement.span_id for s in steps)
    assert steps[0].end <= steps[1].start + EPS and steps[1].end <= steps[2].start + EPS
    assert steps[2].attributes["gen_ai.usage.output_tokens"] == body["usage"]["completion_tokens"] == 6
    assert not any(s.service == "splitserve-decode" or s.name == "kv transfer" for s in spans)  # nothing moved
