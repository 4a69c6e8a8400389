"""The whole cluster as real processes on 127.0.0.1: gateway, scheduler, prefill, decode, Redis.

Started once per KV transport with `splitserve up` (see conftest.py) and stopped with SIGTERM,
which must exit 0.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.request

import grpc
import openai
import pytest
import torch
from conftest import log_events, make_prompts

from splitserve.engine import EngineConfig, LLMEngine, SamplingParams
from splitserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.timeout(300)
TRANSPORTS = ["ucx", "grpc"]
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(params=TRANSPORTS)
def cluster(request):
    return request.getfixturevalue(f"{request.param}_cluster")


@pytest.fixture(scope="module")
def reference_outputs(model_bf16):
    """In-process greedy outputs, each prompt alone, on one thread like each cluster worker."""
    prompts = make_prompts(model_bf16.tokenizer, [7, 60, 333])
    engine = LLMEngine(EngineConfig(kv_cache_bytes=1 << 28), loaded=model_bf16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        params = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True)
        return [(p, engine.generate([p], params)[0]) for p in prompts]
    finally:
        torch.set_num_threads(threads)


def _generate_ids(address: str, prompt: list[int], max_tokens: int) -> tuple[list[int], gateway_pb2.GenerateResponse]:
    with grpc.insecure_channel(address) as channel:
        request = gateway_pb2.GenerateRequest(prompt_token_ids=prompt, max_tokens=max_tokens, temperature=0.0,
                                              ignore_eos=True)
        responses = list(gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=120))
    return [t for r in responses for t in r.token_ids], responses[-1]


# Penalized greedy and seeded sampling with min_p and a bias, each with log probabilities: in the
# disaggregated path the first token (and its logprobs) comes from the prefill server, the rest from
# the decode server, which must penalize the output so far exactly as a colocated engine does.
SCORED_PARAMS = [
    dict(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.3,
         top_logprobs=3, prompt_logprobs=2),
    dict(temperature=0.8, seed=5, min_p=0.1, frequency_penalty=1.0, top_logprobs=2),
]
SCORED_TEXT = "Scoring check: name the colours of the rainbow in order, then three rivers of Europe."


def scored_prompt(tokenizer) -> tuple[list[int], tuple[tuple[int, float], ...]]:
    """A prompt no other test sends (no cached prefix: the same prefill path as the reference), and
    a bias that makes " blue" likelier and " red" impossible."""
    bias = ((tokenizer(" blue")["input_ids"][0], 4.0), (tokenizer(" red")["input_ids"][0], -100.0))
    return tokenizer(SCORED_TEXT)["input_ids"], bias


def scored_reference(model, chunk_size: int | None = None, max_tokens: int = 20) -> list[tuple[list, list]]:
    """(tokens, per-token (logprob, top ids, top logprobs), the same per prompt token) of an
    in-process colocated engine on one thread, for each of SCORED_PARAMS."""
    prompt, bias = scored_prompt(model.tokenizer)
    engine = LLMEngine(EngineConfig(kv_cache_bytes=1 << 28, chunk_size=chunk_size), loaded=model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = []
        for i, kwargs in enumerate(SCORED_PARAMS):
            params = SamplingParams(max_new_tokens=max_tokens, ignore_eos=True, logit_bias=bias,
                                    logprobs=True, **kwargs)
            engine.add_request(f"scored-{i}", prompt, params)
            outputs = []
            while engine.has_work:
                outputs += engine.step()
            scores = [(lp.logprob, [t for t, _ in lp.top], [v for _, v in lp.top])
                      for lp in [o.logprobs for o in outputs] + list(outputs[0].prompt_logprobs or ())]
            results.append(([o.token_id for o in outputs], scores))
        return results
    finally:
        torch.set_num_threads(threads)


def scored_through(address: str, tokenizer, max_tokens: int = 20) -> list[tuple[list, list]]:
    """The same requests through a cluster's gateway (gRPC), as scored_reference returns them."""
    prompt, bias = scored_prompt(tokenizer)
    results = []
    with grpc.insecure_channel(address) as channel:
        for kwargs in SCORED_PARAMS:
            request = gateway_pb2.GenerateRequest(
                prompt_token_ids=prompt, max_tokens=max_tokens, ignore_eos=True, logprobs=True,
                logit_bias=[common_pb2.LogitBias(token_id=t, bias=b) for t, b in bias], **kwargs)
            responses = list(gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=120))
            scores = [lp for r in responses for lp in r.logprobs] + list(responses[0].prompt_logprobs)
            results.append(([t for r in responses for t in r.token_ids],
                            [(lp.logprob, list(lp.top_token_ids), list(lp.top_logprobs)) for lp in scores]))
    return results


