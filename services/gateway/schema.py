"""The gateway's own request and output records, shared by the HTTP (OpenAI) and gRPC edges."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from splitserve.engine.block_manager import MAX_CACHE_SALT_CHARS
from splitserve.engine.request import MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS
from splitserve.engine.structured import Grammar
from splitserve.v1 import common_pb2 as pb

from .errors import invalid
from .limits import (
    FLOAT32_MAX,
    INT32_MAX,
    MAX_N,
    MAX_PROMPTS,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
)
from .tools import Tool, ToolCall, ToolChoice

MAX_SEED = 2**64  # SamplingParams.seed is a uint64


class Api(enum.Enum):
    """Which front door a request came in by: it sets the id prefix and the max_tokens default."""

    COMPLETIONS = "cmpl"
    CHAT = "chatcmpl"
    GRPC = "gen"

    @property
    def default_max_tokens(self) -> int | None:
        """OpenAI's 16 for completions (and gateway.proto's for gRPC); None for chat, which like
        vLLM gets the rest of the context."""
        return None if self is Api.CHAT else 16


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant turn's calls, sent back with the conversation
    tool_call_id: str | None = None  # a tool message: the call it answers
    name: str | None = None  # the speaker's name, for templates that render it


@dataclass(frozen=True)
class TextPrompt:
    text: str


@dataclass(frozen=True)
class TokenPrompt:
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class ChatPrompt:
    messages: tuple[ChatMessage, ...]
    tools: tuple[Tool, ...] = ()  # rendered into the prompt (none when tool_choice is "none")
    add_generation_prompt: bool = True  # the assistant turn's opening after the messages
    continue_final_message: bool = False  # the last message left open: the model continues it
    template_kwargs: tuple[tuple[str, str | int | float | bool | None], ...] = ()  # more template variables


Prompt = TextPrompt | TokenPrompt | ChatPrompt


@dataclass(frozen=True)
class SamplingOptions:
    """The client's sampling settings, checked on construction (ApiError on a bad value).
    Defaults follow OpenAI and vLLM; max_tokens None takes the Api's default."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None  # None: no top-k filter
    seed: int | None = None  # None: the gateway draws one
    max_tokens: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias); ids checked by the frontend
    logprobs: bool = False  # each output token's log probability ...
    top_logprobs: int = 0  # ... and the most likely tokens' at its position
    prompt_logprobs: int | None = None  # vLLM's: each prompt token's, and this many top ones'
    grammar: Grammar | None = None  # structured output (checked by the frontend, off the event loop)
    include_stop_str_in_output: bool = False  # vLLM's: the stop string that ended the output stays in it
    skip_special_tokens: bool = True  # vLLM's: special tokens are left out of the text

    def __post_init__(self) -> None:
        self._check_floats()
        self._check_processing()
        if self.top_k is not None and not 1 <= self.top_k <= INT32_MAX:
            raise invalid(f"top_k must be -1 or 0 (disabled) or in [1, {INT32_MAX}], got {self.top_k}",
                          "top_k")
        if self.seed is not None and not 0 <= self.seed < MAX_SEED:
            raise invalid(f"seed must be in [-2**63, 2**64), got {self.seed}", "seed")
        if self.max_tokens is not None and not 1 <= self.max_tokens <= INT32_MAX:
            raise invalid(f"max_tokens must be in [1, {INT32_MAX}], got {self.max_tokens}", "max_tokens")
        self._check_min_tokens()
        self._check_stops()

    def _check_floats(self) -> None:
        # Finite and within float32, the proto's type: 1e39 would arrive as inf.
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= FLOAT32_MAX):
            raise invalid(f"temperature must be a finite number >= 0, got {self.temperature}", "temperature")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise invalid(f"top_p must be in (0, 1], got {self.top_p}", "top_p")

    def _check_processing(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise invalid(f"{name} must be in [-2, 2], got {getattr(self, name)}", name)
        if not 0.0 < self.repetition_penalty <= FLOAT32_MAX:
            raise invalid(f"repetition_penalty must be a number > 0, got {self.repetition_penalty}",
                          "repetition_penalty")
        if not 0.0 <= self.min_p <= 1.0:
            raise invalid(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise invalid(f"logit_bias has {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS} are "
                          "allowed", "logit_bias")
        if any(not -100.0 <= bias <= 100.0 for _, bias in self.logit_bias):
            raise invalid("logit_bias values must be in [-100, 100]", "logit_bias")
        if any(not 0 <= token <= INT32_MAX for token, _ in self.logit_bias):
            raise invalid("logit_bias keys must be token ids (>= 0)", "logit_bias")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise invalid(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}",
                          "top_logprobs")
        if self.top_logprobs and not self.logprobs:
            raise invalid("top_logprobs needs logprobs to be true", "top_logprobs")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS:
            raise invalid(f"prompt_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.prompt_logprobs}",
                          "prompt_logprobs")

    def _check_min_tokens(self) -> None:
        if not 0 <= self.min_tokens <= INT32_MAX:
            raise invalid(f"min_tokens must be in [0, {INT32_MAX}], got {self.min_tokens}", "min_tokens")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise invalid(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})",
                          "min_tokens")

    def _check_stops(self) -> None:
        if len(self.stop) > MAX_STOP_STRINGS:
            raise invalid(f"stop has {len(self.stop)} strings; at most {MAX_STOP_STRINGS} are allowed",
                          "stop")
        if any(not s for s in self.stop):
            raise invalid("stop cannot contain an empty string", "stop")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in self.stop):
            raise invalid(f"each stop string must be at most {MAX_STOP_STRING_CHARS} characters", "stop")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise invalid(f"stop_token_ids has {len(self.stop_token_ids)} ids; at most {MAX_STOP_TOKEN_IDS} "
                          "are allowed", "stop_token_ids")
        # Ids above the vocabulary are refused by the frontend, which knows its size.
        if any(not 0 <= t <= INT32_MAX for t in self.stop_token_ids):
            raise invalid("stop_token_ids must be token ids (>= 0)", "stop_token_ids")


