"""xgrammar against llguidance on this CPU: the per-token cost of a grammar's mask (why splitserve
uses llguidance, splitserve/engine/structured.py).

For a JSON schema and a 36-token JSON object that fits it, on the default model's tokenizer
(49,152 tokens): each backend's one-time setup, its grammar compilation, and per token the mask's
computation plus its application to a row of logits. xgrammar is not a splitserve dependency (it
pulls torch's triton); install it for this script only:

    .venv/bin/pip install --no-deps xgrammar apache-tvm-ffi
    .venv/bin/python scripts/grammar-backends.py
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from splitserve.engine.loader import resolve_model

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "ok"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string"}}, "ok": {"type": "boolean"}}}
VALUE = {"name": "Ada Lovelace", "age": 36, "tags": ["math", "poetry", "engines"], "ok": True}


def per_token(step, tokens: list[int]) -> list[float]:
    times = []
    for token in tokens:
        started = time.perf_counter()
        step(token)
        times.append(time.perf_counter() - started)
    return times


def report(name: str, setup_s: float, compile_s: float, times: list[float]) -> None:
    times = sorted(times)
    print(f"{name:>10}: setup {setup_s * 1e3:.0f} ms, compile {compile_s * 1e3:.1f} ms, per token median "
          f"{statistics.median(times) * 1e3:.3f} ms, p90 {times[int(0.9 * len(times))] * 1e3:.3f} ms "
          f"({len(times)} tokens)")


def main() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None).path)
    vocab = 49152
    tokens = tokenizer(json.dumps(VALUE))["input_ids"]

    import llguidance
    import llguidance.hf
    import llguidance.torch

    started = time.perf_counter()
    llg_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    setup = time.perf_counter() - started
    started = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    compile_s = time.perf_counter() - started
    for attempt in range(2):  # the first pass warms both libraries up
        matcher, mask, logits = llguidance.LLMatcher(llg_tokenizer, grammar), \
            llguidance.torch.allocate_token_bitmask(1, vocab), torch.randn(1, vocab)

        def llg_step(token: int) -> None:
            llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
            llguidance.torch.apply_token_bitmask_inplace(logits, mask)
            assert matcher.consume_token(token)
        times = per_token(llg_step, tokens)
    report("llguidance", setup, compile_s, times)

    import xgrammar

    started = time.perf_counter()
    compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab))
    setup = time.perf_counter() - started
    started = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
    compile_s = time.perf_counter() - started
    for attempt in range(2):
        matcher, mask, logits = xgrammar.GrammarMatcher(compiled), xgrammar.allocate_token_bitmask(1, vocab), \
            torch.randn(1, vocab)

        def xgr_step(token: int) -> None:
            matcher.fill_next_token_bitmask(mask)
            xgrammar.apply_token_bitmask_inplace(logits, mask)
            assert matcher.accept_token(token)
        times = per_token(xgr_step, tokens)
    report("xgrammar", setup, compile_s, times)


if __name__ == "__main__":
    main()