def assert_scored_equal(got: list, expected: list) -> None:
    """Equal tokens, top ids and log probabilities (float32 on the wire: the engine's values exactly)."""
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(got, expected, strict=True):
        assert tokens == want_tokens
        assert [(torch.tensor(lp).float().item(), ids, [torch.tensor(v).float().item() for v in top])
                for lp, ids, top in want_logprobs] == logprobs


def test_logprobs_and_penalties_through_the_cluster_equal_the_colocated_engine(ucx_cluster, model_bf16):
    expected = scored_reference(model_bf16)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=20, ignore_eos=True)
    unpenalized = LLMEngine(EngineConfig(kv_cache_bytes=1 << 26), loaded=model_bf16).generate(
        [scored_prompt(model_bf16.tokenizer)[0]], greedy)
    assert expected[0][0] != unpenalized[0]  # the penalties and the bias change the output
    assert len(expected[0][1]) == 20 + len(scored_prompt(model_bf16.tokenizer)[0]) - 1  # prompt scores too
    assert_scored_equal(scored_through(ucx_cluster.grpc_address, model_bf16.tokenizer), expected)


def test_greedy_output_through_the_cluster_equals_the_engine(cluster, reference_outputs):
    for prompt, expected in reference_outputs:
        tokens, last = _generate_ids(cluster.grpc_address, prompt, len(expected))
        assert tokens == expected
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(prompt), len(expected))
        timeline = last.timeline  # every lifecycle step was stamped, in order
        steps = [timeline.arrival, timeline.queued, timeline.scheduled, timeline.prefill_start,
                 timeline.prefill_end, timeline.first_token, timeline.kv_transfer_start,
                 timeline.kv_transfer_end, timeline.token_times[0], timeline.finish]
        assert all(s > 0 for s in steps) and steps == sorted(steps)
        assert len(timeline.token_times) == len(expected) - 1 and timeline.kv_transfer_bytes > 0


async def _stream_one(client: openai.AsyncOpenAI, prompt: list[int], max_tokens: int):
    stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, stream=True,
                                             temperature=0.8, seed=len(prompt), extra_body={"ignore_eos": True},
                                             stream_options={"include_usage": True})
    text, usage, finish = "", None, None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    return text, usage, finish


def test_32_concurrent_streams_complete_and_free_every_block(cluster, model_bf16):
    lengths = [5 + 37 * i % 400 for i in range(32)]
    prompts = make_prompts(model_bf16.tokenizer, lengths)
    max_tokens = [4 + 7 * i % 40 for i in range(32)]

    async def run_all():
        async with openai.AsyncOpenAI(base_url=cluster.http_url + "/v1", api_key="unused") as client:
            return await asyncio.gather(*(_stream_one(client, p, m) for p, m in zip(prompts, max_tokens)))

    results = asyncio.run(run_all())
    for (text, usage, finish), prompt, m in zip(results, prompts, max_tokens):
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (len(prompt), m, len(prompt) + m)
        assert finish == "length" and text
    stats = cluster.wait_all_blocks_free()
    assert {s.num_free_blocks for s in stats.values()} and all(
        s.num_free_blocks == s.num_blocks and s.num_running == 0 for s in stats.values()), stats


def test_openai_client_completions_and_chat(ucx_cluster):
    client = openai.OpenAI(base_url=ucx_cluster.http_url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [MODEL]
    done = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert done.choices[0].text and done.usage.completion_tokens <= 6
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}],
                                          max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert chat.choices[0].finish_reason in ("stop", "length")
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=8, temperature=0, stream=True)
        if c.choices]
    assert "".join(pieces) == chat.choices[0].message.content  # greedy: streaming gives the same text


