"""Hostile input at both front doors of a real gateway process (fake cluster, see test_gateway.py).

A property-based fuzz suite (hypothesis) sends generated OpenAI JSON bodies, raw bytes and gRPC
GenerateRequests: every one must get 200 or a 4xx (gRPC: OK or a client-error status), never a 5xx
and never a hang, and the gateway must serve a normal request afterwards. Named regression tests pin
the findings of issue 13. FUZZ_EXAMPLES raises the example count for a longer local run.
"""

from __future__ import annotations

import asyncio
import json
import os
from types import SimpleNamespace
from unittest.mock import MagicMock

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_gateway import (  # noqa: F401
    API_KEY,
    ERROR_SEED,
    HOLD_SEED,
    MODEL,
    NO_LOGPROBS_SEED,
    REPLAY_SEED,
    gateway,
    wait_until,
)

from splitserve.services.gateway.errors import ApiError
from splitserve.services.gateway.frontend import Frontend
from splitserve.services.gateway.limits import max_prompt_chars
from splitserve.services.gateway.model import ServedModel
from splitserve.services.gateway.schema import (Api, ChatMessage, ChatPrompt, GenerationRequest,
                                                 SamplingOptions, TextPrompt, TokenPrompt)
from splitserve.services.gateway.tools import Tool, ToolCall
from splitserve.v1 import gateway_pb2 as gpb

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "120"))
# derandomize: CI runs the same examples every time, so a failure here reproduces.
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# Seeds that make the fake cluster hold or fail.
FAKE_SEEDS = {HOLD_SEED, REPLAY_SEED, ERROR_SEED, NO_LOGPROBS_SEED}

# -- strategies -----------------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=20)
           | st.floats(allow_nan=False, allow_infinity=False)
           | st.sampled_from([0, -1, 1, 1e-40, 1e-6, 1e30, 1e308, 2**31, 2**63, 2**64, "", "NaN"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
token_ids = st.lists(st.integers(-3, 60_000) | st.sampled_from([2**31, 2**40]), min_size=0, max_size=12)
prompts = st.text(max_size=60) | token_ids | st.lists(st.text(max_size=20), max_size=2) | st.just([[1, 2, 3]])
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "", "x" * 300]) | json_values,
     "content": st.text(max_size=40) | json_values}), max_size=3)
seeds = st.integers(-(2**63), 2**64).filter(lambda s: s not in FAKE_SEEDS)
SAMPLING_FIELDS = {
    "max_tokens": st.integers(-5, 40) | st.sampled_from([2**31, 2**40]),
    "temperature": st.floats(min_value=0, max_value=3) | st.sampled_from([1e-40, 1e-6, 1e30, 1e39, -1.0]),
    "top_p": st.floats(min_value=-0.5, max_value=1.5),
    "top_k": st.integers(-2, 100) | st.sampled_from([2**31, 2**40]),
    "seed": seeds,
    "min_tokens": st.integers(-2, 50) | st.sampled_from([2**31]),
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=300), max_size=40),
    "stop_token_ids": token_ids,
    "ignore_eos": st.booleans(),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans(), "extra": st.none()}),
    "n": st.integers(0, 3), "logprobs": st.integers(0, 22) | st.booleans(),
    "top_logprobs": st.integers(-1, 22),
    "presence_penalty": st.floats(-3, 3), "frequency_penalty": st.floats(-3, 3),
    "repetition_penalty": st.floats(-1, 3), "min_p": st.floats(-0.5, 1.5),
    "logit_bias": st.dictionaries(st.integers(-2, 60_000).map(str) | st.text(max_size=4),
                                  st.floats(-150, 150) | st.integers(-10**30, 10**30), max_size=4),
    "model": st.sampled_from([MODEL, "other", "x" * 10_000]),
}


tool_functions = st.fixed_dictionaries({"name": st.sampled_from(["f", "g", "bad name"]) | json_values},
                                       optional={"parameters": json_values, "description": json_values})
