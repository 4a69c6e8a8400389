"""Requests as the engine sees them: sampling parameters, lifecycle states, and the per-request record."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Any

from splitserve.engine.structured import Grammar


class RequestIdBusy(Exception):
    """A request id whose aborted copy a layered pass still writes into: it is free once the pass
    ends, so the caller may try again then (unlike a ValueError, never worth trying again)."""


class RequestState(enum.Enum):
    """Lifecycle of a request, including the disaggregation states.

    A colocated engine goes QUEUED -> PREFILLING -> DECODING -> FINISHED. A prefill-role engine stops
    at KV_READY (the blocks wait for a decode server to pull them); a decode-role engine enters at
    TRANSFERRING (blocks reserved, KV being imported) and goes on to DECODING.
    """

    QUEUED = "queued"
    PREFILLING = "prefilling"
    KV_READY = "kv_ready"
    TRANSFERRING = "transferring"
    DECODING = "decoding"
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"  # its engine step raised: retired with FinishReason.ERROR, never retried


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, a stop token id, or (at the gateway) a stop string
    LENGTH = "length"  # max_new_tokens or the model's context
    ABORT = "abort"  # cancelled by the client or the operator
    ERROR = "error"  # the engine step that ran it failed; StepOutput.error says why


# Below this temperature sampling is greedy (vLLM's _SAMPLING_EPS): dividing logits by a smaller one
# only overflows, and the distribution is one-hot to float32 precision anyway.
SAMPLING_EPS = 1e-5
# Bounds on what one request may ask of the sampler: OpenAI's 300 biased tokens, vLLM's 20 top logprobs.
MAX_LOGIT_BIAS = 300
MAX_TOP_LOGPROBS = 20
# What a log probability of -inf (or NaN) is reported as: vLLM's floor, since JSON has no infinities.
LOGPROB_FLOOR = -9999.0


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request; the defaults follow vLLM's.

    temperature 0 (below SAMPLING_EPS) means greedy. top_k None and top_p 1.0 mean no filtering. A
    seed makes sampling reproducible for this request whatever else is in the batch.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    max_new_tokens: int = 16
    min_new_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # OpenAI's penalties on the output so far (presence: once per token seen, frequency: per
    # occurrence), vLLM's repetition penalty (1: none) on prompt and output tokens, and min_p.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    # Added to the logits of these token ids before sampling (OpenAI's logit_bias).
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Return the chosen token's log probability and the top_logprobs most likely tokens' (of the
    # model's raw distribution, as vLLM's default), or nothing when logprobs is False.
    logprobs: bool = False
    top_logprobs: int = 0
    # vLLM's prompt_logprobs: each prompt token's log probability given the tokens before it (and
    # the top this-many tokens' at each position), computed at prefill; None: not computed. Such a
    # prompt is computed whole, never from the prefix cache (cached blocks have no logits).
    prompt_logprobs: int | None = None
    # Structured output: only tokens this grammar allows are sampled (engine/structured.py).
    grammar: Grammar | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # NaN fails this too
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}"
            )
        self._check_processing()

    def _check_processing(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not (0.0 < self.repetition_penalty and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias has {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS}")
        if any(not -100.0 <= bias <= 100.0 for _, bias in self.logit_bias):
            raise ValueError("logit_bias values must be in [-100, 100]")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS or (self.top_logprobs and not self.logprobs):
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], and 0 without logprobs")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"prompt_logprobs must be in [0, {MAX_TOP_LOGPROBS}] or None")

    @property
    def processes_logits(self) -> bool:
        """Whether anything changes the logits before the choice (penalties, bias, min_p, a grammar)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_p or self.grammar)

    @property
    def greedy(self) -> bool:
        """Deterministic argmax: temperature 0 (or below SAMPLING_EPS), or a single candidate (top_k 1)."""
        return self.temperature < SAMPLING_EPS or self.top_k == 1


@dataclass
class Sequence:
    """One request inside an engine: its tokens, its KV blocks' owner id, and its timeline."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    output_token_ids: list[int] = field(default_factory=list)
    state: RequestState = RequestState.QUEUED
    finish_reason: FinishReason | None = None
    timestamps: dict[RequestState, float] = field(default_factory=dict)
    # Tokens whose K/V are already in this engine's cache (prompt and earlier outputs).
    num_computed_tokens: int = 0
    # The chained hashes of the prompt's full blocks (block_manager.block_hashes), by which its
    # prefix is looked up in the prefix cache; empty when the engine caches no prefixes.
    block_hashes: list[bytes] = field(default_factory=list, repr=False)
    # Prompt tokens the prefix cache supplied when the sequence was last scheduled (usage's cached_tokens).
    num_cached_tokens: int = 0
    # vLLM's cache_salt: its blocks are shared only with requests of the same salt (None: unsalted).
    cache_salt: str | None = None
    # Sampling draws are seeded by (seed, output position), so a request samples the same tokens
    # whichever engine runs each step; params.seed when given, else random.
    seed: int = 0
    # With params.prompt_logprobs: position -> the log probabilities of the prompt token there,
    # filled as prefill chunks run (a chunk run again writes the same entries), handed out with
    # the first output token.
    prompt_logprobs: dict[int, TokenLogprobs] = field(default_factory=dict, repr=False)
    # With params.grammar: its llguidance matcher, which has consumed the output so far.
    matcher: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("prompt must contain at least one token")
        self.timestamps.setdefault(self.state, time.monotonic())

    def transition(self, state: RequestState) -> None:
        self.state = state
        self.timestamps[state] = time.monotonic()

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.state in (RequestState.FINISHED, RequestState.ABORTED, RequestState.FAILED)


@dataclass(frozen=True)
class TokenLogprobs:
    """The chosen token's log probability and the most likely tokens' (ids and log probabilities,
    best first), from the model's distribution at that position."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    rank: int = 1  # 1 + how many tokens were likelier


@dataclass(frozen=True)
class StepOutput:
    """What one engine step produced for one request: the new token and, if it ended, why.

    A request whose step failed gets no token: token_id is None, finish_reason ERROR, and error
    says what went wrong.
    """

    request_id: str
    token_id: int | None
    finish_reason: FinishReason | None
    error: str | None = None
    num_cached_tokens: int = 0  # prompt tokens the prefix cache supplied (usage's cached_tokens)
    logprobs: TokenLogprobs | None = None  # when the request asked for them
    # With the first token, when asked for: the prompt's tokens' from the second on (the first has
    # nothing before it).
    prompt_logprobs: tuple[TokenLogprobs, ...] | None = None
