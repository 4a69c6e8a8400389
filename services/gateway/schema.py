"""The gateway's own request and output records, shared by the HTTP (OpenAI) and gRPC edges."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from splitserve.v1 import common_pb2 as pb

from .errors import invalid

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


@dataclass(frozen=True)
class TextPrompt:
    text: str


@dataclass(frozen=True)
class TokenPrompt:
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class ChatPrompt:
    messages: tuple[ChatMessage, ...]


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

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise invalid(f"temperature must be >= 0, got {self.temperature}", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise invalid(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k is not None and self.top_k < 1:
            raise invalid(f"top_k must be -1 or 0 (disabled) or >= 1, got {self.top_k}", "top_k")
        if self.seed is not None and not 0 <= self.seed < MAX_SEED:
            raise invalid(f"seed must be in [-2**63, 2**64), got {self.seed}", "seed")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise invalid(f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens")
        self._check_min_tokens()
        if any(not s for s in self.stop):
            raise invalid("stop cannot contain an empty string", "stop")
        if any(t < 0 for t in self.stop_token_ids):
            raise invalid("stop_token_ids must be >= 0", "stop_token_ids")

    def _check_min_tokens(self) -> None:
        if self.min_tokens < 0:
            raise invalid(f"min_tokens must be >= 0, got {self.min_tokens}", "min_tokens")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise invalid(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})",
                          "min_tokens")


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
    request_id: str | None = None  # None: the gateway chooses one


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

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Output:
    """New text and tokens of one request; the last one has finish, usage and timeline set."""

    text: str
    token_ids: tuple[int, ...]
    finish: Finish | None = None
    usage: Usage | None = None
    timeline: pb.Timeline | None = None
