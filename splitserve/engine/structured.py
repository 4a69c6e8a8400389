"""Structured output: a grammar constrains which tokens a request may sample (llguidance).

A request's grammar is a JSON schema or a regular expression (the gateway turns OpenAI's
response_format and vLLM's guided_json / guided_regex / guided_choice into one of them). Each
request has a matcher that follows its output: before a token is chosen its mask removes every token
the grammar does not allow, and the chosen token advances it. A decode server continuing a request
prefilled elsewhere builds its matcher from the grammar and advances it over the tokens sampled
there, so the grammar state continues exactly.

llguidance, not xgrammar: on this CPU its mask costs 0.05 ms a token against xgrammar's 0.19 ms
(a 36-token JSON object, SmolLM2's 49,152-token vocabulary; docs/api.md), and it needs no torch or
triton, so the gateway can check a grammar before queueing it.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

# A grammar is bounded by size: the matcher's construction time grows with it.
MAX_GRAMMAR_CHARS = 64 << 10


@dataclass(frozen=True)
class Grammar:
    """Exactly one of a JSON schema (as JSON text) or a regular expression."""

    json_schema: str | None = None
    regex: str | None = None

    def __post_init__(self) -> None:
        if (self.json_schema is None) == (self.regex is None):
            raise ValueError("a grammar is a JSON schema or a regex, exactly one")
        if len(self.json_schema or self.regex or "") > MAX_GRAMMAR_CHARS:
            raise ValueError(f"the grammar is longer than {MAX_GRAMMAR_CHARS} characters")

    def llguidance(self) -> str:
        """The grammar in llguidance's form; ValueError when it is not one."""
        from llguidance import LLMatcher

        if self.json_schema is not None:
            try:
                schema = json.loads(self.json_schema)
            except ValueError as exc:
                raise ValueError(f"the JSON schema is not JSON: {exc}") from None
            grammar = LLMatcher.grammar_from_json_schema(schema)
        else:
            grammar = LLMatcher.grammar_from_regex(self.regex)
        error = LLMatcher.validate_grammar(grammar)
        if error:
            raise ValueError(f"invalid grammar: {error[:500]}")
        return grammar


def choice_regex(choices: list[str]) -> str:
    """A regex matching exactly one of choices (vLLM's guided_choice)."""
    return "(" + "|".join("".join(_escape(c) for c in choice) for choice in choices) + ")"


def _escape(char: str) -> str:
    return "\\" + char if char in r"\.+*?()|[]{}^$#&-~" else char


class GrammarBackend:
    """One model's llguidance tokenizer (built once per process: about a second), and matchers."""

    _tokenizers: dict[int, object] = {}
    _lock = threading.Lock()

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        self.hf_tokenizer, self.vocab_size, self.eos_token_ids = tokenizer, vocab_size, eos_token_ids

    @property
    def tokenizer(self):
        key = id(self.hf_tokenizer)
        with self._lock:
            if key not in self._tokenizers:
                import llguidance.hf

                self._tokenizers[key] = llguidance.hf.from_tokenizer(
                    self.hf_tokenizer, n_vocab=self.vocab_size, eos_token=sorted(self.eos_token_ids))
            return self._tokenizers[key]

    def warm(self) -> None:
        """Build the tokenizer and a first matcher now (the first costs seconds), not on a request."""
        self.matcher(Grammar(json_schema='{"type": "object"}'), [])

    def matcher(self, grammar: Grammar, output: list[int]):
        """A matcher for grammar that has consumed output (tokens sampled elsewhere); ValueError when
        the grammar is invalid or refuses them."""
        from llguidance import LLMatcher

        matcher = LLMatcher(self.tokenizer, grammar.llguidance(), log_level=0)
        if matcher.is_error() or (output and not matcher.consume_tokens(output)):
            raise ValueError(f"the grammar refuses the request's output: {matcher.get_error()[:500]}")
        return matcher
