"""Outputs -> OpenAI response bodies and server-sent-event chunks, in OpenAI's exact shapes."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from .schema import (
    Api,
    ChatPrompt,
    GenerationRequest,
    Output,
    PositionLogprobs,
    PromptScores,
    TokenLogprob,
    Usage,
)
from .tools import CallStream, Tool, ToolChoice, final_calls

DONE = b"data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def usage_json(usage: Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


@dataclass
class Choice:
    """One sample's whole output, for a non-streaming response (pieces joined once, at the end:
    appending to a str or tuple copies it, quadratic in the output's length)."""

    final: Output | None = None
    prompt: PromptScores | None = None
    _texts: list[str] = field(default_factory=list)
    _logprobs: list[PositionLogprobs] = field(default_factory=list)

    def add(self, output: Output) -> None:
        self._texts.append(output.text)
        self._logprobs.extend(output.logprobs)
        self.prompt = self.prompt or output.prompt
        self.final = output

    @property
    def text(self) -> str:
        return "".join(self._texts)

    @property
    def logprobs(self) -> tuple[PositionLogprobs, ...]:
        return tuple(self._logprobs)


@dataclass(frozen=True)
class Renderer:
    """Renders one request's response; subclasses fill in the endpoint's choice shape."""

    request_id: str
    model: str
    include_usage: bool = False  # stream_options.include_usage
    logprobs: bool = False  # the request asked for them: each choice carries its tokens'
    echo: bool = False  # completions: the first choice repeats the prompt (and its logprobs)
    prompt_logprobs: bool = False  # vLLM's prompt_logprobs field
    tools: tuple[Tool, ...] = ()  # chat: the request's tools, when tool_choice is not "none"
    tool_choice: ToolChoice | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    # Chat with tools, streamed: each choice's calls and content as they come (tools.CallStream).
    _streams: dict[int, CallStream] = field(default_factory=dict)

    chunk_object = ""
    body_object = ""

    def opening_chunks(self, n: int = 1) -> list[dict[str, Any]]:
        return []

    def chunk(self, output: Output, index: int = 0) -> dict[str, Any] | None:
        """The SSE chunk for output of choice index; None when it carries nothing for the client."""
        text, positions = self._with_echo(output.prompt, output.text, output.logprobs)
        if not text and output.finish is None and not (self.logprobs and positions):
            return None
        choice = self._chunk_choice(text, output.finish and output.finish.value)
        return self._chunk({**choice, "index": index, "logprobs": self._logprobs(positions),
                            "stop_reason": output.stop_reason})

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        """OpenAI's last chunk under include_usage: no choices, the whole request's usage."""
        return {**self._envelope(self.chunk_object, []), "usage": usage_json(usage)}

    def body(self, choices: list[Choice], usage: Usage) -> dict[str, Any]:
        """The non-streaming response: a choice per sample, and the whole request's usage."""
        return {**self._envelope(self.body_object, [self._choice_json(i, c) for i, c in enumerate(choices)]),
                "usage": usage_json(usage)}

    def _choice_json(self, index: int, choice: Choice) -> dict[str, Any]:
        text, logprobs = self._with_echo(choice.prompt, choice.text, choice.logprobs)
        finish = choice.final.finish.value if choice.final.finish else None
        return {**self._body_choice(text, finish), "index": index, "logprobs": self._logprobs(logprobs),
                "stop_reason": choice.final.stop_reason}

    def _with_echo(self, prompt: PromptScores | None, text: str,
                   positions: tuple[PositionLogprobs, ...]) -> tuple[str, tuple[PositionLogprobs, ...]]:
        """text and positions, after the prompt's when echoing (on the first output only)."""
        if prompt is None or not self.echo:
            return text, positions
        return prompt.text + text, prompt.positions + positions if self.logprobs else positions

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

    def chunk(self, output: Output, index: int = 0) -> dict[str, Any] | None:
        chunk = super().chunk(output, index)
        if chunk is not None and self.prompt_logprobs:  # (not streamed with prompt_logprobs, as vLLM)
            chunk["choices"][0]["prompt_logprobs"] = prompt_logprobs_json(output.prompt)
        return chunk

    def _choice_json(self, index: int, choice: Choice) -> dict[str, Any]:
        record = super()._choice_json(index, choice)
        if not self.prompt_logprobs:
            return record
        return {**record, "prompt_logprobs": prompt_logprobs_json(choice.prompt)}

    def _logprobs_json(self, positions: tuple[PositionLogprobs, ...]) -> dict[str, Any]:
        """The legacy completions shape (vLLM's): parallel lists, top tokens as a text -> logprob map
        (an echoed prompt's first token has None for both)."""
        return {"text_offset": [p.offset for p in positions],
                "token_logprobs": [p.chosen.logprob for p in positions],
                "tokens": [p.chosen.text for p in positions],
                "top_logprobs": [None if p.chosen.logprob is None else {t.text: t.logprob for t in p.top}
                                 for p in positions]}


