"""The gateway as a real process, against a fake scheduler and fake workers run by this test process.

The fakes (on a private event loop in a thread): a grpc.aio Scheduler answering GetClusterState with
one prefill and one decode worker (or none), and a worker that reads the Redis request stream and
answers each request on its reply stream with the tokens of OUTPUT_TEXT, recording cancels. The
request's seed picks a behaviour: HOLD_SEED sends one token and waits for a cancel, REPLAY_SEED
resends positions as a replayed request would, ERROR_SEED fails the request after one token, GAP_SEED
skips a position (as a reply lost on its way would), NO_LOGPROBS_SEED sends no log probabilities
where they were asked for. Otherwise position i's token has log probability -(i + 1) / 8, and its k
top tokens are the output's next k tokens, with -1/4, -2/4, ...
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from splitserve.common.net import free_port
from splitserve.queue.redis_server import LocalRedis
from splitserve.queue.streams import CANCEL_STREAM, FIELD, ProtoCodec, RequestStream, TextCodec, connect
from splitserve.v1 import common_pb2 as pb
from splitserve.v1 import gateway_pb2 as gpb
from splitserve.v1 import gateway_pb2_grpc, scheduler_pb2_grpc
from splitserve.v1 import scheduler_pb2 as spb

OUTPUT_TEXT = " one two three four five six seven eight nine ten eleven twelve"
HOLD_SEED, REPLAY_SEED, ERROR_SEED, GAP_SEED, NO_LOGPROBS_SEED = 7001, 7002, 7003, 7004, 7005
API_KEY = "test-key"
MODEL = "smol-test"
MAX_PENDING = 3
MAX_MODEL_LEN = 2048
SHUTDOWN_GRACE_S = 1.0
IDLE_TIMEOUT_S = 6.0  # --request-idle-timeout: past every hold the other tests make


def wait_until(predicate, timeout_s: float = 10.0, what: str = "condition") -> None:
    """Poll another process's state (there is nothing to await across processes)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# The decode worker's decode steps at batch 3-4: one of 12 ms, two of 40 ms (step_stats.STEP_BUCKETS).
DECODE_STEPS = pb.StepHistogram(kind=pb.STEP_KIND_DECODE, batch_min=3, wall_s=0.092, cpu_s=0.08,
                                num_tokens=10, counts=[0, 0, 0, 1, 0, 0, 0, 0, 0, 2] + [0] * 13)


class FakeScheduler(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, cluster: FakeCluster) -> None:
        self.cluster = cluster

    async def GetClusterState(self, request, context):
        if not self.cluster.workers_registered:
            return spb.ClusterState()
        prefill = spb.WorkerState(
            worker=spb.WorkerInfo(instance_id="prefill-0", role=spb.WORKER_ROLE_PREFILL, max_model_len=4096),
            stats=pb.WorkerStats(num_blocks=100, num_free_blocks=90, num_waiting=1))
        decode = spb.WorkerState(
            worker=spb.WorkerInfo(instance_id="decode-0", role=spb.WORKER_ROLE_DECODE,
                                  max_model_len=MAX_MODEL_LEN),
            stats=pb.WorkerStats(num_blocks=100, num_free_blocks=25, num_running=2, steps=[DECODE_STEPS]))
        draining = spb.WorkerState(  # shutting down: counted as draining, not for readiness
            worker=spb.WorkerInfo(instance_id="prefill-1", role=spb.WORKER_ROLE_PREFILL, max_model_len=4096),
            draining=True)
        workload = spb.WorkloadEstimate(window_s=60, arrival_rate=1.5, num_arrivals=90, prompt_len_mean=300,
                                        prompt_len_p50=250, prompt_len_p90=700, num_finished=88,
                                        output_len_mean=120, output_len_p50=100, output_len_p90=240)
        recommendation = spb.Recommendation(
            available=True, running=spb.Placement(num_prefill=1, prefill_cores=1, num_decode=1, decode_cores=1),
            recommended=spb.Placement(num_colocated=2, colocated_cores=1), running_goodput=1.0,
            recommended_goodput=1.6, change=True)
        return spb.ClusterState(workers=[prefill, decode, draining], num_waiting=2, num_running=5,
                                workload=workload, recommendation=recommendation)


class FakeCluster:
    """Fake scheduler and workers on their own event loop in a thread."""

    def __init__(self, redis_url: str, output_ids: list[int], port: int) -> None:
        self.redis_url, self.output_ids, self.port = redis_url, output_ids, port
        self.workers_registered = False
        self.received: list[pb.QueuedRequest] = []
        self.cancels: set[str] = set()
        self._cancel_events: dict[str, asyncio.Event] = {}
        self._started = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self) -> FakeCluster:
        self._thread.start()
        assert self._started.wait(10), "fake cluster did not start"
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        server = grpc.aio.server()
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(FakeScheduler(self), server)
        server.add_insecure_port(f"127.0.0.1:{self.port}")
        await server.start()
        client = connect(self.redis_url)
        cancels = RequestStream(client, TextCodec(), key=CANCEL_STREAM)
        await cancels.ensure_group()
        stream = RequestStream(client, ProtoCodec(pb.QueuedRequest))
        await stream.ensure_group()
        tasks = [asyncio.create_task(self._read_requests(stream)),
                 asyncio.create_task(self._read_cancels(cancels))]
        self._started.set()
        await self._stop.wait()
        for task in tasks:
            task.cancel()
        await server.stop(0)

    async def _read_requests(self, stream: RequestStream) -> None:
        answering = set()
        while True:
            for entry in await stream.get("fake-worker", block_ms=200):
                await stream.ack(entry.entry_id)
                self.received.append(entry.message)
                self._cancel_events[entry.message.request_id] = asyncio.Event()
                task = asyncio.create_task(self._answer(entry.message, stream.client))
                answering.add(task)
                task.add_done_callback(answering.discard)

    async def _read_cancels(self, cancels: RequestStream) -> None:
        while True:
            for entry in await cancels.get("fake-scheduler", block_ms=200):
                await cancels.ack(entry.entry_id)
                self.cancels.add(entry.message)
                if entry.message in self._cancel_events:
                    self._cancel_events[entry.message].set()

    async def _answer(self, request: pb.QueuedRequest, client) -> None:
        async def send(index: int, ids: list[int], finish: int = 0, **fields) -> None:
            event = pb.TokenEvent(request_id=request.request_id, index=index, token_ids=ids,
                                  finish_reason=finish, **fields)
            if request.sampling.logprobs and request.sampling.seed != NO_LOGPROBS_SEED:
                event.logprobs.extend(self.logprobs(index + i, request.sampling.top_logprobs)
                                      for i in range(len(ids)))
            if index == 0 and request.sampling.prompt_logprobs and request.sampling.seed != NO_LOGPROBS_SEED:
                event.prompt_logprobs.extend(self.prompt_logprobs(request))
            await client.xadd(request.reply_stream, {FIELD: event.SerializeToString()})
            await asyncio.sleep(0.002)

        ids = self.output_ids[: request.sampling.max_tokens]
        seed = request.sampling.seed
        if seed == ERROR_SEED:
            await send(0, ids[:1])
            return await send(1, [], pb.FINISH_REASON_ERROR, error="boom")
        if seed == GAP_SEED:
            await send(0, ids[:1])
            await send(2, ids[2:3])
            return await self._cancel_events[request.request_id].wait()
        if seed == HOLD_SEED:
            await send(0, ids[:1])
            return await self._cancel_events[request.request_id].wait()
        if seed == REPLAY_SEED:  # three tokens, then the "replayed" request starts again from 0
            for i in range(3):
                await send(i, ids[i : i + 1])
        for i, token_id in enumerate(ids[:-1]):
            await send(i, [token_id])
        length = request.sampling.max_tokens <= len(self.output_ids)
        await send(len(ids) - 1, ids[-1:], pb.FINISH_REASON_LENGTH if length else pb.FINISH_REASON_STOP,
                   timeline=self._timeline(request, len(ids)))

    def logprobs(self, index: int, top: int) -> pb.TokenLogprobs:
        """What the fake sends for position index (the module docstring says what)."""
        ids = self.output_ids
        return pb.TokenLogprobs(logprob=-(index + 1) / 8,
                                top_token_ids=[ids[(index + r) % len(ids)] for r in range(top)],
                                top_logprobs=[-(r + 1) / 4 for r in range(top)])

    @staticmethod
    def prompt_logprobs(request: pb.QueuedRequest) -> list[pb.TokenLogprobs]:
        """Prompt position p (from 1) gets -p / 16, rank p, and as top tokens the prompt's first ones."""
        ids, top = request.prompt_token_ids, request.sampling.top_prompt_logprobs
        return [pb.TokenLogprobs(logprob=-p / 16, rank=p, top_token_ids=ids[:top],
                                 top_logprobs=[-(r + 1) / 32 for r in range(min(top, len(ids)))])
                for p in range(1, len(ids))]

    @staticmethod
    def _timeline(request: pb.QueuedRequest, num_tokens: int) -> pb.Timeline:
        timeline = pb.Timeline()
        timeline.CopyFrom(request.timeline)
        now = time.time()
        timeline.scheduled = timeline.prefill_start = timeline.queued + 0.01
        timeline.prefill_end = timeline.first_token = timeline.kv_transfer_start = timeline.queued + 0.02
        timeline.kv_transfer_end = timeline.queued + 0.025
        timeline.kv_transfer_bytes = 4096
        timeline.token_times.extend(now for _ in range(num_tokens - 1))
        timeline.finish = now
        return timeline


