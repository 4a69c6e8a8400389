"""Prompts of exact lengths: token-id lists for /v1/completions and gRPC, word texts for chat.

Token ids are drawn uniformly from [lo, hi), a range inside every common vocabulary, so a prompt of
n ids is exactly n tokens on any server that takes token-id prompts. Each run draws a random nonce
that starts every prompt: no two runs share a prefix, so no prefix cache can flatter a result.
`fixed_prompts` leaves the nonce out, and the prompts depend only on the seed.

With a `SharedPrefix`, each prompt is one of S system prompts of L tokens (the nonce first, so
still fresh each run) followed by the request's own question: the only prefixes requests share.
A replayed trace's prompts are its blocks, each drawn from the nonce and its hash id (trace.py), and
a conversation's turns repeat its history (conversations.py): the prefixes those workloads share.
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

DEFAULT_TOKEN_RANGE = (1000, 30000)
NONCE_TOKENS = 4  # 26k^4 = 4.6e17 prefixes; far shorter than any KV block, so no shared cache block
_WORDS = (  # common English nouns: one token each in most vocabularies
    "time", "year", "people", "way", "day", "man", "thing", "woman", "life", "child", "world", "school",
    "state", "family", "student", "group", "country", "problem", "hand", "part", "place", "case", "week",
    "company", "system", "program", "question", "work", "government", "number", "night", "point", "home",
    "water", "room", "mother", "area", "money", "story", "fact", "month", "lot", "right", "study", "book",
    "eye", "job", "word", "business", "issue", "side", "kind", "head", "house", "service", "friend",
    "father", "power", "hour", "game", "line", "end", "member", "law", "car", "city", "community", "name",
    "president", "team", "minute", "idea", "kid", "body", "information", "back", "parent", "face", "others",
    "level", "office", "door", "health", "person", "art", "war", "history", "party", "result", "change",
    "morning", "reason", "research", "girl", "guy", "moment", "air", "teacher", "force", "education",
)


@dataclass(frozen=True)
class SharedPrefix:
    """Shared system prompts: num_prompts of them, each length tokens, one per request at random."""

    num_prompts: int
    length: int

    def __post_init__(self) -> None:
        if self.num_prompts < 1 or self.length < 1:
            raise ValueError(f"shared prefixes need >= 1 prompt of >= 1 token, got "
                             f"{self.num_prompts} x {self.length}")


@dataclass(frozen=True)
class PromptFactory:
    """Builds request i's prompt; the same (seed, point, nonce, i, length) always gives the same one."""

    seed: int
    point: int = 0  # the sweep point: each point gets fresh prompts
    token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE
    nonce: tuple[int, ...] = ()  # the run's random first tokens; empty with fixed prompts
    shared_prefix: SharedPrefix | None = None  # system prompts before each request's own tokens

    def __post_init__(self) -> None:
        lo, hi = self.token_range
        if not 0 <= lo < hi:
            raise ValueError(f"token range needs 0 <= lo < hi, got {lo}..{hi}")

    def token_ids(self, index: int, length: int) -> list[int]:
        """Request index's prompt: length tokens of its own, after its system prompt if any."""
        rng = random.Random(f"prompt:{self.seed}:{self.point}:{index}")
        if self.shared_prefix is not None:
            return self.system_prompt(self.system_prompt_of(index)) + self._draw(rng, length)
        return self._after_nonce(rng, length)

    def system_prompt_of(self, index: int) -> int:
        assert self.shared_prefix is not None
        rng = random.Random(f"system-of:{self.seed}:{self.point}:{index}")
        return rng.randrange(self.shared_prefix.num_prompts)

    def system_prompt(self, k: int) -> list[int]:
        assert self.shared_prefix is not None
        rng = random.Random(f"system:{self.seed}:{self.point}:{k}")
        return self._after_nonce(rng, self.shared_prefix.length)

    def trace_prompt(self, index: int, hash_ids: Sequence[int], length: int, block_tokens: int) -> list[int]:
        """A trace request's prompt: the blocks its hash ids name (equal ids, equal tokens; all
        fresh each run), then tokens of its own past them, cut to length."""
        tokens: list[int] = []
        for h in hash_ids[:-(-length // block_tokens)]:
            rng = random.Random(f"block:{self.seed}:{self.point}:{self.nonce}:{h}")
            tokens += self._draw(rng, block_tokens)
        own = random.Random(f"prompt:{self.seed}:{self.point}:{index}")
        return (tokens + self._draw(own, max(0, length - len(tokens))))[:length]

    def turn(self, index: int, length: int) -> list[int]:
        """Request index's new tokens in a conversation's later turn (its history comes first)."""
        return self._draw(random.Random(f"turn:{self.seed}:{self.point}:{index}"), length)

    def reply(self, index: int, length: int) -> list[int]:
        """The tokens standing for request index's answer in the next turn of its conversation."""
        return self._draw(random.Random(f"reply:{self.seed}:{self.point}:{index}"), length)

    def _after_nonce(self, rng: random.Random, length: int) -> list[int]:
        """length tokens: the run's nonce (cut to length), then tokens drawn from rng."""
        head = list(self.nonce[:length])
        return head + self._draw(rng, length - len(head))

    def _draw(self, rng: random.Random, n: int) -> list[int]:
        lo, hi = self.token_range
        return [rng.randrange(lo, hi) for _ in range(n)]

    def text(self, index: int, num_words: int) -> str:
        """About num_words tokens of plain words (chat); the nonce is the first word."""
        rng = random.Random(f"text:{self.seed}:{self.point}:{index}")
        head = ["-".join(map(str, self.nonce))] if self.nonce else []
        return " ".join(head + [rng.choice(_WORDS) for _ in range(max(1, num_words - len(head)))])


def max_cached_tokens(prompts: Iterable[Sequence[int]], block_size: int) -> int:
    """The most prompt tokens a prefix cache of block_size-token blocks, with room for everything,
    reuses over these prompts sent in this order: each prompt's leading full blocks (before the one
    holding its last token, which is always computed) that an earlier prompt had."""
    seen: set[bytes] = set()
    total = 0
    for prompt in prompts:
        keys, parent = [], b""
        for start in range(0, len(prompt) - block_size + 1, block_size):
            block = struct.pack(f"<{block_size}I", *prompt[start:start + block_size])
            parent = hashlib.sha256(parent + block).digest()
            keys.append(parent)
        lookup = keys[:(len(prompt) - 1) // block_size]
        hits = next((i for i, k in enumerate(lookup) if k not in seen), len(lookup))
        total += hits * block_size
        seen.update(keys)
    return total


def new_nonce(token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE) -> tuple[int, ...]:
    """Fresh random first tokens for one run, from the OS's entropy (not the seed)."""
    rng = random.SystemRandom()
    return tuple(rng.randrange(*token_range) for _ in range(NONCE_TOKENS))
