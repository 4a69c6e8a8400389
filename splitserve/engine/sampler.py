"""Per-request token choice: greedy, or temperature + top-k + top-p with a per-request generator."""

from __future__ import annotations

import torch

from splitserve.engine.request import Sequence


def make_generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def suppress_stop_tokens(
    logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: frozenset[int]
) -> None:
    """Below min_new_tokens, EOS and stop tokens may not be chosen (vLLM's min_tokens)."""
    for row, seq in enumerate(seqs):
        if seq.num_output_tokens < seq.params.min_new_tokens:
            banned = list(eos_token_ids | set(seq.params.stop_token_ids))
            logits[row, banned] = float("-inf")


def sample(
    logits: torch.Tensor, seqs: list[Sequence], generators: dict[str, torch.Generator]
) -> list[int]:
    """One token per row of logits ``[batch, vocab]`` (float32, on the CPU)."""
    tokens = logits.argmax(dim=-1).tolist()
    for row, seq in enumerate(seqs):
        if not seq.params.greedy:
            tokens[row] = _sample_row(logits[row], seq, generators[seq.request_id])
    return tokens


def _sample_row(logits: torch.Tensor, seq: Sequence, gen: torch.Generator) -> int:
    params = seq.params
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=gen).item())
