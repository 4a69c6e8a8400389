"""What the client saw of one request, and the latencies that follow from it.

Every time is in seconds on the client's `time.perf_counter()` clock, counted from the start of the
run (the first scheduled arrival is 0). A content chunk is a streamed chunk that carries output
(non-empty text, or token ids on gRPC). Definitions, as in vLLM's benchmark_serving:

- TTFT = first content chunk - send
- TPOT = (last content chunk - first content chunk) / (completion_tokens - 1); undefined (None) for
  a single output token
- ITL  = the gaps between consecutive content chunks
- E2E  = last content chunk - send
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import Any


@dataclass
class RequestRecord:
    """Filled in by a client as the request's stream arrives; read-only afterwards."""

    index: int
    input_len: int  # requested prompt length (tokens, or words for chat)
    output_len: int  # requested (and forced) output length
    scheduled_s: float  # arrival time from the arrival process
    send_s: float | None = None  # when the request was actually sent (later under --max-concurrency)
    chunk_times_s: list[float] = field(default_factory=list)  # arrival of each content chunk
    chunk_tokens: list[int] | None = None  # tokens in each content chunk, when the backend says
    end_s: float | None = None  # the stream ended ([DONE], the last message, or the error)
    prompt_tokens: int | None = None  # from the server's usage
    completion_tokens: int | None = None
    cached_tokens: int | None = None  # of the prompt's, from a prefix cache (usage, where the server says)
    kv_transfer_bytes: int | None = None  # KV cache pulled to its decode server (splitserve's gRPC says)
    finish_reason: str | None = None
    error: str | None = None
    # The output's token ids where the backend streams them (gRPC): a conversation's next turn
    # repeats them. Not written to JSON.
    output_token_ids: list[int] | None = field(default=None, repr=False)

    def add_chunk(self, t: float, num_tokens: int | None = None) -> None:
        self.chunk_times_s.append(t)
        if num_tokens is not None:
            self.chunk_tokens = [*(self.chunk_tokens or []), num_tokens]

    def fail(self, message: str, t: float) -> None:
        if self.error is None:
            self.error = message
        self.end_s = t

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.chunk_times_s)

    @property
    def num_output_tokens(self) -> int:
        """usage's completion_tokens; else the tokens per chunk; else one token per chunk."""
        if self.completion_tokens is not None:
            return self.completion_tokens
        if self.chunk_tokens is not None:
            return sum(self.chunk_tokens)
        return len(self.chunk_times_s)

    @property
    def num_prompt_tokens(self) -> int:
        return self.prompt_tokens if self.prompt_tokens is not None else self.input_len

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_times_s[0] - self.send_s if self.ok else None

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.num_output_tokens < 2:
            return None
        return (self.chunk_times_s[-1] - self.chunk_times_s[0]) / (self.num_output_tokens - 1)

    @property
    def itls_s(self) -> list[float]:
        times = self.chunk_times_s if self.ok else []
        return [b - a for a, b in pairwise(times)]

    @property
    def e2e_s(self) -> float | None:
        return self.chunk_times_s[-1] - self.send_s if self.ok else None

    def to_json(self) -> dict[str, Any]:
        derived = {"ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "e2e_s": self.e2e_s}
        data = {k: v for k, v in asdict(self).items() if k != "output_token_ids"}
        return {**data, **derived}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RequestRecord:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