CHAT_FIELDS = {
    "tools": st.lists(st.fixed_dictionaries({"type": st.just("function") | json_values,
                                             "function": tool_functions | json_values}), max_size=3),
    "tool_choice": st.sampled_from(["none", "auto", "required", "f"])
    | st.fixed_dictionaries({"type": st.just("function") | json_values,
                             "function": st.fixed_dictionaries({"name": st.just("f") | json_values}) | json_values}),
}


def bodies(prompt_field: str, prompt_values, fields: dict | None = None) -> st.SearchStrategy[dict]:
    """OpenAI bodies: plausible values for the known fields, or any JSON at all in their place."""
    optional = {name: values | json_values for name, values in {**SAMPLING_FIELDS, **(fields or {})}.items()}
    return st.fixed_dictionaries({prompt_field: prompt_values | json_values}, optional=optional).map(
        _no_fake_seed)


def _no_fake_seed(body: dict) -> dict:
    seed = body.get("seed")
    return {**body, "seed": 1} if isinstance(seed, int) and seed in FAKE_SEEDS else body


def _assert_ok_or_client_error(resp, body: dict) -> None:
    """200, or a 4xx with an OpenAI error body of a bounded size."""
    assert resp.status_code == 200 or 400 <= resp.status_code < 500, (body, resp.status_code, resp.text[:500])
    if resp.status_code != 200:
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and len(error["message"]) < 1000


# -- HTTP -----------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@FUZZ
@given(body=bodies("prompt", prompts))
def test_fuzzed_completion_bodies_get_200_or_4xx(gateway, body):
    _assert_ok_or_client_error(gateway.post("/v1/completions", body), body)


@pytest.mark.timeout(120)
@FUZZ
@given(body=bodies("messages", messages, CHAT_FIELDS))
def test_fuzzed_chat_bodies_get_200_or_4xx(gateway, body):
    _assert_ok_or_client_error(gateway.post("/v1/chat/completions", body), body)


@pytest.mark.timeout(120)
@FUZZ
@given(raw=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_fuzzed_raw_bodies_get_4xx(gateway, raw):
    resp = gateway.post("/v1/completions", raw)
    assert 400 <= resp.status_code < 500 and resp.json()["error"]["message"], (raw, resp.text[:300])


# -- gRPC -----------------------------------------------------------------------------------------

int32s = st.integers(-(2**31), 2**31 - 1)
float32s = st.floats(width=32) | st.sampled_from([1e-40, 1e-6, 0.0, 1e30])
grpc_requests = st.builds(
    gpb.GenerateRequest,
    prompt=st.text(max_size=40), prompt_token_ids=st.lists(int32s | st.integers(0, 60_000), max_size=8),
    messages=st.lists(st.builds(gpb.ChatMessage, role=st.sampled_from(["user", "system", "bogus", ""]),
                                content=st.text(max_size=30)), max_size=2),
    temperature=float32s, top_p=float32s, top_k=int32s, seed=st.integers(0, 2**64 - 1).filter(
        lambda s: s not in FAKE_SEEDS),
    max_tokens=st.integers(-3, 30) | int32s, min_tokens=st.integers(-3, 30) | int32s,
    stop=st.lists(st.text(max_size=300), max_size=40), stop_token_ids=st.lists(int32s, max_size=4),
    request_id=st.text(max_size=20) | st.just("x" * 500), model=st.sampled_from(["", MODEL, "other"]))
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}


@pytest.mark.timeout(120)
@FUZZ
@given(request=grpc_requests)
def test_fuzzed_grpc_requests_get_ok_or_invalid_argument(gateway, request):
    metadata = [("authorization", f"Bearer {API_KEY}")]
    try:
        responses = list(gateway.stub.Generate(request, metadata=metadata, timeout=20))
    except grpc.RpcError as exc:
        assert exc.code() in CLIENT_ERRORS, (request, exc.code(), exc.details())
    else:
        assert responses and responses[-1].finish_reason != 0


