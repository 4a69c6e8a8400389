"""Per-request token choice: greedy, or temperature + top-k + top-p with reproducible draws."""

from __future__ import annotations

import torch

from splitserve.engine.request import Sequence


_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads consecutive positions over the seed space


def step_seed(seed: int, position: int) -> int:
    """The seed of one sampling draw: a function of the request's seed and its output position only."""
    return (seed ^ (position * _MIX)) & (2**63 - 1)


def suppress_stop_tokens(
    logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: frozenset[int]
) -> None:
    """Below min_new_tokens, EOS and stop tokens may not be chosen (vLLM's min_tokens)."""
    for row, seq in enumerate(seqs):
        if seq.num_output_tokens < seq.params.min_new_tokens:
            banned = list(eos_token_ids | set(seq.params.stop_token_ids))
            logits[row, banned] = float("-inf")


def sample(logits: torch.Tensor, seqs: list[Sequence], generator: torch.Generator) -> list[int]:
    """One token per row of logits ``[batch, vocab]`` (float32, on the CPU)."""
    tokens = logits.argmax(dim=-1).tolist()
    for row, seq in enumerate(seqs):
        if not seq.params.greedy:
            generator.manual_seed(step_seed(seq.seed, seq.num_output_tokens))
            tokens[row] = _sample_row(logits[row], seq, generator)
    return tokens


def _sample_row(logits: torch.Tensor, seq: Sequence, gen: torch.Generator) -> int:
    params = seq.params
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.numel():
        # Exactly k candidates even when bfloat16 logits tie at the k-th value.
        values, indices = torch.topk(logits, params.top_k)
        logits = torch.full_like(logits, float("-inf")).scatter_(0, indices, values)
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=gen).item())
