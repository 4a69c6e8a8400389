"""The OpenAI-compatible HTTP edge (aiohttp): routes, API key, error bodies, SSE streaming."""

from __future__ import annotations

import dataclasses
import hmac
import time
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from splitserve.common.tracing import TRACEPARENT
from splitserve.v1 import scheduler_pb2 as spb

from .errors import ApiError, ErrorKind, GenerationError
from .frontend import Frontend, Generations
from .limits import client_request_id
from .metrics import GatewayMetrics
from .openai_api import (
    OpenAIRequest,
    parse_chat,
    parse_completion,
    parse_detokenize,
    parse_json,
    parse_tokenize,
)
from .openai_render import DONE, Choice, Renderer, renderer_for, sse
from .schema import Usage

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_KEYED_PATHS = frozenset({"/reset_prefix_cache", "/tokenize", "/detokenize"})
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Connection": "keep-alive"}


def build_app(frontend: Frontend, metrics: GatewayMetrics, api_key: str | None,
              max_body_bytes: int) -> web.Application:
    """Bodies past max_body_bytes get 413 before they are parsed."""
    app = web.Application(middlewares=[error_middleware, auth_middleware(api_key)],
                          client_max_size=max_body_bytes)
    routes = HttpRoutes(frontend, metrics)
    app.router.add_post("/v1/completions", routes.completions)
    app.router.add_post("/v1/chat/completions", routes.chat_completions)
    app.router.add_get("/v1/models", routes.models)
    app.router.add_get("/health", routes.health)
    app.router.add_get("/ready", routes.ready)
    app.router.add_get("/metrics", routes.metrics)
    app.router.add_post("/reset_prefix_cache", routes.reset_prefix_cache)
    app.router.add_post("/tokenize", routes.tokenize)
    app.router.add_post("/detokenize", routes.detokenize)
    return app