def test_the_gateway_serves_normally_after_the_fuzzing(gateway):
    resp = gateway.client.completions.create(model=MODEL, prompt="Hi", max_tokens=3)
    assert resp.choices[0].text == gateway.text(3)
    assert gateway.get("/health").status_code == 200


# -- the findings of issue 13, one test each ------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "top_k": 2**40}, "top_k"),
    ({"prompt": "x", "stop_token_ids": [2**40]}, "stop_token_ids"),
    ({"prompt": "x", "stop_token_ids": [60_000]}, "stop_token_ids"),  # past the vocabulary
    ({"prompt": "x", "max_tokens": 2**40}, "max_tokens"),
    ({"prompt": "x", "temperature": 1e39}, "temperature"),  # finite, but inf as the proto's float32
    ({"prompt": "x", "stop": ["ab"] * 33}, "stop"),
    ({"prompt": "x", "stop": ["a" * 257]}, "stop"),
    ({"prompt": "x", "stream": True, "stream_options": {"include_usage": True, "bogus": 1}}, "stream_options"),
])
def test_out_of_range_values_are_400_naming_the_field(gateway, body, param):
    resp = gateway.post("/v1/completions", {"model": MODEL, **body})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


@pytest.mark.timeout(30)
def test_deep_nesting_and_non_finite_json_are_400(gateway):
    deep = b'{"prompt": "x", "a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    shallow_but_deep_enough = {"prompt": "x", "user": json.loads("[" * 40 + "]" * 40)}
    for raw in (deep, json.dumps(shallow_but_deep_enough).encode(), b'{"prompt": "x", "temperature": NaN}',
                b'{"prompt": "x", "top_p": Infinity}', b'{"prompt": "x", "temperature": 1e999}'):
        resp = gateway.post("/v1/completions", raw)
        assert resp.status_code == 400, (raw[:60], resp.text)
        assert resp.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.timeout(30)
def test_lone_surrogates_are_400_not_a_tokenizer_crash(gateway):
    # Valid JSON, but "\ud800" decodes to a string no tokenizer can encode.
    for path, raw in [("/v1/completions", b'{"prompt": "a\\ud800b"}'),
                      ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
                      ("/v1/chat/completions", b'{"messages": [{"role": "\\udfff", "content": "x"}]}')]:
        resp = gateway.post(path, raw)
        assert resp.status_code == 400 and "surrogate" in resp.json()["error"]["message"], (raw, resp.text)


@pytest.mark.timeout(30)
def test_huge_bodies_and_prompts_are_refused_before_tokenization(gateway):
    too_big = gateway.post("/v1/completions", {"model": MODEL, "prompt": "a" * (9 << 20)})
    assert too_big.status_code == 413 and too_big.json()["error"]["message"]
    # Within the body limit but past what the context could hold whatever the tokenizer makes of it.
    too_long = gateway.post("/v1/completions", {"model": MODEL, "prompt": "word " * 1_000_000})
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    assert "characters" in too_long.json()["error"]["message"]  # the size check, not the tokenizer's count
    many = gateway.post("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}]
                                                 * 5000})
    assert many.status_code == 400 and many.json()["error"]["param"] == "messages"
    # Every string a chat template renders counts, tool call ids too.
    call = {"id": "c" * 400_000, "type": "function", "function": {"name": "f", "arguments": "{}"}}
    long_ids = gateway.post("/v1/chat/completions", {"model": MODEL, "messages": [
        {"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c" * 400_000, "content": "1"}]})
    assert long_ids.status_code == 400 and long_ids.json()["error"]["code"] == "context_length_exceeded"
    assert "characters" in long_ids.json()["error"]["message"]  # refused before the template and tokenizer