@dataclass(frozen=True)
class Reply:
    status_code: int
    headers: dict[str, str]
    text: str

    def json(self):
        return json.loads(self.text)


def open_request(port: int, method: str, path: str, body=None, key: str | None = API_KEY,
                 timeout: float = 20) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """Send one request; the caller reads (or abandons) the response and closes the connection."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if body is not None and not isinstance(body, bytes):
        body, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    connection.request(method, path, body=body, headers=headers)
    return connection, connection.getresponse()


def request(port: int, method: str, path: str, body=None, key: str | None = API_KEY) -> Reply:
    connection, response = open_request(port, method, path, body, key)
    with contextlib.closing(connection):
        text = response.read().decode()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, text)


class Gateway:
    """A gateway process with its fakes, and clients for it."""

    def __init__(self, fake: FakeCluster, http_port: int, grpc_port: int, tokenizer, output_ids: list[int]):
        self.fake, self.tokenizer, self.output_ids = fake, tokenizer, output_ids
        self.http_port = http_port
        self.url = f"http://127.0.0.1:{http_port}"
        self.grpc_address = f"127.0.0.1:{grpc_port}"
        self.auth = {"Authorization": f"Bearer {API_KEY}"}
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, timeout=20)
        self.channel = grpc.insecure_channel(self.grpc_address)
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)
        self.initial_ready_status: int | None = None

    def text(self, num_tokens: int) -> str:
        return self.tokenizer.decode(self.output_ids[:num_tokens])

    def post(self, path: str, body, key: str | None = API_KEY) -> Reply:
        return request(self.http_port, "POST", path, body, key)

    def get(self, path: str, key: str | None = None) -> Reply:
        return request(self.http_port, "GET", path, key=key)

    def generate(self, key: str | None = API_KEY, **fields) -> list[gpb.GenerateResponse]:
        metadata = [("authorization", f"Bearer {key}")] if key else []
        return list(self.stub.Generate(gpb.GenerateRequest(**fields), metadata=metadata, timeout=20))

    def assert_nothing_enqueued(self, action) -> None:
        """Runs action, then one good request: the good request must be the only one the workers got."""
        before = len(self.fake.received)
        action()
        good = self.client.completions.create(model=MODEL, prompt="ok", max_tokens=1)
        assert [r.request_id for r in self.fake.received[before:]] == [good.id]

    def status(self, path: str) -> int:
        try:
            return self.get(path).status_code
        except OSError:
            return 0


def start_gateway(redis_url: str, scheduler_port: int, http_port: int, grpc_port: int,
                  log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "splitserve.cli", "--log-json", "gateway", "--redis-url", redis_url,
         "--scheduler", f"127.0.0.1:{scheduler_port}", "--http-port", str(http_port),
         "--grpc-port", str(grpc_port), "--served-model-name", MODEL, "--api-key", API_KEY,
         "--max-pending", str(MAX_PENDING), "--cluster-poll-interval", "0.1", "--shutdown-grace",
         str(SHUTDOWN_GRACE_S), "--request-idle-timeout", str(IDLE_TIMEOUT_S)],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def wait_started(gw: Gateway, process: subprocess.Popen, log: Path) -> None:
    wait_until(lambda: process.poll() is not None or gw.status("/health") == 200, 60, "gateway start")
    assert process.poll() is None, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def gateway():
    from transformers import AutoTokenizer

    from splitserve.engine.loader import resolve_model

    http_port, grpc_port, scheduler_port = free_port(), free_port(), free_port()
    with LocalRedis() as redis, tempfile.TemporaryDirectory() as logs:
        log = Path(logs) / "gateway.log"
        process = start_gateway(redis.url, scheduler_port, http_port, grpc_port, log)
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(None).path)  # while the gateway starts
        output_ids = tokenizer(OUTPUT_TEXT)["input_ids"]
        fake = FakeCluster(redis.url, output_ids, scheduler_port).start()
        gw = Gateway(fake, http_port, grpc_port, tokenizer, output_ids)
        gw.redis_url, gw.scheduler_port, gw.logs = redis.url, scheduler_port, Path(logs)
        try:
            wait_started(gw, process, log)
            gw.initial_ready_status = gw.status("/ready")
            fake.workers_registered = True
            wait_until(lambda: gw.status("/ready") == 200, 10, "readiness")
            yield gw
        finally:
            gw.channel.close()
            process.terminate()
            process.wait(15)
            fake.stop()
            print(log.read_text()[-5000:])  # shown when a test failed


def sse_events(response: Reply) -> list[str]:
    return [line.removeprefix("data: ") for line in response.text.split("\n\n") if line.startswith("data: ")]


@pytest.mark.timeout(30)
def test_completion_with_usage_and_a_fully_set_queued_request(gateway):
    resp = gateway.client.completions.create(model=MODEL, prompt="Say hi", max_tokens=5, temperature=0.5,
                                             top_p=0.9, seed=-3,
                                             extra_body={"top_k": -1, "min_tokens": 2, "ignore_eos": True})
    assert resp.id.startswith("cmpl-") and resp.object == "text_completion" and resp.model == MODEL
    assert resp.choices[0].text == gateway.text(5)
    assert resp.choices[0].finish_reason == "length"
    prompt_ids = gateway.tokenizer("Say hi")["input_ids"]
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (
        len(prompt_ids), 5, len(prompt_ids) + 5)
    queued = next(r for r in gateway.fake.received if r.request_id == resp.id)
    assert list(queued.prompt_token_ids) == prompt_ids
    assert queued.sampling == pb.SamplingParams(temperature=0.5, top_p=0.9, top_k=0, seed=2**64 - 3,
                                                max_tokens=5, min_tokens=2, ignore_eos=True,
                                                repetition_penalty=1.0)
    assert queued.reply_stream.startswith("splitserve:replies:gateway-")
    assert 0 < queued.timeline.arrival <= queued.timeline.queued <= time.time()


@pytest.mark.timeout(30)
def test_defaults_random_seeds_and_stop_finish(gateway):
    first = gateway.client.completions.create(model=MODEL, prompt=[[12, 34, 56]])
    second = gateway.client.completions.create(model=MODEL, prompt=[12, 34, 56],
                                                extra_body={"stop_token_ids": [2]})
    q1, q2 = (next(r for r in gateway.fake.received if r.request_id == c.id) for c in (first, second))
    assert q1.sampling.max_tokens == 16 and q1.sampling.temperature == 1.0 and q1.sampling.top_p == 1.0
    assert q1.sampling.seed != q2.sampling.seed  # drawn per request, so a replay reproduces it
    assert list(q2.sampling.stop_token_ids) == [2]
    assert first.choices[0].text == gateway.text(16)  # all 12 output tokens, then the fake's "EOS"
    assert first.choices[0].finish_reason == "stop"
    assert first.usage.completion_tokens == len(gateway.output_ids)


@pytest.mark.timeout(30)
def test_chat_applies_the_template_and_defaults_to_the_rest_of_the_context(gateway):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count."}]
    resp = gateway.client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=3)
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant" and resp.choices[0].message.content == gateway.text(3)
    expected = gateway.tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert resp.usage.prompt_tokens == len(expected) and resp.usage.completion_tokens == 3
    default = gateway.client.chat.completions.create(model=MODEL, messages=messages)
    queued = next(r for r in gateway.fake.received if r.request_id == default.id)
    assert list(queued.prompt_token_ids) == expected
    assert queued.sampling.max_tokens == MAX_MODEL_LEN - len(expected)  # the smaller worker limit


@pytest.mark.timeout(30)
def test_vllm_s_chat_template_controls_reach_the_prompt(gateway):
    """add_generation_prompt, continue_final_message (the model continues an assistant turn's start),
    chat_template_kwargs, a message's name, and text parts one per line: the prompt the cluster gets
    is the template's with them (before, all but the parts were dropped silently, and parts were
    joined without a newline)."""
    def queued(body: dict) -> list[int]:
        resp = gateway.post("/v1/chat/completions", {"model": MODEL, "max_tokens": 2, **body})
        assert resp.status_code == 200, resp.text
        request = next(r for r in gateway.fake.received if r.request_id == resp.json()["id"])
        return list(request.prompt_token_ids)

    def template(messages: list[dict], **kwargs) -> list[int]:
        ids = gateway.tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    turn = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "It is"}]
    continued = queued({"messages": turn, "add_generation_prompt": False, "continue_final_message": True})
    assert continued == template(turn, continue_final_message=True)
    assert gateway.tokenizer.decode(continued).endswith("<|im_start|>assistant\nIt is")
    closed = queued({"messages": turn, "add_generation_prompt": False})
    assert closed == template(turn) and closed != continued
    parts = [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
    assert queued({"messages": parts}) == template([{"role": "user", "content": "one\ntwo"}],
                                                   add_generation_prompt=True)
    # SmolLM2's template renders neither a name nor extra variables: they must still be accepted and
    # reach the template, whose own rendering of them is then what the cluster gets.
    named = [{"role": "user", "content": "Hi", "name": "ann"}]
    assert queued({"messages": named, "chat_template_kwargs": {"enable_thinking": False}}) == template(
        named, add_generation_prompt=True, enable_thinking=False)
    tokenized = gateway.post("/tokenize", {"messages": turn, "add_generation_prompt": False,
                                           "continue_final_message": True}).json()
    assert tokenized["tokens"] == continued


@pytest.mark.timeout(30)
def test_include_stop_str_in_output_and_stop_reason(gateway):
    """vLLM's include_stop_str_in_output keeps the stop string that ended the text; every choice
    says which stop string or stop token id ended it in stop_reason (None for a length or EOS)."""
    for stream in (False, True):
        reply = gateway.client.completions.create(
            model=MODEL, prompt="Hi", max_tokens=10, stop=["zzz", " four"], stream=stream,
            extra_body={"include_stop_str_in_output": True})
        chunks = list(reply) if stream else [reply]
        assert "".join(c.choices[0].text for c in chunks) == " one two three four"
        assert chunks[-1].choices[0].finish_reason == "stop"
        assert chunks[-1].choices[0].model_extra["stop_reason"] == " four"
    plain = gateway.client.completions.create(model=MODEL, prompt="Hi", max_tokens=10, stop=[" four"])
    assert plain.choices[0].text == " one two three"
    assert plain.choices[0].model_extra["stop_reason"] == " four"
    length = gateway.client.chat.completions.create(model=MODEL, max_tokens=2,
                                                    messages=[{"role": "user", "content": "Hi"}])
    assert length.choices[0].finish_reason == "length"
    assert length.choices[0].model_extra["stop_reason"] is None
    last = gateway.output_ids[-1]  # the fake ends every full output with "stop" at its last token
    by_token = gateway.client.completions.create(model=MODEL, prompt="Hi", max_tokens=100,
                                                 extra_body={"stop_token_ids": [last]})
    assert by_token.choices[0].finish_reason == "stop"
    assert by_token.choices[0].model_extra["stop_reason"] == last
    eos = gateway.client.completions.create(model=MODEL, prompt="Hi", max_tokens=100)
    assert eos.choices[0].finish_reason == "stop" and eos.choices[0].model_extra["stop_reason"] is None


@pytest.mark.timeout(30)
def test_streaming_completion_and_chat_with_include_usage(gateway):
    # include_obfuscation: what the openai SDK may send; these chunks carry no padding either way.
    chunks = list(gateway.client.completions.create(model=MODEL, prompt="Hi", max_tokens=6, stream=True,
                                                    stream_options={"include_usage": True,
                                                                    "include_obfuscation": False}))
    assert "".join(c.choices[0].text for c in chunks[:-1]) == gateway.text(6)
    assert chunks[-2].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 6
    hi = [{"role": "user", "content": "Hi"}]
    chat = list(gateway.client.chat.completions.create(model=MODEL, messages=hi, max_tokens=4, stream=True))
    assert chat[0].choices[0].delta.role == "assistant" and chat[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chat) == gateway.text(4)
    assert chat[-1].choices[0].finish_reason == "length" and chat[-1].usage is None
    raw = gateway.post("/v1/chat/completions",
                       {"model": MODEL, "messages": hi, "max_tokens": 2, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = sse_events(raw)
    assert events[-1] == "[DONE]" and raw.text.endswith("data: [DONE]\n\n")
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"


@pytest.mark.timeout(30)
def test_replayed_positions_are_dropped(gateway):
    resp = gateway.client.completions.create(model=MODEL, prompt="Hi", max_tokens=8, seed=REPLAY_SEED)
    assert resp.choices[0].text == gateway.text(8) and resp.usage.completion_tokens == 8


@pytest.mark.timeout(30)
def test_a_gap_in_the_positions_fails_the_request_instead_of_splicing_the_text(gateway):
    resp = gateway.post("/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 8, "seed": GAP_SEED})
    assert resp.status_code == 500 and "output tokens 1 to 1 were lost" in resp.json()["error"]["message"]
    events = sse_events(gateway.post("/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 8,
                                                         "seed": GAP_SEED, "stream": True}))
    assert json.loads(events[0])["choices"][0]["text"] == gateway.text(1)
    assert "were lost" in json.loads(events[-2])["error"]["message"] and events[-1] == "[DONE]"
    ids = {r.request_id for r in gateway.fake.received if r.sampling.seed == GAP_SEED}
    wait_until(lambda: ids <= gateway.fake.cancels, 10, "cancels of the failed requests")


@pytest.mark.timeout(30)
def test_stop_strings_truncate_the_text_and_cancel_upstream(gateway):
    resp = gateway.client.completions.create(model=MODEL, prompt="Hi", max_tokens=10, stop=[" four", "zzz"])
    assert resp.choices[0].text == " one two three" and resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens == 4  # generation ends at the token that completes the stop string
    wait_until(lambda: resp.id in gateway.fake.cancels, 5, "cancel of the stopped request")
    # Streaming: " three" could begin "three f", so it is held back and never sent.
    chunks = list(gateway.client.completions.create(model=MODEL, prompt="Hi", max_tokens=10, stop="three f",
                                                    stream=True))
    texts = [c.choices[0].text for c in chunks]
    assert "".join(texts) == " one two " and not any("three" in t for t in texts)
    assert chunks[-1].choices[0].finish_reason == "stop"
    wait_until(lambda: chunks[0].id in gateway.fake.cancels, 5, "cancel of the stopped stream")


@pytest.mark.timeout(30)
def test_stop_strings_end_the_output_only_after_min_tokens(gateway):
    """vLLM's rule: the first min_tokens tokens are never searched for stop strings; a stop string
    that ends after them counts even where it begins among them."""
    resp = gateway.client.completions.create(model=MODEL, prompt="Hi", max_tokens=10, stop=[" two", " six"],
                                             extra_body={"min_tokens": 5})
    assert resp.choices[0].text == " one two three four five" and resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens == 6
    for stream in (False, True):
        reply = gateway.client.completions.create(model=MODEL, prompt="Hi", max_tokens=10, stop=["four five"],
                                                  stream=stream, extra_body={"min_tokens": 4})
        chunks = reply if stream else [reply]
        assert "".join(c.choices[0].text for c in chunks) == " one two three "
    unreached = gateway.client.completions.create(model=MODEL, prompt="Hi", max_tokens=6, stop=[" two"],
                                                  extra_body={"min_tokens": 6})
    assert unreached.choices[0].text == gateway.text(6) and unreached.choices[0].finish_reason == "length"


def fake_logprobs(gateway, num_tokens: int, top: int) -> list[tuple[str, float, dict[str, float]]]:
    """(token text, logprob, top text -> logprob) per position, as the fake sends them."""
    ids, text = gateway.output_ids, gateway.tokenizer.decode
    return [(text([ids[i]]), -(i + 1) / 8,
             {text([ids[(i + r) % len(ids)]]): -(r + 1) / 4 for r in range(top)}) for i in range(num_tokens)]


@pytest.mark.timeout(30)
def test_completion_logprobs_streamed_or_not(gateway):
    expected = fake_logprobs(gateway, 4, 2)
    resp = gateway.client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, logprobs=2)
    logprobs = resp.choices[0].logprobs
    assert logprobs.tokens == [t for t, _, _ in expected]
    assert logprobs.token_logprobs == [lp for _, lp, _ in expected]
    assert logprobs.top_logprobs == [top for _, _, top in expected]
    assert logprobs.text_offset == [sum(len(t) for t, _, _ in expected[:i]) for i in range(4)]
    queued = next(r for r in gateway.fake.received if r.request_id == resp.id)
    assert (queued.sampling.logprobs, queued.sampling.top_logprobs) == (True, 2)

    chunks = list(gateway.client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, logprobs=0,
                                                    stream=True))
    streamed = [lp for c in chunks if c.choices and c.choices[0].logprobs
                for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed == [lp for _, lp, _ in expected]
    assert all(top == {} for c in chunks if c.choices and c.choices[0].logprobs
               for top in c.choices[0].logprobs.top_logprobs)
    plain = gateway.client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert plain.choices[0].logprobs is None


@pytest.mark.timeout(30)
def test_chat_logprobs_streamed_or_not(gateway):
    expected = fake_logprobs(gateway, 3, 1)
    messages = [{"role": "user", "content": "Hi"}]
    resp = gateway.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, logprobs=True,
                                                  top_logprobs=1)
    content = resp.choices[0].logprobs.content
    assert [(c.token, c.logprob, c.bytes) for c in content] == [
        (t, lp, list(t.encode())) for t, lp, _ in expected]
    assert [{t.token: t.logprob for t in c.top_logprobs} for c in content] == [top for _, _, top in expected]
    chunks = list(gateway.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3,
                                                         logprobs=True, stream=True))
    streamed = [(c.token, c.logprob, c.top_logprobs) for chunk in chunks if chunk.choices[0].logprobs
                for c in chunk.choices[0].logprobs.content]
    assert streamed == [(t, lp, []) for t, lp, _ in expected]
    plain = gateway.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert plain.choices[0].logprobs is None


@pytest.mark.timeout(30)
def test_echo_and_prompt_logprobs_as_lm_eval_and_vllm_read_them(gateway):
    decode = gateway.tokenizer.decode

    def text(ids: list[int]) -> str:
        return decode(ids)

    echoed = gateway.client.completions.create(model=MODEL, prompt="Say hi", max_tokens=3, echo=True)
    assert echoed.choices[0].text == "Say hi" + gateway.text(3) and echoed.choices[0].logprobs is None
    queued = next(r for r in gateway.fake.received if r.request_id == echoed.id)
    assert not queued.sampling.prompt_logprobs  # an echo without logprobs needs no scores

    # lm-evaluation-harness's loglikelihood request: token ids, echo, logprobs 1, one new token.
    prompt = gateway.tokenizer("The sky is blue")["input_ids"]
    resp = gateway.post("/v1/completions", {"model": MODEL, "prompt": [prompt], "max_tokens": 1, "echo": True,
                                            "logprobs": 1, "temperature": 0}).json()
    choice = resp["choices"][0]
    assert choice["text"] == decode(prompt) + gateway.text(1)
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == [text([t]) for t in prompt] + [text([gateway.output_ids[0]])]
    assert logprobs["token_logprobs"] == [None] + [-p / 16 for p in range(1, len(prompt))] + [-1 / 8]
    assert logprobs["top_logprobs"] == [None] + [{text([prompt[0]]): -1 / 32}] * (len(prompt) - 1) + [
        {text([gateway.output_ids[0]]): -1 / 4}]
    tokens = logprobs["tokens"]
    assert logprobs["text_offset"] == [sum(len(t) for t in tokens[:i]) for i in range(len(prompt) + 1)]
    queued = next(r for r in gateway.fake.received if r.request_id == resp["id"])
    assert (queued.sampling.prompt_logprobs, queued.sampling.top_prompt_logprobs) == (True, 1)

    # vLLM's prompt_logprobs: on the choice (completions) or the response (chat).
    resp = gateway.post("/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 2,
                                            "prompt_logprobs": 2}).json()
    expected = [None] + [{str(prompt[0]): {"logprob": -1 / 32, "rank": 1, "decoded_token": text([prompt[0]])},
                          str(prompt[1]): {"logprob": -2 / 32, "rank": 2, "decoded_token": text([prompt[1]])},
                          str(prompt[p]): {"logprob": -p / 16, "rank": p, "decoded_token": text([prompt[p]])}}
                         for p in range(1, len(prompt))]
    assert resp["choices"][0]["prompt_logprobs"] == expected and resp["choices"][0]["logprobs"] is None
    messages = [{"role": "user", "content": "Hi"}]
    chat = gateway.post("/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 1,
                                                 "prompt_logprobs": 0}).json()
    queued = next(r for r in gateway.fake.received if r.request_id == chat["id"])
    assert len(chat["prompt_logprobs"]) == len(queued.prompt_token_ids) and chat["prompt_logprobs"][0] is None
    [first] = gateway.generate(prompt_token_ids=prompt, max_tokens=1, prompt_logprobs=0)
    assert [(lp.logprob, lp.rank) for lp in first.prompt_logprobs] == [
        (-p / 16, p) for p in range(1, len(prompt))]
    missing = gateway.post("/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 1,
                                               "prompt_logprobs": 1, "seed": NO_LOGPROBS_SEED})
    assert missing.status_code == 500 and "prompt's log probabilities" in missing.json()["error"]["message"]


@pytest.mark.timeout(30)
def test_n_samples_are_choices_of_one_response_with_one_prompt(gateway):
    resp = gateway.client.completions.create(model=MODEL, prompt="Say hi", max_tokens=3, n=3, seed=40)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert all(c.text == gateway.text(3) and c.finish_reason == "length" for c in resp.choices)
    prompt_tokens = len(gateway.tokenizer("Say hi")["input_ids"])
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (prompt_tokens, 9)
    queued = [r for r in gateway.fake.received if r.request_id.startswith(resp.id)]
    assert [r.request_id for r in queued] == [f"{resp.id}-{i}" for i in range(3)]
    assert [r.sampling.seed for r in queued] == [40, 41, 42]  # vLLM's seed + index
    assert len({tuple(r.prompt_token_ids) for r in queued}) == 1

    chunks = list(gateway.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, n=2, stream=True,
        stream_options={"include_usage": True}))
    roles = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role == "assistant"]
    assert roles == [0, 1]
    for index in (0, 1):
        text = "".join(c.choices[0].delta.content or "" for c in chunks
                       if c.choices and c.choices[0].index == index)
        assert text == gateway.text(2)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4

    # One failed sample fails the request; the others are cancelled.
    failed = gateway.post("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 5, "n": 2,
                                              "seed": ERROR_SEED - 1})
    assert failed.status_code == 500 and "boom" in failed.json()["error"]["message"]
    first, second = gateway.fake.received[-2:]
    assert (first.request_id[-2:], second.sampling.seed) == ("-0", ERROR_SEED)
    wait_until(lambda: first.request_id in gateway.fake.cancels, 5, "the surviving sample's cancel")

    # gRPC: each message names its sample; each sample's last one has its finish and usage.
    responses = gateway.generate(prompt="Say hi", max_tokens=3, n=3, seed=50, request_id="mine-n")
    for index in range(3):
        sample = [r for r in responses if r.index == index]
        assert "".join(r.text for r in sample) == gateway.text(3) and sample[-1].usage.completion_tokens == 3
        assert sample[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert {r.request_id for r in responses} == {"mine-n"} and {r.index for r in responses} == {0, 1, 2}
    queued = [r for r in gateway.fake.received if r.sampling.seed in (50, 51, 52)]
    assert sorted(r.sampling.seed for r in queued) == [50, 51, 52]


@pytest.mark.timeout(30)
def test_structured_output_fields_become_the_request_s_grammar(gateway):
    def grammar_of(body: dict, path: str = "/v1/completions") -> pb.Grammar:
        resp = gateway.post(path, {"model": MODEL, "max_tokens": 1, **body})
        assert resp.status_code == 200, resp.text
        return next(r for r in gateway.fake.received if r.request_id == resp.json()["id"]).sampling.grammar

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    assert grammar_of({**chat, "response_format": {"type": "json_object"}}, "/v1/chat/completions") == pb.Grammar(
        json_schema='{"type": "object"}')
    assert json.loads(grammar_of({**chat, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}},
        "/v1/chat/completions").json_schema) == schema
    assert json.loads(grammar_of({"prompt": "x", "guided_json": schema}).json_schema) == schema
    assert grammar_of({"prompt": "x", "guided_regex": "[a-z]+"}) == pb.Grammar(regex="[a-z]+")
    assert grammar_of({"prompt": "x", "guided_choice": ["yes", "a.b"]}) == pb.Grammar(regex=r"(yes|a\.b)")
    plain = gateway.client.completions.create(model=MODEL, prompt="x", max_tokens=1,
                                              extra_body={"response_format": {"type": "text"}})
    queued = next(r for r in gateway.fake.received if r.request_id == plain.id)
    assert not queued.sampling.HasField("grammar")
    [response] = gateway.generate(prompt="x", max_tokens=1, grammar=pb.Grammar(regex="[0-9]+"))
    assert gateway.fake.received[-1].sampling.grammar.regex == "[0-9]+"


@pytest.mark.timeout(30)
def test_tools_reach_the_prompt_and_a_required_call_its_grammar(gateway):
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Time?"}], "max_tokens": 3, "tools": [tool]}
    auto = gateway.post("/v1/chat/completions", body).json()
    queued = next(r for r in gateway.fake.received if r.request_id == auto["id"])
    assert "<tools>" in gateway.tokenizer.decode(queued.prompt_token_ids) and not queued.sampling.HasField("grammar")
    assert auto["choices"][0]["message"] == {"role": "assistant", "content": gateway.text(3)}  # no call in it
    required = gateway.post("/v1/chat/completions", {**body, "tool_choice": "required"}).json()
    queued = next(r for r in gateway.fake.received if r.request_id == required["id"])
    assert json.loads(queued.sampling.grammar.json_schema)["type"] == "array"
    # The fake's words are no call: cut short by max_tokens, they come back as content.
    assert required["choices"][0]["finish_reason"] == "length"
    assert required["choices"][0]["message"]["content"] == gateway.text(3)
    none = gateway.post("/v1/chat/completions", {**body, "tool_choice": "none"}).json()
    queued = next(r for r in gateway.fake.received if r.request_id == none["id"])
    assert "<tools>" not in gateway.tokenizer.decode(queued.prompt_token_ids)
    # Streamed with tools, chunks carry their tokens' logprobs as without tools (before: always null).
    chunks = list(gateway.client.chat.completions.create(
        model=MODEL, messages=body["messages"], max_tokens=3, tools=[tool], stream=True, logprobs=True,
        top_logprobs=1))
    streamed = [t.token for c in chunks if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content]
    assert streamed == [text for text, _, _ in fake_logprobs(gateway, 3, 1)]


@pytest.mark.timeout(30)
def test_a_batch_of_prompts_is_one_response_with_n_choices_per_prompt_in_order(gateway):
    """OpenAI's and vLLM's prompt arrays (lm-evaluation-harness sends them): choice p * n + i is
    prompt p's sample i, each prompt tokenized and queued as its own request; usage counts each
    prompt once. Before, a list of more than one prompt was a 400."""
    prompts = ["Say hi", [12, 34, 56], "Another one"]
    resp = gateway.client.completions.create(model=MODEL, prompt=prompts, max_tokens=3, echo=True, seed=7)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    echoed = ["Say hi", gateway.tokenizer.decode([12, 34, 56]), "Another one"]
    assert [c.text for c in resp.choices] == [e + gateway.text(3) for e in echoed]
    queued = sorted((r for r in gateway.fake.received if r.request_id.startswith(resp.id)),
                    key=lambda r: r.request_id)
    ids = [gateway.tokenizer(prompts[0])["input_ids"], [12, 34, 56], gateway.tokenizer(prompts[2])["input_ids"]]
    assert [r.request_id for r in queued] == [f"{resp.id}-{i}" for i in range(3)]
    assert [list(r.prompt_token_ids) for r in queued] == ids and {r.sampling.seed for r in queued} == {7}
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (sum(map(len, ids)), 9)
    # n per prompt, streamed: choice 2 * p + i; the usage chunk counts each prompt once.
    chunks = list(gateway.client.completions.create(model=MODEL, prompt=["a b", "c"], max_tokens=2, n=1,
                                                    stream=True, stream_options={"include_usage": True}))
    for index in (0, 1):
        assert "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == index) == \
            gateway.text(2)
    prompt_tokens = len(gateway.tokenizer("a b")["input_ids"]) + len(gateway.tokenizer("c")["input_ids"])
    assert chunks[-1].usage.prompt_tokens == prompt_tokens and chunks[-1].usage.completion_tokens == 4


@pytest.mark.timeout(30)
def test_penalties_bias_and_min_p_reach_the_workers(gateway):
    resp = gateway.client.completions.create(
        model=MODEL, prompt="Hi", max_tokens=2, presence_penalty=0.5, frequency_penalty=-1.5,
        logit_bias={"15": -100, "7": 2.5}, extra_body={"repetition_penalty": 1.2, "min_p": 0.05})
    queued = next(r for r in gateway.fake.received if r.request_id == resp.id)
    assert queued.sampling.presence_penalty == 0.5 and queued.sampling.frequency_penalty == -1.5
    assert queued.sampling.repetition_penalty == pytest.approx(1.2)
    assert queued.sampling.min_p == pytest.approx(0.05)
    assert [(b.token_id, b.bias) for b in queued.sampling.logit_bias] == [(15, -100.0), (7, 2.5)]
    [response] = gateway.generate(prompt="Hi", max_tokens=1, presence_penalty=2.0, min_p=0.5,
                                  logit_bias=[pb.LogitBias(token_id=3, bias=-1)], request_id="pen")
    queued = gateway.fake.received[-1]
    assert response.request_id == "pen" and queued.sampling.presence_penalty == 2.0
    assert (queued.sampling.min_p, queued.sampling.repetition_penalty) == (0.5, 1.0)
    assert [(b.token_id, b.bias) for b in queued.sampling.logit_bias] == [(3, -1.0)]


@pytest.mark.timeout(30)
def test_tokens_without_the_logprobs_asked_for_fail_the_request(gateway):
    resp = gateway.post("/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "logprobs": 1,
                                            "seed": NO_LOGPROBS_SEED})
    assert resp.status_code == 500 and "log probabilities" in resp.json()["error"]["message"]


BAD_COMPLETIONS = [
    {"prompt": ""}, {"prompt": []}, {}, {"prompt": ["a", ""]}, {"prompt": ["a", [1, "b"]]}, {"prompt": {"text": "x"}},
    {"prompt": ["a", "b"], "n": 2},  # 4 choices: more than MAX_PENDING
    {"prompt": ["a"] * 1025},
    # the batch's later prompts are checked before its first is queued
    {"prompt": ["a", [10**9]]}, {"prompt": ["a", "x" * (MAX_MODEL_LEN * 100)]},
    {"prompt": [100] * MAX_MODEL_LEN},  # no room left in the workers' context (the config allows 8192)
    {"prompt": [100] * 2000, "max_tokens": 100}, {"prompt": "x", "max_tokens": 0},
    {"prompt": "x", "max_tokens": "ten"}, {"prompt": "x", "max_tokens": 2.5},
    {"prompt": "x", "temperature": -0.5}, {"prompt": "x", "top_p": 0}, {"prompt": "x", "top_p": 1.5},
    {"prompt": "x", "top_k": -5}, {"prompt": "x", "n": 0}, {"prompt": "x", "n": 129},
    {"prompt": "x", "n": MAX_PENDING + 1}, {"prompt": "x", "n": 2, "echo": True}, {"prompt": "x", "best_of": 2},
    {"prompt": "x", "stop": [""]}, {"prompt": "x", "stop": 5}, {"prompt": "x", "min_tokens": 20},
    {"prompt": [10**9]}, {"prompt": "x", "seed": "x"}, {"prompt": "x", "stream": "yes"},
    {"prompt": "x", "logprobs": 21}, {"prompt": "x", "logprobs": True}, {"prompt": "x", "echo": "yes"},
    {"prompt": "x", "prompt_logprobs": 21}, {"prompt": "x", "prompt_logprobs": 1, "stream": True},
    {"prompt": "x", "stream_options": {"include_usage": True}}, {"prompt": "x", "presence_penalty": 2.5},
    {"prompt": "x", "stream": True, "stream_options": {"include_obfuscation": "no"}},
    {"prompt": "x", "frequency_penalty": "1"}, {"prompt": "x", "repetition_penalty": 0},
    {"prompt": "x", "min_p": 1.5}, {"prompt": "x", "logit_bias": {"abc": 1}},
    {"prompt": "x", "logit_bias": []},
    {"prompt": "x", "logit_bias": {"5": 101}}, {"prompt": "x", "logit_bias": {"5": 10**400}},
    {"prompt": "x", "logit_bias": {"999999999": 1}},  # out of the vocabulary
    {"prompt": "x", "logit_bias": {str(i): 1 for i in range(301)}}, {"prompt": "x", "guided_grammar": "root"},
    {"prompt": "x", "response_format": {"type": "xml"}}, {"prompt": "x", "response_format": "json"},
    {"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
    {"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}},
    {"prompt": "x", "guided_regex": "(a|b"}, {"prompt": "x", "guided_json": 5}, {"prompt": "x", "guided_choice": []},
    {"prompt": "x", "guided_json": {"type": "object"}, "guided_regex": "a"},
    {"prompt": "x", "guided_regex": "a" * (64 << 10 + 1)},
    {"prompt": "x", "tools": [{"type": "function", "function": {"name": "f"}}]},
    {"prompt": "x", "use_beam_search": True}, {"prompt": "x", "allowed_token_ids": [1, 2]},
    {"prompt": "x", "bad_words": ["x"]}, {"prompt": "x", "truncate_prompt_tokens": 4},
    {"prompt": "x", "include_stop_str_in_output": "yes"}, {"prompt": "x", "skip_special_tokens": 1},
]
BAD_CHATS = [
    {}, {"messages": []}, {"messages": [{"role": "user"}]}, {"messages": [{"role": 5, "content": "x"}]},
    {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},  # without logprobs
    {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
    {"messages": [{"role": "user", "content": "x"}], "logprobs": 1},
    {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
    {"messages": [{"role": "user", "content": "x"}], "echo": True},
    {"messages": [{"role": "user", "content": "x"}], "tools": "x"},
    {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"},
    {"messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "function", "function": {"name": "f"}},
     "tools": [{"type": "function", "function": {"name": "g"}}]},
    {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "function": {"name": "f"}}]}]},
    {"messages": [{"role": "user", "content": "x", "name": 5}]},
    {"messages": [{"role": "user", "content": "x", "name": "n" * 257}]},
    # continue_final_message with the generation prompt (the default)
    {"messages": [{"role": "assistant", "content": "x"}], "continue_final_message": True},
    {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"tokenize": False}},
    {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"x": {"nested": 1}}},
    {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {f"k{i}": 1 for i in range(17)}},
    {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": "enable_thinking"},
]


@pytest.mark.timeout(30)
def test_bad_input_is_400_with_an_openai_error_and_never_enqueued(gateway):
    def send_all():
        cases = [("/v1/completions", {"model": MODEL, **b}) for b in BAD_COMPLETIONS]
        cases += [("/v1/chat/completions", {"model": MODEL, **b}) for b in BAD_CHATS]
        cases += [("/v1/completions", b"{not json"), ("/v1/completions", b"[1, 2]")]
        for path, body in cases:
            resp = gateway.post(path, body)
            assert resp.status_code == 400, (body, resp.text)
            error = resp.json()["error"]
            assert error["type"] == "invalid_request_error" and error["message"], body
            assert set(error) == {"message", "type", "param", "code"}
        too_long = gateway.post("/v1/completions", {"prompt": [100] * 2000, "max_tokens": 100})
        assert too_long.json()["error"]["param"] == "max_tokens"
        assert too_long.json()["error"]["code"] == "context_length_exceeded"
        wrong_type = gateway.post("/v1/completions", {"prompt": "x", "max_tokens": "ten"})
        assert wrong_type.json()["error"]["param"] == "max_tokens"

    gateway.assert_nothing_enqueued(send_all)
    assert gateway.get("/health").status_code == 200  # still serving


@pytest.mark.timeout(30)
def test_unknown_model_is_400_model_not_found(gateway):
    def send():
        with pytest.raises(openai.BadRequestError) as info:
            gateway.client.completions.create(model="gpt-4", prompt="x")
        assert info.value.status_code == 400 and info.value.code == "model_not_found"

    gateway.assert_nothing_enqueued(send)


@pytest.mark.timeout(30)
def test_api_key_guards_v1_and_grpc_but_not_the_probes(gateway):
    def send():
        for key in (None, "wrong"):
            resp = gateway.post("/v1/completions", {"model": MODEL, "prompt": "x"}, key=key)
            assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
        assert gateway.get("/v1/models").status_code == 401
        assert gateway.post("/tokenize", {"prompt": "x"}, key=None).status_code == 401
        assert gateway.post("/detokenize", {"tokens": [1]}, key="wrong").status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="wrong", max_retries=0).models.list()
        with pytest.raises(grpc.RpcError) as info:
            gateway.generate(prompt="x", key="wrong")
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

    gateway.assert_nothing_enqueued(send)
    assert [gateway.get(p).status_code for p in ("/health", "/ready", "/metrics")] == [200, 200, 200]


@pytest.mark.timeout(30)
def test_models_lists_the_served_name_and_the_worker_context(gateway):
    (card,) = gateway.client.models.list().data
    assert card.id == MODEL and card.object == "model"
    assert card.model_extra["max_model_len"] == MAX_MODEL_LEN
    missing = gateway.get("/v1/nowhere", key=API_KEY)
    assert missing.status_code == 404 and missing.json()["error"]["message"]


@pytest.mark.timeout(30)
def test_tokenize_and_detokenize_as_vllm_answers_them(gateway):
    text = "Hello there, tokenizer"
    ids = gateway.tokenizer(text)["input_ids"]
    resp = gateway.post("/tokenize", {"model": MODEL, "prompt": text, "return_token_strs": True}).json()
    assert resp == {"count": len(ids), "max_model_len": MAX_MODEL_LEN, "tokens": ids,
                    "token_strs": gateway.tokenizer.convert_ids_to_tokens(ids)}
    messages = [{"role": "user", "content": "Hi"}]
    chat = gateway.post("/tokenize", {"messages": messages, "add_generation_prompt": False}).json()
    templated = gateway.tokenizer.apply_chat_template(messages, tokenize=True)
    assert chat["tokens"] == list(templated["input_ids"] if hasattr(templated, "keys") else templated)
    assert chat["token_strs"] is None
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    with_tools = gateway.post("/tokenize", {"messages": messages, "tools": [tool]}).json()["tokens"]
    completion = gateway.post("/v1/chat/completions", {"model": MODEL, "messages": messages, "tools": [tool],
                                                       "max_tokens": 1}).json()
    queued = next(r for r in gateway.fake.received if r.request_id == completion["id"])
    assert with_tools == list(queued.prompt_token_ids)  # what the chat request tokenized, tools included
    with_prompt = gateway.post("/tokenize", {"messages": messages}).json()["tokens"]
    assert with_prompt[:len(chat["tokens"])] == chat["tokens"] and len(with_prompt) > len(chat["tokens"])
    assert gateway.post("/detokenize", {"model": MODEL, "tokens": ids}).json() == {"prompt": text}
    for path, body, param in [
            ("/tokenize", {"prompt": ""}, "prompt"), ("/tokenize", {"prompt": [1, 2]}, "prompt"),
            ("/tokenize", {"prompt": "x", "model": "other"}, "model"),
            ("/tokenize", {"prompt": "x" * 10_000_000}, None),  # past the body limit: 413
            ("/tokenize", {"prompt": "x" * (MAX_MODEL_LEN * 100)}, "prompt"),  # cannot fit the context
            ("/detokenize", {"tokens": [10**9]}, "tokens"), ("/detokenize", {"tokens": [-1]}, "tokens"),
            ("/detokenize", {"tokens": "abc"}, "tokens"),
            ("/detokenize", {"tokens": [1] * (MAX_MODEL_LEN + 1)}, "tokens")]:
        resp = gateway.post(path, body)
        assert resp.status_code in (400, 413), (path, resp.text[:200])
        assert resp.json()["error"]["param"] == param, (path, resp.text[:200])


@pytest.mark.timeout(40)
def test_full_gateway_refuses_with_429_and_disconnects_cancel(gateway):
    body = {"model": MODEL, "prompt": "hold", "max_tokens": 5, "seed": HOLD_SEED, "stream": True}
    with contextlib.ExitStack() as streams:
        ids = []
        for _ in range(MAX_PENDING - 1):
            connection, response = open_request(gateway.http_port, "POST", "/v1/completions", body)
            streams.callback(connection.close)
            first = next(line for line in iter(response.readline, b"") if line.startswith(b"data: "))
            ids.append(json.loads(first.removeprefix(b"data: "))["id"])  # mid-stream: one token arrived
        call = gateway.stub.Generate(gpb.GenerateRequest(prompt="hold", seed=HOLD_SEED),
                                     metadata=[("authorization", f"Bearer {API_KEY}")])
        ids.append(next(call).request_id)
        full = gateway.post("/v1/completions", {"model": MODEL, "prompt": "x"})
        assert full.status_code == 429 and full.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(grpc.RpcError) as info:
            gateway.generate(prompt="x")
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert not set(ids) & gateway.fake.cancels
        call.cancel()
    wait_until(lambda: set(ids) <= gateway.fake.cancels, 10, "cancels of the disconnected requests")
    wait_until(lambda: gateway.post("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1})
               .status_code == 200, 10, "a free slot")


def test_a_request_the_cluster_stops_answering_times_out_and_is_cancelled(gateway):
    """A lost reply (the fake worker sends one token, then nothing) must not hold the client, or a
    max-pending slot, forever: past the idle timeout the client gets a timeout error (HTTP 504 with
    an OpenAI error body, gRPC DEADLINE_EXCEEDED) and the request is cancelled upstream."""
    before = len(gateway.fake.received)

    def over_grpc() -> grpc.RpcError | None:
        try:
            gateway.generate(prompt="hold", seed=HOLD_SEED)
        except grpc.RpcError as exc:
            return exc
        return None

    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        over_http = pool.submit(gateway.post, "/v1/completions", {"model": MODEL, "prompt": "hold", "seed": HOLD_SEED})
        refused = pool.submit(over_grpc)
        reply, error = over_http.result(), refused.result()
    assert IDLE_TIMEOUT_S <= time.monotonic() - started < IDLE_TIMEOUT_S + 10
    assert reply.status_code == 504 and reply.json()["error"]["type"] == "timeout_error", reply.text
    assert error is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
    ids = {r.request_id for r in gateway.fake.received[before:]}
    assert len(ids) == 2
    wait_until(lambda: ids <= gateway.fake.cancels, 10, "cancels of the timed-out requests")


@pytest.mark.timeout(30)
def test_cluster_errors_reach_the_client(gateway):
    body = {"model": MODEL, "prompt": "x", "seed": ERROR_SEED}
    resp = gateway.post("/v1/completions", body)
    assert resp.status_code == 500 and "boom" in resp.json()["error"]["message"]
    events = sse_events(gateway.post("/v1/completions", {**body, "stream": True}))
    assert json.loads(events[0])["choices"][0]["text"] == gateway.text(1)
    assert "boom" in json.loads(events[-2])["error"]["message"] and events[-1] == "[DONE]"
    with pytest.raises(openai.APIError):
        list(gateway.client.completions.create(model=MODEL, prompt="x", seed=ERROR_SEED, stream=True))
    with pytest.raises(grpc.RpcError) as info:
        gateway.generate(prompt="x", seed=ERROR_SEED)
    assert info.value.code() == grpc.StatusCode.INTERNAL and "boom" in info.value.details()


@pytest.mark.timeout(30)
def test_grpc_generate_streams_text_usage_and_timeline(gateway):
    responses = gateway.generate(prompt="Hi", max_tokens=4, temperature=0.0)
    assert "".join(r.text for r in responses) == gateway.text(4)
    assert [t for r in responses for t in r.token_ids] == gateway.output_ids[:4]
    last = responses[-1]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH and last.request_id.startswith("gen-")
    assert (last.usage.completion_tokens, last.usage.total_tokens) == (4, last.usage.prompt_tokens + 4)
    assert last.timeline.kv_transfer_bytes == 4096 and last.timeline.arrival > 0
    chat = gateway.generate(messages=[gpb.ChatMessage(role="user", content="Hi")], max_tokens=2,
                            stop=[" two"], request_id="my-request-1")
    assert "".join(r.text for r in chat) == gateway.text(1) and chat[-1].request_id == "my-request-1"
    assert chat[-1].finish_reason == pb.FINISH_REASON_STOP
    ids = gateway.generate(prompt_token_ids=[5, 6, 7], max_tokens=1)
    assert ids[-1].usage.prompt_tokens == 3
    scored = gateway.generate(prompt="Hi", max_tokens=3, logprobs=True, top_logprobs=2)
    positions = [lp for r in scored for lp in r.logprobs]
    assert [lp.logprob for lp in positions] == [-1 / 8, -2 / 8, -3 / 8]
    assert [list(lp.top_token_ids) for lp in positions] == [gateway.output_ids[i:i + 2] for i in range(3)]
    assert all(list(lp.top_logprobs) == [-0.25, -0.5] for lp in positions)
    assert not any(r.logprobs for r in responses)


@pytest.mark.timeout(30)
def test_grpc_bad_input_is_invalid_argument(gateway):
    bad = [{}, {"prompt": "x", "prompt_token_ids": [1]}, {"prompt": "x", "temperature": -1.0},
           {"prompt": "x", "max_tokens": 0}, {"prompt": "x", "top_p": 2.0}, {"prompt": "x", "model": "other"},
           {"prompt_token_ids": [100] * MAX_MODEL_LEN}, {"prompt": "x", "presence_penalty": 3.0},
           {"prompt": "x", "repetition_penalty": -1.0}, {"prompt": "x", "min_p": 2.0},
           {"prompt": "x", "top_logprobs": 2}, {"prompt": "x", "logprobs": True, "top_logprobs": 21},
           {"prompt": "x", "logit_bias": [pb.LogitBias(token_id=10**9, bias=1.0)]},
           {"prompt": "x", "logit_bias": [pb.LogitBias(token_id=1, bias=float("nan"))]},
           {"prompt": "x", "n": 0}, {"prompt": "x", "n": 129}, {"prompt": "x", "n": 2, "prompt_logprobs": 1}]

    def send_all():
        for fields in bad:
            with pytest.raises(grpc.RpcError) as info:
                gateway.generate(**fields)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fields

    gateway.assert_nothing_enqueued(send_all)


@pytest.mark.timeout(30)
def test_readiness_follows_the_registered_workers(gateway):
    assert gateway.initial_ready_status == 503  # before the fake scheduler reported workers
    health = health_pb2_grpc.HealthStub(gateway.channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    assert health.Check(health_pb2.HealthCheckRequest(service="")).status == serving
    gateway.fake.workers_registered = False
    try:
        wait_until(lambda: gateway.status("/ready") == 503, 5, "not ready")
        assert gateway.get("/ready").json()["prefill_workers"] == 0
        refused = gateway.post("/v1/completions", {"model": MODEL, "prompt": "x"})
        assert refused.status_code == 503 and refused.json()["error"]["message"]
        with pytest.raises(grpc.RpcError) as info:
            gateway.generate(prompt="x")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        status = health.Check(health_pb2.HealthCheckRequest(service="splitserve.v1.Gateway")).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        gateway.fake.workers_registered = True
    wait_until(lambda: gateway.status("/ready") == 200, 5, "ready again")


def metric_samples(gateway) -> dict[tuple[str, tuple], float]:
    text = gateway.get("/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.timeout(30)
def test_metrics_expose_latency_histograms_counters_and_cluster_gauges(gateway):
    gateway.client.completions.create(model=MODEL, prompt="Hi", max_tokens=3)
    samples = metric_samples(gateway)
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "kv_transfer_time_seconds", "kv_transfer_bytes"):
        assert samples[(f"splitserve:{name}_count", ())] >= 1, name
    assert samples[("splitserve:kv_transfer_bytes_sum", ())] >= 4096
    assert samples[("splitserve:request_success_total", (("finished_reason", "length"),))] >= 1
    assert samples[("splitserve:prompt_tokens_total", ())] > 0
    assert samples[("splitserve:generation_tokens_total", ())] >= 3
    assert samples[("splitserve:num_requests_running", ())] == 5
    assert samples[("splitserve:num_requests_waiting", ())] == 3  # scheduler 2 + prefill worker 1
    assert samples[("splitserve:kv_cache_usage_perc", (("role", "decode"),))] == pytest.approx(0.75)
    assert samples[("splitserve:kv_cache_usage_perc", (("role", "prefill"),))] == pytest.approx(0.10)
    assert samples[("splitserve:num_workers_draining", ())] == 1
    assert samples[("splitserve:workload_arrival_rate", ())] == 1.5
    assert samples[("splitserve:workload_prompt_tokens", (("stat", "p90"),))] == 700
    assert samples[("splitserve:workload_output_tokens", (("stat", "mean"),))] == 120
    assert samples[("splitserve:placement_workers", (("placement", "recommended"), ("role", "colocated")))] == 2
    assert samples[("splitserve:placement_workers", (("placement", "running"), ("role", "decode")))] == 1
    assert samples[("splitserve:placement_goodput", (("placement", "recommended"),))] == 1.6
    assert samples[("splitserve:placement_change_recommended", ())] == 1
    decode_steps = (("batch", "3-4"), ("kind", "decode"), ("role", "decode"), ("worker", "decode-0"))
    assert samples[("splitserve:engine_step_seconds_count", decode_steps)] == 3
    assert samples[("splitserve:engine_step_seconds_sum", decode_steps)] == pytest.approx(0.092)
    for le, count in (("0.01", 0), ("0.0125", 1), ("0.04", 3)):
        assert samples[("splitserve:engine_step_seconds_bucket", tuple(sorted((*decode_steps, ("le", le)))))] == count
    assert samples[("splitserve:engine_step_cpu_seconds_total", decode_steps)] == pytest.approx(0.08)
    assert samples[("splitserve:engine_step_tokens_total", decode_steps)] == 10


@pytest.mark.timeout(40)
def test_sigterm_drains_aborts_in_flight_requests_and_exits_cleanly(gateway):
    http_port, log = free_port(), gateway.logs / "second.log"
    process = start_gateway(gateway.redis_url, gateway.scheduler_port, http_port, free_port(), log)
    second = Gateway(gateway.fake, http_port, 0, gateway.tokenizer, gateway.output_ids)
    try:
        wait_started(second, process, log)
        wait_until(lambda: second.status("/ready") == 200, 10, "readiness")
        body = {"model": MODEL, "prompt": "hold", "seed": HOLD_SEED, "stream": True}
        connection, response = open_request(http_port, "POST", "/v1/completions", body)
        with contextlib.closing(connection):
            lines = iter(response.readline, b"")
            first = next(line for line in lines if line.startswith(b"data: "))
            request_id = json.loads(first.removeprefix(b"data: "))["id"]
            started = time.monotonic()
            process.terminate()
            wait_until(lambda: second.status("/ready") == 503, 5, "draining")
            assert second.post("/v1/completions", {"model": MODEL, "prompt": "x"}).status_code == 503
            rest = [line.strip() for line in lines if line.startswith(b"data: ")]
            assert json.loads(rest[-2].removeprefix(b"data: "))["choices"][0]["finish_reason"] == "abort"
            assert rest[-1] == b"data: [DONE]"
        assert process.wait(15) == 0
        assert time.monotonic() - started < SHUTDOWN_GRACE_S + 5
        wait_until(lambda: request_id in gateway.fake.cancels, 5, "cancel of the aborted request")
    finally:
        second.channel.close()
        if process.poll() is None:
            process.kill()
        print(log.read_text()[-3000:])  # shown when the test failed