def _post(url: str, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize("body, fragment", [
    ({"model": MODEL, "prompt": ""}, "prompt"),
    ({"model": MODEL, "prompt": "hi " * 9000}, "context"),
    ({"model": MODEL, "prompt": "hi", "temperature": -1}, "temperature"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"model": "no-such-model", "prompt": "hi"}, "no-such-model"),
    ({"model": MODEL, "prompt": "hi", "cache_salt": "s" * 257}, "cache_salt"),
    ({"model": MODEL, "prompt": "hi", "cache_salt": ""}, "cache_salt"),
])
def test_bad_input_is_refused_and_the_cluster_keeps_serving(ucx_cluster, body, fragment):
    status, error = _post(ucx_cluster.http_url + "/v1/completions", body)
    assert status in (400, 404) and fragment in error["error"]["message"]
    status, ok = _post(ucx_cluster.http_url + "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert status == 200 and ok["usage"]["completion_tokens"] <= 2


def test_a_client_that_disconnects_frees_every_block(ucx_cluster):
    async def read_a_little_then_leave():
        async with openai.AsyncOpenAI(base_url=ucx_cluster.http_url + "/v1", api_key="unused") as client:
            stream = await client.completions.create(model=MODEL, prompt="Tell me a long story.", max_tokens=1500,
                                                     stream=True, extra_body={"ignore_eos": True})
            received = 0
            async for chunk in stream:
                received += 1
                if received == 5:
                    break
            await stream.close()
            return received

    assert asyncio.run(read_a_little_then_leave()) == 5
    # 1,500 tokens take far longer than this wait: only the cancel can free the blocks in time.
    stats = ucx_cluster.wait_all_blocks_free(timeout_s=20)
    assert all(s.num_free_blocks == s.num_blocks and s.num_running == 0 for s in stats.values()), stats


def test_an_over_full_queue_gets_429(ucx_cluster):
    async def flood():
        async with openai.AsyncOpenAI(base_url=ucx_cluster.http_url + "/v1", api_key="unused",
                                      max_retries=0) as client:
            async def one():
                try:
                    await client.completions.create(model=MODEL, prompt="Count to ten.", max_tokens=8,
                                                    extra_body={"ignore_eos": True})
                    return 200
                except openai.RateLimitError:
                    return 429
            return await asyncio.gather(*(one() for _ in range(60)))

    codes = asyncio.run(flood())
    assert set(codes) == {200, 429} and codes.count(200) >= 40  # --max-pending 40
    assert all(s.num_free_blocks == s.num_blocks for s in ucx_cluster.wait_all_blocks_free().values())


def _prefix_cache_hits(cluster) -> float:
    with urllib.request.urlopen(cluster.http_url + "/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith("splitserve:prefix_cache_hits_total{"))


def test_a_repeated_prompt_reuses_its_cached_prefix_within_its_salt(ucx_cluster):
    """usage.prompt_tokens_details.cached_tokens as OpenAI reports it, and the workers' hit counter."""
    prompt = [random.randrange(1000, 40000) for _ in range(100)]  # this test's own: nothing else cached it
    url, body = ucx_cluster.http_url + "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 2}
    hits_before = _prefix_cache_hits(ucx_cluster)
    cached = []
    for extra in ({}, {}, {"cache_salt": "tenant-a"}, {"cache_salt": "tenant-a"}, {"cache_salt": "tenant-b"}):
        status, reply = _post(url, {**body, **extra})
        assert status == 200, reply
        cached.append(reply["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert cached == [0, 96, 0, 96, 0]  # (100 - 1) // 16 full blocks; the last token's block is computed
    deadline = time.monotonic() + 15
    while _prefix_cache_hits(ucx_cluster) < hits_before + 2 * 96:  # the counters come with heartbeats
        assert time.monotonic() < deadline, _prefix_cache_hits(ucx_cluster)
        time.sleep(0.5)


def test_the_openai_sdk_parses_structured_output_into_a_pydantic_model(ucx_cluster):
    """response_format from a pydantic model (what chat.completions.parse sends), through prefill and
    decode: the grammar the prefill server started continues on the decode server."""
    import pydantic

    class City(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=16)
        country: str = pydantic.Field(max_length=16)
        population_millions: int

    client = openai.OpenAI(base_url=ucx_cluster.http_url + "/v1", api_key="unused", max_retries=0)
    for seed in range(3):
        completion = client.chat.completions.parse(
            model=MODEL, messages=[{"role": "user", "content": "Give me a large city as JSON."}],
            response_format=City, max_completion_tokens=80, temperature=1.0, seed=seed)
        city = completion.choices[0].message.parsed
        assert isinstance(city, City) and completion.choices[0].finish_reason == "stop"
        assert len(city.name) <= 16 and len(city.country) <= 16


def test_a_tool_call_round_trip(ucx_cluster):
    """A named and a required tool_choice give calls whose arguments parse (the grammar holds the
    output to them); the call and its result sent back give an answer."""
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                       "properties": {"city": {"type": "string", "maxLength": 20}}}}}
    client = openai.OpenAI(base_url=ucx_cluster.http_url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "What is the weather like in Oslo?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    arguments_of = {}
    for choice in (named, "required"):
        reply = client.chat.completions.create(model=MODEL, messages=messages, tools=[weather],
                                               tool_choice=choice, max_completion_tokens=60, temperature=0)
        message = reply.choices[0].message
        [call] = message.tool_calls[:1]
        assert call.function.name == "get_weather" and call.id.startswith("call_") and message.content is None
        arguments = json.loads(call.function.arguments)
        assert set(arguments) == {"city"} and len(arguments["city"]) <= 20
        assert reply.choices[0].finish_reason == ("stop" if isinstance(choice, dict) else "tool_calls")
        arguments_of[str(choice)] = call.function.arguments

    def streamed_calls(choice) -> list:
        chunks = client.chat.completions.create(model=MODEL, messages=messages, tools=[weather], tool_choice=choice,
                                                max_completion_tokens=60, temperature=0, stream=True)
        return [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]

    # A required call's array goes out whole when the choice ends; a named call's arguments piece by piece.
    assert [d.function.arguments for d in streamed_calls("required")] == [arguments_of["required"]]
    first, *rest = streamed_calls(named)
    assert rest and first.id.startswith("call_") and first.function.name == "get_weather"
    assert "".join(d.function.arguments for d in [first, *rest]) == arguments_of[str(named)]
    history = messages + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                          {"role": "tool", "tool_call_id": call.id, "content": "12 degrees and raining"}]
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=[weather], tool_choice="none",
                                            max_completion_tokens=30, temperature=0)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


def test_n_samples_share_their_prompt_and_equal_requests_seeded_seed_plus_index(ucx_cluster):
    prompt = [random.randrange(1000, 40000) for _ in range(100)]  # this test's own: nothing else cached it
    url = ucx_cluster.http_url + "/v1/completions"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0.9, "ignore_eos": True}
    hits_before = _prefix_cache_hits(ucx_cluster)
    status, reply = _post(url, {**body, "n": 3, "seed": 70})
    assert status == 200, reply
    assert reply["usage"]["prompt_tokens"] == 100 and reply["usage"]["completion_tokens"] == 18
    deadline = time.monotonic() + 15
    while _prefix_cache_hits(ucx_cluster) < hits_before + 2 * 96:  # the siblings reused the first's blocks
        assert time.monotonic() < deadline, _prefix_cache_hits(ucx_cluster)
        time.sleep(0.5)
    alone = [_post(url, {**body, "seed": 70 + i})[1]["choices"][0]["text"] for i in range(3)]
    assert [c["text"] for c in reply["choices"]] == alone and len(set(alone)) > 1


