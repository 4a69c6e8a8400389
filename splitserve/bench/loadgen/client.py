"""Clients that send one request and fill in its RequestRecord as the stream arrives.

Only standard OpenAI fields plus vLLM's `min_tokens` and `ignore_eos` are sent, so any
OpenAI-compatible server can be measured. Every failure (an HTTP status other than 200, an error
chunk, a broken connection, a gRPC error) is recorded on the request, never raised.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import grpc

from splitserve.bench.loadgen.config import BackendConfig
from splitserve.bench.loadgen.records import RequestRecord
from splitserve.bench.loadgen.sse import DONE, SseDecoder, StreamChunk, error_message, parse_chunk
from splitserve.bench.loadgen.steps import Series, scrape_steps
from splitserve.common.auth import NO_AUTH
from splitserve.common.rpc import open_channel
from splitserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


@dataclass(frozen=True)
class RequestSpec:
    """What to send: a token-id prompt (completions, gRPC) or a text prompt (chat)."""

    index: int
    scheduled_s: float
    input_len: int
    output_len: int
    prompt: list[int] | str

    def new_record(self) -> RequestRecord:
        return RequestRecord(self.index, self.input_len, self.output_len, self.scheduled_s)


class Clock:
    """Seconds since the run started, on time.perf_counter()."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.t0


class Backend(Protocol):
    model: str

    async def send(self, spec: RequestSpec, record: RequestRecord, clock: Clock) -> None:
        """Send spec (stamping record.send_s first), record its stream; record a failure, never raise."""

    async def engine_steps(self) -> tuple[Series, tuple[int, float]] | None:
        """The server's engine step series and KV pulled so far (bench/loadgen/steps.py); None when it
        exports none."""


def sampling_fields(output_len: int) -> dict[str, Any]:
    """Exactly output_len tokens, greedy (min_tokens and ignore_eos are vLLM's extensions)."""
    return {"max_tokens": output_len, "min_tokens": output_len, "ignore_eos": True, "temperature": 0.0}


def http_base(url: str) -> str:
    """The server root: a trailing slash and /v1 are dropped, so both spellings work."""
    url = url.rstrip("/")
    return url.removesuffix("/v1")


class OpenAIBackend:
    """Streams /v1/completions (token-id prompts) or /v1/chat/completions (text prompts)."""

    def __init__(self, session: aiohttp.ClientSession, config: BackendConfig, model: str) -> None:
        self.session, self.model, self.chat = session, model, config.kind == "openai-chat"
        path = "/v1/chat/completions" if self.chat else "/v1/completions"
        self.base_url = http_base(config.url)
        self.url = self.base_url + path

    async def engine_steps(self) -> tuple[Series, tuple[int, float]] | None:
        """The server's engine step series and KV pulled (splitserve's /metrics); None for others."""
        return await scrape_steps(self.session, self.base_url)

    def body(self, spec: RequestSpec) -> dict[str, Any]:
        if self.chat:
            prompt = {"messages": [{"role": "user", "content": spec.prompt}]}
        else:
            prompt = {"prompt": spec.prompt}
        return {"model": self.model, **prompt, **sampling_fields(spec.output_len), "stream": True,
                "stream_options": {"include_usage": True}}

    async def send(self, spec: RequestSpec, record: RequestRecord, clock: Clock) -> None:
        record.send_s = clock.now()
        try:
            async with self.session.post(self.url, json=self.body(spec)) as response:
                if response.status != 200:
                    message = error_message(await response.text())
                    record.fail(f"HTTP {response.status}: {message}", clock.now())
                    return
                await read_sse(response.content.iter_any(), record, clock)
        except (aiohttp.ClientError, TimeoutError, ValueError, TypeError) as exc:
            record.fail(f"{type(exc).__name__}: {exc}", clock.now())


async def read_sse(pieces: AsyncIterator[bytes], record: RequestRecord, clock: Clock) -> None:
    """Record an SSE body: each content chunk's time, usage, finish reason; [DONE] ends it."""
    decoder = SseDecoder()
    async for piece in pieces:
        for payload in decoder.feed(piece):
            t = clock.now()
            if payload == DONE:
                finish(record, t)
                return
            apply_chunk(record, parse_chunk(payload), t)
            if record.error is not None:
                return
    record.fail("the stream ended before [DONE]", clock.now())