def grammar_option(param: str, json_schema: str | None = None, regex: str | None = None) -> Grammar:
    """A Grammar from a client's field (its shape and size: what it says is checked later)."""
    try:
        return Grammar(json_schema=json_schema, regex=regex)
    except ValueError as exc:
        raise invalid(f"'{param}': {exc}", param) from None


def top_k_option(value: int | None) -> int | None:
    """vLLM's convention: -1 and 0 disable top-k."""
    return None if value in (None, -1, 0) else value


def seed_option(value: int | None) -> int | None:
    """vLLM accepts signed 64-bit seeds; negative ones map onto the uint64 proto field."""
    if value is not None and -(2**63) <= value < 0:
        return value % MAX_SEED
    return value


@dataclass(frozen=True)
class GenerationRequest:
    """One request as the gateway core sees it, whichever edge it came in by."""

    api: Api
    prompt: Prompt
    sampling: SamplingOptions
    model: str | None = None  # None: the served model
    # The client's own name for the request (gRPC request_id): checked, logged and echoed back, never
    # used as the request's id inside the cluster, which the gateway always chooses.
    client_request_id: str | None = None
    cache_salt: str | None = None  # vLLM's: only cached KV computed under the same salt is reused
    echo: bool = False  # completions: the response repeats the prompt (with its logprobs when asked)
    n: int = 1  # OpenAI's n: samples of the prompt, a choice each
    batch: tuple[Prompt, ...] = ()  # completions: the prompts after `prompt` (n choices each, in order)
    tool_choice: ToolChoice | None = None  # chat with tools: how calls are made and parsed
    # The client's W3C traceparent (HTTP header, gRPC metadata): the request's trace goes under it.
    # Used only when well-formed (splitserve/common/tracing.py), ignored otherwise, as W3C says.
    traceparent: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.n <= MAX_N:
            raise invalid(f"n must be in [1, {MAX_N}], got {self.n}", "n")
        if self.n > 1 and (self.echo or self.sampling.prompt_logprobs is not None):
            raise invalid("echo and prompt_logprobs are not supported with n > 1", "n")
        if 1 + len(self.batch) > MAX_PROMPTS:
            raise invalid(f"at most {MAX_PROMPTS} prompts per request, got {1 + len(self.batch)}", "prompt")

    @property
    def prompts(self) -> tuple[Prompt, ...]:
        return (self.prompt, *self.batch)

    @property
    def num_choices(self) -> int:
        """n per prompt: choice p * n + i is prompt p's sample i (vLLM's order)."""
        return self.n * (1 + len(self.batch))

    @property
    def scored_prompt(self) -> int | None:
        """The top prompt logprobs the workers must compute: what prompt_logprobs asks, or an echo
        with logprobs (vLLM's rule); None when the prompt needs no scoring."""
        asked = [n for n in (self.sampling.prompt_logprobs,
                             self.sampling.top_logprobs if self.echo and self.sampling.logprobs else None)
                 if n is not None]
        return max(asked) if asked else None


def cache_salt_option(value: str | None) -> str | None:
    """vLLM's cache_salt: a non-empty string, at most MAX_CACHE_SALT_CHARS characters."""
    if value is None:
        return None
    if not value or len(value) > MAX_CACHE_SALT_CHARS:
        raise invalid(f"'cache_salt' must be a non-empty string of at most {MAX_CACHE_SALT_CHARS} characters",
                      "cache_salt")
    return value


class Finish(enum.Enum):
    """Why a request ended, in OpenAI's words (errors are raised, not returned)."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


FINISH_FROM_PROTO = {
    pb.FINISH_REASON_STOP: Finish.STOP,
    pb.FINISH_REASON_LENGTH: Finish.LENGTH,
    pb.FINISH_REASON_ABORT: Finish.ABORT,
}
FINISH_TO_PROTO = {finish: proto for proto, finish in FINISH_FROM_PROTO.items()}


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV a worker's prefix cache supplied

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TokenLogprob:
    """A token, its text on its own (as vLLM renders it) and its log probability."""

    token_id: int
    text: str
    logprob: float | None  # None: the prompt's first token, which nothing precedes
    rank: int = 1


@dataclass(frozen=True)
class PositionLogprobs:
    """The log probabilities at one output position: the chosen token's and the most likely ones'
    (best first); offset is where the chosen token's text starts in the output (completions'
    text_offset)."""

    chosen: TokenLogprob
    top: tuple[TokenLogprob, ...]
    offset: int


@dataclass(frozen=True)
class PromptScores:
    """On a request's first output when it asked for an echo or prompt logprobs: the prompt's text
    (for the echo) and a record per prompt token (the first's logprob None: nothing precedes it)."""

    text: str
    positions: tuple[PositionLogprobs, ...]


@dataclass(frozen=True)
class Output:
    """New text and tokens of one request; the last one has finish, usage and timeline set."""

    text: str
    token_ids: tuple[int, ...]
    finish: Finish | None = None
    usage: Usage | None = None
    timeline: pb.Timeline | None = None
    logprobs: tuple[PositionLogprobs, ...] = ()  # one per token of token_ids, when asked for
    prompt: PromptScores | None = None
    stop_reason: str | int | None = None  # vLLM's: the stop string or stop token id that ended it