@pytest.mark.timeout(30)
def test_client_request_ids_are_bounded_echoed_and_never_internal(gateway):
    metadata = [("authorization", f"Bearer {API_KEY}")]
    for bad in ("x" * 129, "has space", "quote\"", "new\nline"):
        with pytest.raises(grpc.RpcError) as info:
            list(gateway.stub.Generate(gpb.GenerateRequest(prompt="x", request_id=bad), metadata=metadata,
                                       timeout=10))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    before = len(gateway.fake.received)
    responses = list(gateway.stub.Generate(gpb.GenerateRequest(prompt="x", max_tokens=2, request_id="mine-1"),
                                           metadata=metadata, timeout=10))
    assert {r.request_id for r in responses} == {"mine-1"}
    (queued,) = gateway.fake.received[before:]
    assert queued.request_id.startswith("gen-") and queued.request_id != "mine-1"
    resp = gateway.post("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1})
    assert resp.headers["x-request-id"] == resp.json()["id"]


@pytest.mark.timeout(30)
def test_a_client_reusing_another_clients_id_cancels_only_its_own_request(gateway):
    metadata = [("authorization", f"Bearer {API_KEY}")]
    hold = gpb.GenerateRequest(prompt="hold", seed=HOLD_SEED, request_id="shared-id")
    before = len(gateway.fake.received)
    victim = gateway.stub.Generate(hold, metadata=metadata)
    assert next(victim).request_id == "shared-id"  # running: its first token arrived
    attacker = gateway.stub.Generate(hold, metadata=metadata)
    assert next(attacker).request_id == "shared-id"  # same client id, accepted: it names nothing inside
    victim_id, attacker_id = (q.request_id for q in gateway.fake.received[before:before + 2])
    attacker.cancel()
    wait_until(lambda: attacker_id in gateway.fake.cancels, 5, "the attacker's cancel")
    assert victim_id not in gateway.fake.cancels
    victim.cancel()
    wait_until(lambda: victim_id in gateway.fake.cancels, 5, "the victim's own cancel")


@pytest.mark.timeout(60)
def test_a_huge_prompt_is_tokenized_off_the_event_loop():
    """While a prompt within the size bound (~600k characters, most of a second to tokenize) is
    admitted, the event loop keeps running other work: other streams' tokens are not held up."""
    model = ServedModel.load(None, None)
    snapshot = SimpleNamespace(ready=True, max_model_len=8192)
    services = SimpleNamespace(model=model, cluster=SimpleNamespace(snapshot=snapshot),
                               router=SimpleNamespace(channel="replies"))
    config = SimpleNamespace(max_pending=4)
    text = "word " * 120_000
    assert len(text) <= max_prompt_chars(8192, model.max_token_chars)  # passes the size check
    request = GenerationRequest(Api.COMPLETIONS, TextPrompt(text), SamplingOptions())

    async def ticks_during_admission() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        task = asyncio.create_task(ticker())
        with pytest.raises(ApiError, match="maximum context length"):  # tokenized: 120k tokens > 8192
            await Frontend(config, services).admit(request, "cmpl-test")
        task.cancel()
        return ticks

    assert asyncio.run(ticks_during_admission()) >= 10  # on the loop itself it would be 0 or 1


@pytest.mark.timeout(60)
def test_short_prompts_are_not_held_up_behind_huge_ones_being_tokenized():
    """Two huge prompts take both tokenizer threads for most of a second each; short prompts (text,
    chat and token ids, no grammar) arriving meanwhile are admitted at once, not queued behind them."""
    model = ServedModel.load(None, None)
    snapshot = SimpleNamespace(ready=True, max_model_len=8192)
    services = SimpleNamespace(model=model, cluster=SimpleNamespace(snapshot=snapshot),
                               router=SimpleNamespace(stream="replies"))
    frontend = Frontend(SimpleNamespace(max_pending=8), services)
    huge = GenerationRequest(Api.COMPLETIONS, TextPrompt("word " * 120_000), SamplingOptions())
    short = [GenerationRequest(Api.COMPLETIONS, TextPrompt("Why is the sky blue?"), SamplingOptions()),
             GenerationRequest(Api.CHAT, ChatPrompt((ChatMessage("user", "Why is the sky blue?"),)),
                               SamplingOptions()),
             GenerationRequest(Api.COMPLETIONS, TokenPrompt(tuple(range(100, 1100))), SamplingOptions())]

    async def admit_while_huge_ones_tokenize() -> tuple[list, list[bool]]:
        huge_ones = [asyncio.create_task(frontend.admit(huge, f"cmpl-huge-{i}")) for i in range(2)]
        await asyncio.sleep(0.05)  # both are on the threads now
        admitted = [await frontend.admit(request, f"cmpl-short-{i}") for i, request in enumerate(short)]
        still_tokenizing = [not task.done() for task in huge_ones]
        for outcome in await asyncio.gather(*huge_ones, return_exceptions=True):
            assert isinstance(outcome, ApiError) and "maximum context length" in outcome.message
        return admitted, still_tokenizing

    admitted, still_tokenizing = asyncio.run(admit_while_huge_ones_tokenize())
    assert still_tokenizing == [True, True]
    assert [list(q.prompt_token_ids) for q in admitted] == [model.encode(r.prompt) for r in short]
    assert list(admitted[2].prompt_token_ids) == list(range(100, 1100))


def test_only_prompts_within_the_inline_bounds_are_tokenized_on_the_event_loop():
    """What runs on the event loop is bounded: past 512 characters, 4,096 token ids or 16 chat
    messages, and any chat with tools or tool calls (each call rendered, however empty), the
    tokenizer threads take it."""
    quick = ServedModel.encodes_quickly
    assert quick(TextPrompt("x" * 512)) and not quick(TextPrompt("x" * 513))
    assert quick(TokenPrompt((1,) * 4096)) and not quick(TokenPrompt((1,) * 4097))
    assert quick(ChatPrompt((ChatMessage("user", "hi"),) * 16))
    assert not quick(ChatPrompt((ChatMessage("user", "hi"),) * 17))
    assert not quick(ChatPrompt((ChatMessage("user", "x" * 600),)))
    empty_calls = tuple(ToolCall("", "", "") for _ in range(128))
    assert not quick(ChatPrompt((ChatMessage("assistant", "", empty_calls),)))
    assert not quick(ChatPrompt((ChatMessage("user", "hi"),), (Tool("f", "", "{}"),)))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("failure", ["connection lost after the XADD", "client gone during the XADD"])
def test_a_request_whose_queueing_failed_part_way_is_cancelled(failure):
    """The XADD can reach Redis and its reply be lost (the connection drops), or the client can leave
    while it is under way: the request may be in the stream though its client was told it was not
    queued (503) or is gone. Before, nothing cancelled it and it ran to its end for nobody (and
    twice, for a client that retried); now its id goes to the cancel stream."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    queued, cancelled = [], []

    async def put(message):
        queued.append(message.request_id)  # it reached Redis ...
        if failure.startswith("connection"):
            raise RedisConnectionError("Connection reset by peer")  # ... and its reply was lost
        await asyncio.sleep(60)  # the client leaves meanwhile

    async def cancel(request_id):
        cancelled.append(request_id)

    frontend = _in_process_frontend(put, cancel)
    request = GenerationRequest(Api.COMPLETIONS, TextPrompt("Hi"), SamplingOptions())

    async def scenario():
        generation = frontend.generate_n(request)
        entering = asyncio.create_task(generation.__aenter__())
        for _ in range(1000):  # at most 10 s
            if queued or entering.done():
                break
            await asyncio.sleep(0.01)
        if failure.startswith("client"):
            entering.cancel()
        outcome = (await asyncio.gather(entering, return_exceptions=True))[0]
        for _ in range(100):  # the cancel is published in the background: at most 1 s
            if cancelled:
                break
            await asyncio.sleep(0.01)
        return outcome

    outcome = asyncio.run(scenario())
    if failure.startswith("connection"):
        assert isinstance(outcome, ApiError) and "not queued" in outcome.message
    else:
        assert isinstance(outcome, asyncio.CancelledError)
    assert cancelled == queued and len(queued) == 1 and frontend.num_pending == 0


def test_a_response_s_logprobs_are_bounded():
    """Responses are built and serialized on the event loop: n=128 samples of a full context at
    top_logprobs 20 would be ~2 GB and minutes of every other stream's time (one 8k-token choice
    measured ~1 s here). Past MAX_RESPONSE_LOGPROBS records a request is a 400: the output's counted
    unstreamed (streamed chunks carry their own tokens'), a scored prompt's (echo with logprobs,
    prompt_logprobs: one piece) streamed too, each prompt of a batch at its most tokens. One full
    context at top 20 still fits, and so does completions' default of 16 tokens."""
    from splitserve.services.gateway.frontend import Frontend
    from splitserve.services.gateway.limits import MAX_RESPONSE_LOGPROBS

    services = SimpleNamespace(model=None, cluster=SimpleNamespace(snapshot=SimpleNamespace(max_model_len=8192)))
    frontend = Frontend(SimpleNamespace(max_pending=256), services)
    chat = ChatPrompt((ChatMessage("user", "Hi"),))
    long = TokenPrompt((1,) * 8000)

    def request(n: int, max_tokens: int | None, top: int, logprobs: bool = True, api: Api = Api.CHAT,
                prompt=chat, batch=(), **options) -> GenerationRequest:
        sampling = SamplingOptions(max_tokens=max_tokens, logprobs=logprobs, top_logprobs=top, **options)
        return GenerationRequest(api, prompt, sampling, n=n, batch=batch)

    fits = [(request(1, None, 20), False), (request(64, 100, 20), False),
            (request(1, None, 20, prompt_logprobs=20), False),  # prompt and output share one context
            (request(128, None, 0, logprobs=False), False), (request(128, None, 20), True),
            (request(2, None, 20, api=Api.COMPLETIONS, prompt=TextPrompt("x")), False),  # 16 tokens each
            (request(1, 1, 0, logprobs=False, api=Api.COMPLETIONS, prompt=long, prompt_logprobs=20), True),
            (request(1, 1, 0, logprobs=False, api=Api.COMPLETIONS, prompt=TextPrompt("x" * 1000),
                     batch=(TextPrompt("y" * 1000),) * 9, prompt_logprobs=20), True)]
    for fitting, streamed in fits:
        frontend.check_response_size(fitting, streamed)
    too_many = [(request(2, None, 20), False), (request(128, 100, 20), False),
                (request(1, 1, 0, logprobs=False, api=Api.COMPLETIONS, prompt=long, batch=(long,) * 255,
                         prompt_logprobs=20), True),  # 256 prompts: each choice's first chunk holds 168k
                (GenerationRequest(Api.COMPLETIONS, long, SamplingOptions(max_tokens=1, logprobs=True,
                                                                          top_logprobs=20), echo=True,
                                   batch=(long,)), True)]
    for refused_request, streamed in too_many:
        with pytest.raises(ApiError) as refused:
            frontend.check_response_size(refused_request, streamed)
        assert refused.value.param == "logprobs" and str(MAX_RESPONSE_LOGPROBS) in refused.value.message


def _in_process_frontend(put, cancel=None, max_pending: int = 4):
    """A Frontend on the default model's tokenizer whose request stream is put(message) (a coroutine
    function) and cancel stream cancel(request_id); nothing else of a cluster."""
    from splitserve.common.tracing import NO_TRACER
    from splitserve.services.gateway.frontend import Frontend

    snapshot = SimpleNamespace(ready=True, max_model_len=8192)
    router = SimpleNamespace(stream="replies", register=lambda rid: asyncio.Queue(), unregister=lambda rid: None)
    services = SimpleNamespace(model=ServedModel.load(None, None), cluster=SimpleNamespace(snapshot=snapshot),
                               router=router, requests=SimpleNamespace(put=put),
                               cancels=SimpleNamespace(cancel=cancel or (lambda rid: asyncio.sleep(0))),
                               tracer=NO_TRACER, metrics=MagicMock())
    return Frontend(SimpleNamespace(max_pending=max_pending), services)


@pytest.mark.timeout(60)
def test_a_batch_of_prompts_queues_n_samples_of_each_prompt_in_choice_order():
    """Choice p * n + i is prompt p's sample i (vLLM's order): its child request is "<id>-<choice>",
    with prompt p's tokens and the seed + i of its own first sample."""
    queued = []

    async def put(message):
        queued.append(message)

    frontend = _in_process_frontend(put, max_pending=8)
    request = GenerationRequest(Api.COMPLETIONS, TextPrompt("one"), SamplingOptions(seed=5), n=2,
                                batch=(TokenPrompt((7, 8, 9)), TextPrompt("three")))

    async def scenario():
        async with frontend.generate_n(request) as generations:
            return generations.request_id, generations.n

    request_id, num_choices = asyncio.run(scenario())
    tokenize = frontend.model.encode
    expected = [tokenize(TextPrompt("one"))] * 2 + [[7, 8, 9]] * 2 + [tokenize(TextPrompt("three"))] * 2
    assert num_choices == 6 and [m.request_id for m in queued] == [f"{request_id}-{i}" for i in range(6)]
    assert [list(m.prompt_token_ids) for m in queued] == expected
    assert [m.sampling.seed for m in queued] == [5, 6] * 3


def test_a_message_s_name_and_chat_template_kwargs_reach_a_template_that_reads_them():
    """A template that renders names and reads a variable (as Qwen 3's reads enable_thinking) gets
    both; a variable it does not read is dropped (vLLM's rule); a name that would clash with the
    template's functions is refused at parsing, and a value the template cannot use is a 400, never
    a 500."""
    import copy
    import dataclasses

    from splitserve.services.gateway.openai_api import parse_chat

    model = ServedModel.load(None, None)
    tokenizer = copy.copy(model.tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}{{ m.role }}{% if m.name %}({{ m.name }}){% endif %}: "
                               "{{ m.content }}\n{% endfor %}{% if enable_thinking %}<think>{% endif %}"
                               "{% for i in range(limit or 0) %}.{% endfor %}")
    served = dataclasses.replace(model, tokenizer=tokenizer)
    assert served.template_variables == {"messages", "enable_thinking", "limit"}
    passed = []
    render_template = tokenizer.apply_chat_template
    tokenizer.apply_chat_template = lambda *args, **kwargs: passed.append(kwargs) or render_template(
        *args, **kwargs)

    def render(**body) -> str:
        messages = [{"role": "user", "content": "Hi", "name": "ann"}]
        return tokenizer.decode(served.encode(parse_chat({"messages": messages, **body}).generation.prompt))

    assert render() == "user(ann): Hi\n"
    assert render(chat_template_kwargs={"enable_thinking": True, "limit": 2, "unread": 1}) == (
        "user(ann): Hi\n<think>..")
    assert "unread" not in passed[-1] and passed[-1]["limit"] == 2
    with pytest.raises(ApiError) as refused:
        render(chat_template_kwargs={"range": 1})
    assert refused.value.param == "chat_template_kwargs"
    for limit in ["two", 200_000]:  # range("two"): a TypeError; the sandbox's range refuses 200,000
        with pytest.raises(ApiError) as refused:
            render(chat_template_kwargs={"limit": limit})
        assert refused.value.param == "messages" and refused.value.kind.error_type == "invalid_request_error"
    for value in [10**400, 1 << 25, [1]]:  # bounded before any template sees it
        with pytest.raises(ApiError) as refused:
            render(chat_template_kwargs={"limit": value})
        assert refused.value.param == "chat_template_kwargs"