@dataclass(frozen=True)
class ChatRenderer(Renderer):
    chunk_object = "chat.completion.chunk"
    body_object = "chat.completion"

    @property
    def calls_tools(self) -> bool:
        return self.tool_choice is not None and self.tool_choice.active

    def chunk(self, output: Output, index: int = 0) -> dict[str, Any] | None:
        """With tools, a choice's content and tool calls as tools.CallStream releases them."""
        if not self.calls_tools:
            return super().chunk(output, index)
        stream = self._streams.setdefault(index, CallStream(self.tools, self.tool_choice))
        content, calls = stream.feed(output.text)
        finish = None
        if output.finish is not None:
            more, more_calls, finish = stream.finish(output.finish.value)
            content, calls = content + more, calls + more_calls
            del self._streams[index]
        if not (content or calls or finish or (self.logprobs and output.logprobs)):
            return None
        delta = {**({"content": content} if content else {}), **({"tool_calls": calls} if calls else {})}
        return self._chunk({"index": index, "delta": delta, "logprobs": self._logprobs(output.logprobs),
                            "finish_reason": finish, "stop_reason": output.stop_reason})

    def opening_chunks(self, n: int = 1) -> list[dict[str, Any]]:
        """OpenAI's first chunk of each choice announces the role with empty content."""
        return [self._chunk({"index": i, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}) for i in range(n)]

    def _chunk_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        delta = {"content": text} if text else {}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def _body_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}

    def body(self, choices: list[Choice], usage: Usage) -> dict[str, Any]:
        body = super().body(choices, usage)
        if not self.prompt_logprobs:
            return body
        return {**body, "prompt_logprobs": prompt_logprobs_json(choices[0].prompt)}

    def _choice_json(self, index: int, choice: Choice) -> dict[str, Any]:
        record = super()._choice_json(index, choice)
        if not self.calls_tools or record["finish_reason"] is None:
            return record
        content, calls, finish = final_calls(record["message"]["content"], self.tools, self.tool_choice,
                                             record["finish_reason"])
        message = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [c.json() for c in calls]
        return {**record, "message": message, "finish_reason": finish}

    def _logprobs_json(self, positions: tuple[PositionLogprobs, ...]) -> dict[str, Any]:
        """Chat's shape: a record per token with its UTF-8 bytes and its top alternatives."""
        return {"content": [{**_token_json(p.chosen), "top_logprobs": [_token_json(t) for t in p.top]}
                            for p in positions]}


def prompt_logprobs_json(prompt: PromptScores | None) -> list[dict[str, Any] | None] | None:
    """vLLM's prompt_logprobs: None for the first token, then per position a map of token ids (the
    prompt's own and the top ones) to their logprob, rank and text."""
    if prompt is None:
        return None
    return [None] + [{str(t.token_id): {"logprob": t.logprob, "rank": t.rank, "decoded_token": t.text}
                      for t in (*p.top, p.chosen)} for p in prompt.positions[1:]]


def _token_json(token: TokenLogprob) -> dict[str, Any]:
    return {"token": token.text, "logprob": token.logprob, "bytes": list(token.text.encode())}


def renderer_for(request: GenerationRequest, request_id: str, model: str, include_usage: bool) -> Renderer:
    if request.api is not Api.CHAT:
        return CompletionRenderer(request_id, model, include_usage, request.sampling.logprobs, request.echo,
                                  request.sampling.prompt_logprobs is not None)
    tools = request.prompt.tools if isinstance(request.prompt, ChatPrompt) else ()
    return ChatRenderer(request_id, model, include_usage, request.sampling.logprobs, False,
                        request.sampling.prompt_logprobs is not None, tools, request.tool_choice)