def error_response(error: ApiError) -> web.Response:
    return web.json_response(error.body, status=error.kind.http_status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure as an OpenAI error body; never a traceback."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc)
    except web.HTTPException as exc:  # aiohttp's own: unknown route, wrong method, body too large
        if exc.status < 400:
            raise
        return error_response(ApiError(ErrorKind.from_http_status(exc.status), exc.reason))
    except Exception:
        log.exception("unhandled error", path=request.path)
        return error_response(ApiError(ErrorKind.INTERNAL, "internal server error"))


def auth_middleware(api_key: str | None):
    """Bearer-token check on /v1/*, /reset_prefix_cache, /tokenize and /detokenize; /health, /ready and
    /metrics stay open."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if api_key is not None and (request.path.startswith("/v1/") or request.path in _KEYED_PATHS):
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise ApiError(ErrorKind.UNAUTHENTICATED, "Incorrect or missing API key; send "
                               "'Authorization: Bearer <key>'.", code="invalid_api_key")
        return await handler(request)

    return middleware


class HttpRoutes:
    def __init__(self, frontend: Frontend, metrics: GatewayMetrics) -> None:
        self.frontend, self._metrics = frontend, metrics
        self.created = int(time.time())

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_completion(parse_json(await request.read())))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_chat(parse_json(await request.read())))

    async def _generate(self, request: web.Request, parsed: OpenAIRequest) -> web.StreamResponse:
        client_id = client_request_id(request.headers.get("X-Request-Id", ""))
        generation_request = dataclasses.replace(parsed.generation, client_request_id=client_id,
                                                 traceparent=request.headers.get(TRACEPARENT))
        self.frontend.check_response_size(generation_request, parsed.stream)
        async with self.frontend.generate_n(generation_request) as generations:
            renderer = renderer_for(parsed.generation, generations.request_id, self.frontend.model.name,
                                    parsed.include_usage)
            headers = {"X-Request-Id": client_id or generations.request_id}
            if parsed.stream:
                return await stream_sse(request, generations, renderer, headers)
            return web.json_response(await collect(generations, renderer), headers=headers)

    async def models(self, request: web.Request) -> web.Response:
        model = self.frontend.model
        card = {"id": model.name, "object": "model", "created": self.created, "owned_by": "splitserve",
                "root": model.root, "parent": None, "max_model_len": self.frontend.max_model_len}
        return web.json_response({"object": "list", "data": [card]})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        snapshot, ready = self.frontend.services.cluster.snapshot, self.frontend.ready
        body = {"ready": ready, "draining": self.frontend.draining,
                "scheduler_reachable": snapshot.state is not None,
                "prefill_workers": snapshot.num_workers(spb.WORKER_ROLE_PREFILL),
                "decode_workers": snapshot.num_workers(spb.WORKER_ROLE_DECODE),
                "colocated_workers": snapshot.num_workers(spb.WORKER_ROLE_COLOCATED)}
        return web.json_response(body, status=200 if ready else 503)

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        """vLLM's endpoint (benchmark clients call it between runs): every worker forgets its cached
        prefixes; requests running keep their blocks."""
        answer = await self.frontend.services.cluster.reset_prefix_caches()
        if answer is None:
            raise ApiError(ErrorKind.UNAVAILABLE, "no scheduler leads: the prefix caches were not reset")
        return web.json_response({"num_workers": answer.num_workers, "num_blocks": answer.num_blocks,
                                  "num_failed": answer.num_failed})

    async def tokenize(self, request: web.Request) -> web.Response:
        parsed = parse_tokenize(parse_json(await request.read()))
        ids = await self.frontend.tokenize(parsed)
        strs = self.frontend.model.tokenizer.convert_ids_to_tokens(ids) if parsed.return_token_strs else None
        return web.json_response({"count": len(ids), "max_model_len": self.frontend.max_model_len,
                                  "tokens": ids, "token_strs": strs})

    async def detokenize(self, request: web.Request) -> web.Response:
        model, token_ids = parse_detokenize(parse_json(await request.read()))
        return web.json_response({"prompt": await self.frontend.detokenize(model, token_ids)})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self._metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def collect(generations: Generations, renderer: Renderer) -> dict:
    """The whole response at once; a failure in the cluster is a 500 error body."""
    choices = [Choice() for _ in range(generations.n)]
    try:
        async for index, output in generations:
            choices[index].add(output)
    except GenerationError as exc:
        raise ApiError(exc.kind, f"generation failed: {exc}") from None
    return renderer.body(choices, total_usage([c.final.usage for c in choices], generations.request.n))


def total_usage(usages: list[Usage], n: int) -> Usage:
    """A request's usage over its choices (n per prompt, in order): each prompt (and its cached part)
    once, every sample's output."""
    prompts = usages[::n]
    return Usage(sum(u.prompt_tokens for u in prompts), sum(u.completion_tokens for u in usages),
                 sum(u.cached_tokens for u in prompts))


async def stream_sse(request: web.Request, generations: Generations, renderer: Renderer,
                     headers: dict[str, str]) -> web.StreamResponse:
    """Server-sent events in OpenAI's chunk format; a failure mid-stream is an error event, and
    every stream ends with [DONE]. A client that goes away cancels the request (Generation's exit)."""
    response = web.StreamResponse(headers=SSE_HEADERS | headers)
    await response.prepare(request)
    try:
        await write_outputs(response, generations, renderer)
        await response.write(DONE)
    except ConnectionResetError:
        log.info("client disconnected mid-stream")
    return response


async def write_outputs(response: web.StreamResponse, generations: Generations, renderer: Renderer) -> None:
    for chunk in renderer.opening_chunks(generations.n):
        await response.write(sse(chunk))
    usages: dict[int, Usage] = {}
    try:
        async for index, output in generations:
            chunk = renderer.chunk(output, index)
            if chunk is not None:
                await response.write(sse(chunk))
            if output.usage is not None:
                usages[index] = output.usage
                if len(usages) == generations.n and renderer.include_usage:
                    usage = total_usage([usages[i] for i in range(generations.n)], generations.request.n)
                    await response.write(sse(renderer.usage_chunk(usage)))
    except GenerationError as exc:
        await response.write(sse(ApiError(exc.kind, f"generation failed: {exc}").body))