def test_the_next_turn_of_a_conversation_pulls_only_the_blocks_its_decode_server_lacks(ucx_cluster):
    """Decode-side reuse: the decode server keeps a finished request's blocks, its output's too, and
    the next turn (the whole conversation, then a new question) pulls only the blocks past them."""
    first = [random.randrange(1000, 40000) for _ in range(100)]  # this test's own: cached nowhere
    reply, last = _generate_ids(ucx_cluster.grpc_address, first, 8)
    assert last.timeline.kv_transfer_bytes % 7 == 0  # 100 tokens: 7 blocks pulled
    block_bytes = last.timeline.kv_transfer_bytes // 7
    second = first + reply + [random.randrange(1000, 40000) for _ in range(40)]  # 148 tokens: 10 blocks
    _, last = _generate_ids(ucx_cluster.grpc_address, second, 8)
    # The prefill server had the first prompt's 6 full blocks; the decode server had 6 full blocks of
    # the 107 tokens whose KV it held (the 8th output's never computed), so it pulled 4.
    assert last.usage.cached_prompt_tokens == 96
    assert last.timeline.kv_transfer_bytes == 4 * block_bytes


def test_reset_prefix_cache_empties_every_workers_cache(grpc_cluster):
    """vLLM's POST /reset_prefix_cache, through the scheduler to the prefill worker, under mutual TLS."""
    prompt = [random.randrange(1000, 40000) for _ in range(100)]
    url, body = grpc_cluster.http_url, {"model": MODEL, "prompt": prompt, "max_tokens": 2}
    cached = [_post(url + "/v1/completions", body)[1]["usage"]["prompt_tokens_details"]["cached_tokens"]
              for _ in range(2)]
    assert cached == [0, 96]
    status, reset = _post(url + "/reset_prefix_cache", {})
    assert (status, reset["num_workers"], reset["num_failed"]) == (200, 1, 0) and reset["num_blocks"] >= 6
    status, again = _post(url + "/v1/completions", body)
    assert status == 200 and again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_every_service_freezes_its_startup_heap(ucx_cluster):
    """Once started, each service takes what it built to start out of the garbage collector's reach:
    a full collection no longer scans it (a stall of every thread of the process), and the exit does
    not collect it again (~0.8 s of each service's stop)."""
    for name in ("gateway", "scheduler", "prefill-0", "decode-0"):
        frozen = log_events(ucx_cluster.log_dir / f"{name}.log", "startup heap frozen")
        assert len(frozen) == 1 and frozen[0]["objects"] > 20_000, (name, frozen)
