"""Outputs -> OpenAI response bodies and server-sent-event chunks, in OpenAI's exact shapes."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from .schema import Api, Output, PositionLogprobs, TokenLogprob, Usage

DONE = b"data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def usage_json(usage: Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


@dataclass(frozen=True)
class Renderer:
    """Renders one request's response; subclasses fill in the endpoint's choice shape."""

    request_id: str
    model: str
    include_usage: bool = False  # stream_options.include_usage
    logprobs: bool = False  # the request asked for them: each choice carries its tokens'
    created: int = field(default_factory=lambda: int(time.time()))

    chunk_object = ""
    body_object = ""

    def opening_chunks(self) -> list[dict[str, Any]]:
        return []

    def chunk(self, output: Output) -> dict[str, Any] | None:
        """The SSE chunk for output; None when it carries nothing for the client."""
        if not output.text and output.finish is None and not (self.logprobs and output.logprobs):
            return None
        choice = self._chunk_choice(output.text, output.finish and output.finish.value)
        return self._chunk({**choice, "logprobs": self._logprobs(output.logprobs)})

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        """OpenAI's last chunk under include_usage: no choices, the whole request's usage."""
        return {**self._envelope(self.chunk_object, []), "usage": usage_json(usage)}

    def body(self, text: str, final: Output, logprobs: tuple[PositionLogprobs, ...] = ()) -> dict[str, Any]:
        """The non-streaming response; logprobs are the whole output's."""
        choice = self._body_choice(text, final.finish.value if final.finish else None)
        choice = {**choice, "logprobs": self._logprobs(logprobs)}
        return {**self._envelope(self.body_object, [choice]), "usage": usage_json(final.usage)}

    def _logprobs(self, positions: tuple[PositionLogprobs, ...]) -> dict[str, Any] | None:
        return self._logprobs_json(positions) if self.logprobs else None

    def _logprobs_json(self, positions: tuple[PositionLogprobs, ...]) -> dict[str, Any]:
        raise NotImplementedError

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        envelope = self._envelope(self.chunk_object, [choice])
        return {**envelope, "usage": None} if self.include_usage else envelope

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}

    def _chunk_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        raise NotImplementedError

    def _body_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        raise NotImplementedError


@dataclass(frozen=True)
class CompletionRenderer(Renderer):
    chunk_object = "text_completion"
    body_object = "text_completion"

    def _chunk_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    _body_choice = _chunk_choice

    def _logprobs_json(self, positions: tuple[PositionLogprobs, ...]) -> dict[str, Any]:
        """The legacy completions shape (vLLM's): parallel lists, top tokens as a text -> logprob map."""
        return {"text_offset": [p.offset for p in positions],
                "token_logprobs": [p.chosen.logprob for p in positions],
                "tokens": [p.chosen.text for p in positions],
                "top_logprobs": [{t.text: t.logprob for t in p.top} for p in positions]}


@dataclass(frozen=True)
class ChatRenderer(Renderer):
    chunk_object = "chat.completion.chunk"
    body_object = "chat.completion"

    def opening_chunks(self) -> list[dict[str, Any]]:
        """OpenAI's first chunk announces the role with empty content."""
        return [self._chunk({"index": 0, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None})]

    def _chunk_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        delta = {"content": text} if text else {}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def _body_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}

    def _logprobs_json(self, positions: tuple[PositionLogprobs, ...]) -> dict[str, Any]:
        """Chat's shape: a record per token with its UTF-8 bytes and its top alternatives."""
        return {"content": [{**_token_json(p.chosen), "top_logprobs": [_token_json(t) for t in p.top]}
                            for p in positions]}


def _token_json(token: TokenLogprob) -> dict[str, Any]:
    return {"token": token.text, "logprob": token.logprob, "bytes": list(token.text.encode())}


def renderer_for(api: Api, request_id: str, model: str, include_usage: bool,
                 logprobs: bool = False) -> Renderer:
    cls = ChatRenderer if api is Api.CHAT else CompletionRenderer
    return cls(request_id, model, include_usage, logprobs)
