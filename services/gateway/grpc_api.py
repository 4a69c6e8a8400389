"""The gRPC edge: Gateway.Generate, a twin of the HTTP API over the same Frontend."""

from __future__ import annotations

import dataclasses
import hmac
from collections.abc import AsyncIterator

import grpc

from splitserve.common.tracing import grpc_traceparent
from splitserve.v1 import gateway_pb2 as gpb
from splitserve.v1 import gateway_pb2_grpc

from .errors import ApiError, ErrorKind, GenerationError, invalid
from .frontend import Frontend
from .limits import client_request_id
from .schema import (
    FINISH_TO_PROTO,
    Api,
    ChatMessage,
    ChatPrompt,
    GenerationRequest,
    Output,
    PositionLogprobs,
    Prompt,
    SamplingOptions,
    TextPrompt,
    TokenPrompt,
    cache_salt_option,
    grammar_option,
    top_k_option,
)


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, frontend: Frontend, api_key: str | None) -> None:
        self.frontend, self.api_key = frontend, api_key

    async def Generate(self, request: gpb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[gpb.GenerateResponse]:
        try:
            self._authorize(context)
            parsed = dataclasses.replace(request_from_proto(request), traceparent=grpc_traceparent(context))
            self.frontend.check_response_size(parsed, streamed=True)
            async with self.frontend.generate_n(parsed) as generations:
                # The client's own id, when it gave one, is what it hears back; ours stays inside.
                name = parsed.client_request_id or generations.request_id
                async for index, output in generations:
                    yield response_from_output(name, output, index)
        except ApiError as exc:
            await context.abort(exc.kind.grpc_code, exc.message)
        except GenerationError as exc:
            await context.abort(exc.kind.grpc_code, f"generation failed: {exc}")

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if self.api_key is None:
            return
        given = dict(context.invocation_metadata() or ()).get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError(ErrorKind.UNAUTHENTICATED, "incorrect or missing API key; send metadata "
                           "'authorization: Bearer <key>'")


def request_from_proto(msg: gpb.GenerateRequest) -> GenerationRequest:
    """GenerateRequest -> GenerationRequest; unset optional fields take the OpenAI / vLLM defaults."""
    sampling = SamplingOptions(
        temperature=msg.temperature if msg.HasField("temperature") else 1.0,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        top_k=top_k_option(msg.top_k) if msg.HasField("top_k") else None,
        seed=msg.seed if msg.HasField("seed") else None,
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else None,
        min_tokens=msg.min_tokens if msg.HasField("min_tokens") else 0,
        ignore_eos=msg.ignore_eos,
        stop=tuple(msg.stop),
        stop_token_ids=tuple(msg.stop_token_ids),
        presence_penalty=msg.presence_penalty if msg.HasField("presence_penalty") else 0.0,
        frequency_penalty=msg.frequency_penalty if msg.HasField("frequency_penalty") else 0.0,
        repetition_penalty=msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0,
        min_p=msg.min_p if msg.HasField("min_p") else 0.0,
        logit_bias=tuple((b.token_id, b.bias) for b in msg.logit_bias),
        logprobs=msg.logprobs,
        top_logprobs=msg.top_logprobs,
        prompt_logprobs=msg.prompt_logprobs if msg.HasField("prompt_logprobs") else None,
        grammar=(grammar_option("grammar", msg.grammar.json_schema or None, msg.grammar.regex or None)
                 if msg.HasField("grammar") else None),
    )
    return GenerationRequest(Api.GRPC, prompt_from_proto(msg), sampling, msg.model or None,
                             client_request_id(msg.request_id), cache_salt_option(msg.cache_salt or None),
                             n=msg.n if msg.HasField("n") else 1)



def prompt_from_proto(msg: gpb.GenerateRequest) -> Prompt:
    given = [p for p in (msg.prompt, msg.messages, msg.prompt_token_ids) if p]
    if len(given) != 1:
        raise invalid("give exactly one of prompt, messages or prompt_token_ids", "prompt")
    if msg.prompt:
        return TextPrompt(msg.prompt)
    if msg.messages:
        return ChatPrompt(tuple(ChatMessage(m.role, m.content) for m in msg.messages))
    return TokenPrompt(tuple(msg.prompt_token_ids))


def response_from_output(request_id: str, output: Output, index: int = 0) -> gpb.GenerateResponse:
    response = gpb.GenerateResponse(request_id=request_id, text=output.text, token_ids=output.token_ids,
                                    index=index)
    if output.finish is not None:
        response.finish_reason = FINISH_TO_PROTO[output.finish]
    if output.usage is not None:
        usage = output.usage
        response.usage.CopyFrom(gpb.Usage(prompt_tokens=usage.prompt_tokens,
                                          completion_tokens=usage.completion_tokens,
                                          total_tokens=usage.total_tokens,
                                          cached_prompt_tokens=usage.cached_tokens))
    if output.timeline is not None:
        response.timeline.CopyFrom(output.timeline)
    for position in output.logprobs:
        _add_logprobs(response.logprobs, position)
    for position in output.prompt.positions[1:] if output.prompt is not None else ():
        _add_logprobs(response.prompt_logprobs, position)
    return response


def _add_logprobs(field, position: PositionLogprobs) -> None:
    top = position.top
    field.add(logprob=position.chosen.logprob, top_token_ids=[t.token_id for t in top],
              top_logprobs=[t.logprob for t in top], rank=position.chosen.rank)
