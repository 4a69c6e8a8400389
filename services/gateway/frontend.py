"""The gateway core both edges share: admission, tokenization, the request stream, reply routing,
output processing, cancellation, and the per-request metrics and log line."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Self

import structlog
from redis.exceptions import RedisError

from splitserve.common.detokenize import PROMPT_CONTEXT_TOKENS
from splitserve.common.service import Background
from splitserve.common.tracing import NO_TRACER, Tracer
from splitserve.engine.structured import Grammar
from splitserve.queue.streams import CancelWriter, RequestStream
from splitserve.v1 import common_pb2 as pb

from .cluster import ClusterView
from .config import GatewayConfig
from .errors import ApiError, ErrorKind, GenerationError, invalid
from .limits import MAX_RESPONSE_LOGPROBS, preview
from .metrics import GatewayMetrics
from .model import ServedModel
from .openai_api import TokenizeRequest
from .output import OutputProcessor, PromptWanted
from .router import GatewayAbort, Reply, ReplyRouter
from .sampling import resolve_max_tokens, sampling_proto
from .schema import Finish, GenerationRequest, Output, Prompt, TextPrompt, TokenPrompt, Usage
from .stats import RequestStats
from .trace import RequestTrace

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Services:
    """What the frontend talks to, built once at start (server.py)."""

    model: ServedModel
    cluster: ClusterView
    router: ReplyRouter
    requests: RequestStream[pb.QueuedRequest]
    cancels: CancelWriter
    metrics: GatewayMetrics
    tracer: Tracer = NO_TRACER


class Frontend:
    """Turns GenerationRequests into streams of Outputs, a stream per sample:
    `async with frontend.generate_n(request) as generations: async for index, output in generations: ...`"""

    def __init__(self, config: GatewayConfig, services: Services) -> None:
        self.config, self.services = config, services
        self.model = services.model
        self.num_pending = 0
        self.draining = False  # shutting down: refuse new requests
        self._idle = asyncio.Event()  # set while nothing is in flight
        self._idle.set()
        # Tokenizers release the GIL: a prompt tokenized here leaves the event loop free. Two threads,
        # so one huge prompt does not hold up every other request's tokenization.
        self._tokenize_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")
        self.background = Background()  # cancels of requests whose queueing failed part way

    @property
    def ready(self) -> bool:
        """Workers registered, Redis reachable (no request can be queued without it), not shutting down."""
        return self.services.cluster.snapshot.ready and self.services.router.connected and not self.draining

    @property
    def max_model_len(self) -> int:
        """The workers' context limit, or the model config's until workers register."""
        return self.services.cluster.snapshot.max_model_len or self.model.config_max_model_len

    def generate_n(self, request: GenerationRequest) -> Generations:
        """request.n samples: `async with ...: async for index, output in generations: ...`"""
        return Generations(self, request)

    def check_model(self, model: str | None) -> None:
        if model not in (None, "", self.model.name):
            raise invalid(f"The model `{preview(model)}` does not exist.", "model", "model_not_found")

    def check_response_size(self, request: GenerationRequest, streamed: bool) -> None:
        """Responses are built, and serialized, on the event loop: refuse one whose log probabilities
        could exceed MAX_RESPONSE_LOGPROBS records (n=128 at top_logprobs 20 over a full context would
        be ~2 GB and minutes of every other stream's time). Each scored prompt's records (echo with
        logprobs, prompt_logprobs) come in one piece, streamed too; the output's count only unstreamed
        (each chunk carries its own tokens'). Counted at most: a prompt's tokens before tokenizing."""
        sampling, context = request.sampling, self.max_model_len
        per_prompt_token = 0 if request.scored_prompt is None else 1 + request.scored_prompt
        per_output_token = 0 if streamed or not sampling.logprobs else request.n * (1 + sampling.top_logprobs)
        max_tokens = min(sampling.max_tokens or request.api.default_max_tokens or context, context)
        records = sum(_most_records(min(_most_tokens(prompt), context), per_prompt_token, max_tokens,
                                    per_output_token, context) for prompt in request.prompts)
        if records > MAX_RESPONSE_LOGPROBS:
            raise invalid(f"this request's log probabilities could number {records} ({request.num_choices} "
                          f"choices of up to {max_tokens} tokens); a response holds at most "
                          f"{MAX_RESPONSE_LOGPROBS}: ask for fewer{'' if streamed else ', or stream it'}",
                          "logprobs")

    def check_admission(self, request: GenerationRequest, slots: int = 1) -> None:
        """The cheap refusals, before any work is spent on the request (which takes `slots` of
        --max-pending: one per sample); ApiError when refused."""
        self.check_model(request.model)
        if slots > self.config.max_pending:
            raise invalid(f"{slots} choices (n per prompt) are more than this gateway serves at once "
                          f"({self.config.max_pending})", "n")
        if self.draining:
            raise ApiError(ErrorKind.UNAVAILABLE, "the gateway is shutting down")
        if self.num_pending + slots > self.config.max_pending:
            raise ApiError(ErrorKind.OVERLOADED, f"this gateway is serving its maximum of "
                           f"{self.config.max_pending} requests; retry later", code="rate_limit_exceeded")
        if not self.services.cluster.snapshot.ready:
            raise ApiError(ErrorKind.UNAVAILABLE, "no prefill and decode workers are registered yet")

    async def admit(self, request: GenerationRequest, request_id: str) -> pb.QueuedRequest:
        """Checks and tokenizes request into its stream entry; ApiError when refused.

        The prompt's size is checked before tokenizing, and tokenizing (chat template included) runs
        on a thread, so a huge prompt neither costs more than its bound nor stalls other streams; a
        short one (ServedModel.encodes_quickly) is tokenized at once, so without a grammar (whose
        check also runs on the threads) it never waits behind huge ones for them."""
        max_model_len = self.max_model_len
        self.model.check_prompt_size(request.prompt, max_model_len)
        self.model.check_token_ids(request.sampling.stop_token_ids, "stop_token_ids")
        self.model.check_token_ids(tuple(t for t, _ in request.sampling.logit_bias), "logit_bias")
        loop = asyncio.get_running_loop()
        if request.sampling.grammar is not None:  # checked before queueing, off the event loop
            await loop.run_in_executor(self._tokenize_pool, _check_grammar, request.sampling.grammar)
        if self.model.encodes_quickly(request.prompt):
            prompt_ids = self.model.encode(request.prompt)
        else:
            prompt_ids = await loop.run_in_executor(self._tokenize_pool, self.model.encode, request.prompt)
        if not prompt_ids:
            raise invalid("the prompt is empty after tokenization", "prompt")
        max_tokens = resolve_max_tokens(request, len(prompt_ids), max_model_len)
        sampling = sampling_proto(request.sampling, max_tokens, secrets.randbits(63), request.scored_prompt)
        return pb.QueuedRequest(request_id=request_id, prompt_token_ids=prompt_ids, sampling=sampling,
                                reply_stream=self.services.router.stream, cache_salt=request.cache_salt or "")

    async def tokenize(self, request: TokenizeRequest) -> list[int]:
        """vLLM's /tokenize: the prompt's token ids, checked by size first and tokenized on a thread."""
        self.check_model(request.model)
        self.model.check_prompt_size(request.prompt, self.max_model_len)
        return await asyncio.get_running_loop().run_in_executor(
            self._tokenize_pool, self.model.encode, request.prompt, request.add_special_tokens)

    async def detokenize(self, model: str | None, token_ids: tuple[int, ...]) -> str:
        """vLLM's /detokenize: the text of at most max_model_len token ids, decoded on a thread."""
        self.check_model(model)
        if len(token_ids) > self.max_model_len:
            raise invalid(f"at most {self.max_model_len} tokens (the context) can be detokenized, "
                          f"got {len(token_ids)}", "tokens")
        self.model.check_token_ids(token_ids, "tokens")
        return await asyncio.get_running_loop().run_in_executor(
            self._tokenize_pool, self.model.tokenizer.decode, list(token_ids))

    def acquire(self) -> None:
        self.num_pending += 1
        self._idle.clear()
        self.services.metrics.num_pending.set(self.num_pending)

    def release(self) -> None:
        self.num_pending -= 1
        if self.num_pending == 0:
            self._idle.set()
        self.services.metrics.num_pending.set(self.num_pending)

    async def drain(self, grace_s: float) -> None:
        """Refuse new requests, give those in flight grace_s to finish, then end the rest with
        finish_reason "abort" (their cancels are published as they exit)."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
        except TimeoutError:
            log.info("aborting requests still in flight", num_pending=self.num_pending)
            self.services.router.abort_all("the gateway is shutting down")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace_s)

    async def cancel(self, request_id: str) -> None:
        """Tell the scheduler to drop the request and free what it holds on the workers."""
        try:
            await self.services.cancels.cancel(request_id)
        except RedisError as exc:
            log.warning("cancel not published", error=str(exc))


def _most_records(prompt_tokens: int, per_prompt_token: int, output_tokens: int, per_output_token: int,
                  context: int) -> int:
    """The most records a prompt of at most prompt_tokens and its output of at most output_tokens can
    have, the two within the context: the context goes to the dearer side first."""
    if per_prompt_token >= per_output_token:
        prompt = min(prompt_tokens, context)
        return per_prompt_token * prompt + per_output_token * min(output_tokens, context - prompt)
    output = min(output_tokens, context)
    return per_output_token * output + per_prompt_token * min(prompt_tokens, context - output)


def _most_tokens(prompt: Prompt) -> int:
    """The most tokens prompt can tokenize to: a byte-level token covers at least one UTF-8 byte (a
    few more for the special tokens a tokenizer adds); a chat's template adds any number."""
    match prompt:
        case TokenPrompt(token_ids):
            return len(token_ids)
        case TextPrompt(text):
            return len(text.encode("utf-8", "surrogatepass")) + 8
    return 2**31


def _prompt_wanted(request: GenerationRequest, queued: pb.QueuedRequest) -> PromptWanted | None:
    """What the client gets of its prompt back: the echo's text (its own text, or its token ids'),
    the prompt's token ids, and how many top logprobs per position."""
    if not request.echo and request.scored_prompt is None:
        return None
    echo = None
    if request.echo:
        echo = request.prompt.text if isinstance(request.prompt, TextPrompt) else None
    return PromptWanted(tuple(queued.prompt_token_ids), request.scored_prompt, echo, request.echo)


def _check_grammar(grammar: Grammar) -> None:
    """ApiError unless llguidance accepts the grammar (workers check it again)."""
    try:
        grammar.llguidance()
    except ValueError as exc:
        raise invalid(f"structured output: {exc}", "response_format") from None


def _why(exc: BaseException) -> str:
    return getattr(exc, "message", None) or str(exc) or type(exc).__name__


def new_request_id(request: GenerationRequest) -> str:
    """Always the gateway's own id: a client cannot name (and so cancel) another client's request."""
    return f"{request.api.value}-{uuid.uuid4().hex}"


class Generation:
    """One request in flight, from admission to its last output.

    request_id, queued and trace: a sample of n (Generations), whose sibling tokenized the prompt
    already, under the request's trace.
    """

    def __init__(self, frontend: Frontend, request: GenerationRequest, request_id: str | None = None,
                 queued: pb.QueuedRequest | None = None, trace: RequestTrace | None = None) -> None:
        self.frontend, self.request = frontend, request
        self.request_id = request_id or new_request_id(request)
        self.stats = RequestStats(arrival=time.time())
        self.trace = trace  # set at admission
        self._failed: str | None = None  # why the cluster's answer failed it
        self._queued = queued

    async def __aenter__(self) -> Self:
        frontend = self.frontend
        frontend.check_admission(self.request)
        frontend.acquire()  # before the first await: max_pending bounds requests being tokenized too
        self.trace = self.trace or RequestTrace.start(frontend.services.tracer, self.request, self.request_id,
                                                      self.stats.arrival)
        structlog.contextvars.bind_contextvars(request_id=self.request_id)
        if self.request.client_request_id:
            structlog.contextvars.bind_contextvars(client_request_id=self.request.client_request_id)
        try:
            queued = self._queued or await frontend.admit(self.request, self.request_id)
            self.queued = queued
            if frontend.draining:  # it began while this request was tokenized: abort_all may be done
                raise ApiError(ErrorKind.UNAVAILABLE, "the gateway is shutting down")
            self.processor = OutputProcessor(
                frontend.model.tokenizer, self.request.sampling.stop, len(queued.prompt_token_ids),
                min_tokens=self.request.sampling.min_tokens, logprobs=self.request.sampling.logprobs,
                top_logprobs=self.request.sampling.top_logprobs, prompt=_prompt_wanted(self.request, queued),
                prompt_tail=tuple(queued.prompt_token_ids[-PROMPT_CONTEXT_TOKENS:]),
                include_stop_str=self.request.sampling.include_stop_str_in_output,
                skip_special_tokens=self.request.sampling.skip_special_tokens,
                stop_token_ids=self.request.sampling.stop_token_ids,
                eos_token_ids=frontend.model.eos_token_ids)
            self._queue = frontend.services.router.register(self.request_id)
            await self._enqueue(queued)
        except BaseException as exc:
            self._release()
            self.trace.finished(self.request_id, None, None, None, Usage(0, 0), _why(exc))
            raise
        return self

    async def _enqueue(self, queued: pb.QueuedRequest) -> None:
        queued.timeline.arrival = self.stats.arrival
        queued.timeline.queued = time.time()
        queued.trace_context = self.trace.traceparent
        self.trace.queued(self.request_id, queued.timeline, len(queued.prompt_token_ids))
        try:
            await self.frontend.services.requests.put(queued)
        except BaseException as exc:
            # The XADD may have reached Redis before its connection failed, or the client left while
            # it was under way: cancel it, so that a request its client was told was not queued (or
            # that has no client) never runs. A cancel read before its request is kept for it.
            self.frontend.background.spawn(self.frontend.cancel(self.request_id))
            if not isinstance(exc, RedisError):
                raise
            # Not retried (RequestStream.put): the client hears at once and may retry.
            raise ApiError(ErrorKind.UNAVAILABLE, f"Redis unavailable, the request was not queued; "
                           f"retry later ({exc})") from None

    async def __aiter__(self) -> AsyncIterator[Output]:
        idle_s = self.frontend.config.request_idle_timeout_s
        while self.processor.finish is None:
            try:
                # asyncio.timeout, not wait_for: wait_for wraps every get in a task of its own.
                async with asyncio.timeout(idle_s):
                    reply = await self._queue.get()
            except TimeoutError:
                # A lost reply (the last one included) must not hold the client, and a max-pending
                # slot, forever; the exit cancels the request upstream.
                log.warning("no reply from the cluster within the idle timeout", idle_timeout_s=idle_s)
                error = GenerationError(f"the cluster sent nothing for {idle_s:g} s; the request was cancelled",
                                        ErrorKind.TIMEOUT)
                self._failed = str(error)
                raise error from None
            output = self._process(reply)
            if output is not None:
                self.stats.on_output(output, self.frontend.services.metrics)
                yield output

    def _process(self, reply: Reply) -> Output | None:
        if isinstance(reply, GatewayAbort):
            log.info("request aborted by the gateway", reason=reply.reason)
            return self.processor.abort()
        try:
            return self.processor.process(reply)
        except GenerationError as exc:
            self._failed = str(exc) or "generation failed"
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._release()
        # A client that went away counts as an abort, as in vLLM.
        finish = None if self._failed else self.processor.finish or Finish.ABORT
        usage = self.processor.usage
        self.stats.record(self.request_id, finish, usage, self.frontend.services.metrics)
        self.trace.finished(self.request_id, self.queued.timeline.queued, self.stats.timeline, finish, usage,
                            self._failed)
        if not self.processor.upstream_finished:  # client gone, stop string, shutdown, or an error here
            await asyncio.shield(self.frontend.cancel(self.request_id))

    def _release(self) -> None:
        self.frontend.services.router.unregister(self.request_id)
        self.frontend.release()
        structlog.contextvars.unbind_contextvars("request_id", "client_request_id")


class Generations:
    """OpenAI's n: n samples of each prompt (a batch of prompts: n each, choice p * n + i), a child
    request each (ids "<id>-<choice>"; one choice is the request itself), queued together. Each
    prompt is tokenized once, and computed once: a sibling's prefill waits for the blocks the first
    one computes (the engine scheduler). Sample i draws with seed + i (vLLM's rule), so a seeded
    request repeats. A failed sample fails the request, and leaving cancels every sample still
    running."""

    def __init__(self, frontend: Frontend, request: GenerationRequest) -> None:
        self.frontend, self.request, self.n = frontend, request, request.num_choices
        self.request_id = new_request_id(request)
        self.children: list[Generation] = []
        self.trace: RequestTrace | None = None  # n > 1: the samples' request span

    async def __aenter__(self) -> Self:
        self.frontend.check_admission(self.request, self.n)
        if self.n == 1:
            self.children.append(await Generation(self.frontend, self.request, self.request_id).__aenter__())
            return self
        for prompt in self.request.batch:  # before any prompt is queued: the first is checked as it is
            self.frontend.model.check_prompt_size(prompt, self.frontend.max_model_len)
            if isinstance(prompt, TokenPrompt):
                self.frontend.model.check_token_ids(prompt.token_ids, "prompt")
        self.trace = RequestTrace.start(self.frontend.services.tracer, self.request, self.request_id, time.time())
        try:
            for prompt in self.request.prompts:
                await self._enter_samples(dataclasses.replace(self.request, prompt=prompt, batch=()))
        except BaseException as exc:
            await self.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def _enter_samples(self, request: GenerationRequest) -> None:
        """The n samples of one prompt, the first one tokenizing it."""
        first = await Generation(self.frontend, request, f"{self.request_id}-{len(self.children)}",
                                 trace=self.trace.sample()).__aenter__()
        self.children.append(first)
        for i in range(1, request.n):
            rid = f"{self.request_id}-{len(self.children)}"
            queued = pb.QueuedRequest()
            queued.CopyFrom(first.queued)
            queued.request_id = rid
            queued.sampling.seed = (first.queued.sampling.seed + i) % 2**64
            self.children.append(await Generation(self.frontend, request, rid, queued,
                                                  self.trace.sample()).__aenter__())

    async def __aiter__(self) -> AsyncIterator[tuple[int, Output]]:
        if self.n == 1:
            async for output in self.children[0]:
                yield 0, output
            return
        merged: asyncio.Queue[tuple[int, Output | None, BaseException | None]] = asyncio.Queue()

        async def pump(index: int, child: Generation) -> None:
            structlog.contextvars.bind_contextvars(request_id=child.request_id)  # this task's own context
            try:
                async for output in child:
                    await merged.put((index, output, None))
                await merged.put((index, None, None))
            except Exception as exc:  # handed to the client's task, which ends the request
                await merged.put((index, None, exc))

        pumps = [asyncio.create_task(pump(i, child)) for i, child in enumerate(self.children)]
        try:
            for _ in range(self.n):
                while True:
                    index, output, exc = await merged.get()
                    if exc is not None:
                        raise exc
                    if output is None:
                        break
                    yield index, output
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            for child in self.children:
                await child.__aexit__(*exc_info)
        finally:
            if self.trace is not None:
                self.trace.end(None if exc_info[1] is None else _why(exc_info[1]))