def apply_chunk(record: RequestRecord, chunk: StreamChunk, t: float) -> None:
    if chunk.error is not None:
        record.fail(chunk.error, t)
        return
    if chunk.has_content:
        record.add_chunk(t)
    record.finish_reason = chunk.finish_reason or record.finish_reason
    if chunk.has_usage:
        record.prompt_tokens, record.completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
        record.cached_tokens = chunk.cached_tokens


def finish(record: RequestRecord, t: float) -> None:
    record.end_s = t
    if not record.chunk_times_s:
        record.fail("the stream carried no output", t)


class GrpcBackend:
    """Streams our gateway's gRPC Generate (protos/splitserve/v1/gateway.proto) with token-id prompts."""

    def __init__(self, channel: grpc.aio.Channel, config: BackendConfig) -> None:
        self.stub = gateway_pb2_grpc.GatewayStub(channel)
        self.model, self.timeout_s = config.model or "", config.request_timeout_s
        self.metadata = (("authorization", f"Bearer {config.api_key}"),) if config.api_key else None

    async def send(self, spec: RequestSpec, record: RequestRecord, clock: Clock) -> None:
        request = gateway_pb2.GenerateRequest(model=self.model, prompt_token_ids=spec.prompt,
                                              **sampling_fields(spec.output_len))
        record.send_s = clock.now()
        try:
            async for response in self.stub.Generate(request, metadata=self.metadata, timeout=self.timeout_s):
                self._apply(record, response, clock.now())
        except grpc.aio.AioRpcError as exc:
            record.fail(f"{exc.code().name}: {exc.details()}", clock.now())
            return
        finish(record, clock.now())

    async def engine_steps(self) -> tuple[Series, tuple[int, float]] | None:
        return None  # /metrics is on the gateway's HTTP port, which a gRPC URL does not name

    @staticmethod
    def _apply(record: RequestRecord, response: gateway_pb2.GenerateResponse, t: float) -> None:
        if response.token_ids:
            record.add_chunk(t, len(response.token_ids))
            record.output_token_ids = [*(record.output_token_ids or []), *response.token_ids]
        if response.HasField("timeline") and response.timeline.kv_transfer_bytes:
            record.kv_transfer_bytes = response.timeline.kv_transfer_bytes
        if response.finish_reason:
            record.finish_reason = common_pb2.FinishReason.Name(response.finish_reason).removeprefix(
                "FINISH_REASON_").lower()
        if response.HasField("usage"):
            record.prompt_tokens = response.usage.prompt_tokens
            record.completion_tokens = response.usage.completion_tokens
            record.cached_tokens = response.usage.cached_prompt_tokens


async def served_model(session: aiohttp.ClientSession, url: str) -> str:
    """The first model id of GET /v1/models; ValueError when the server does not say."""
    try:
        async with session.get(http_base(url) + "/v1/models") as response:
            body = await response.json(content_type=None)
            if response.status != 200:
                raise ValueError(f"GET /v1/models: HTTP {response.status}: {error_message(body)}")
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ValueError(f"cannot reach {url}: {type(exc).__name__}: {exc}") from None
    models = body.get("data") if isinstance(body, dict) else None
    if not models:
        raise ValueError(f"GET /v1/models at {url} lists no model; pass --model")
    return models[0]["id"]


@asynccontextmanager
async def open_backend(config: BackendConfig) -> AsyncIterator[Backend]:
    """One backend for the whole run: an aiohttp session with no connection limit, or a gRPC channel."""
    if config.kind == "grpc":
        async with open_channel(config.url.removeprefix("grpc://"), NO_AUTH, "gateway") as channel:  # the client edge
            yield GrpcBackend(channel, config)
        return
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else None
    timeout = aiohttp.ClientTimeout(total=config.request_timeout_s)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout,
                                     headers=headers) as session:
        model = config.model or await served_model(session, config.url)
        yield OpenAIBackend(session, config, model)


async def send_when_due(backend: Backend, spec: RequestSpec, clock: Clock,
                        limit: asyncio.Semaphore | None) -> RequestRecord:
    """Send at the spec's arrival time (later if --max-concurrency requests are already in flight)."""
    record = spec.new_record()
    await asyncio.sleep(max(0.0, spec.scheduled_s - clock.now()))
    if limit is None:
        await backend.send(spec, record, clock)
        return record
    async with limit:
        await backend.send(spec, record, clock)
    return record
