"""Per-request token choice: a grammar's mask, logit bias and penalties, then greedy, or temperature +
top-k + min-p + top-p with reproducible draws; and the chosen token's log probabilities.

Sampling is total: any row of float logits (NaN, +-inf and extreme values included) and any valid
SamplingParams give a token id in range, never an exception, so no request's parameters can fail the
step its neighbours share. Where the distribution is degenerate (every candidate masked, an infinite
logit, probabilities that did not come out finite) the choice falls back to the argmax. Only a row
that is NaN throughout, which holds no choice to make, fails its own request.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from splitserve.engine.request import LOGPROB_FLOOR, SamplingParams, Sequence, TokenLogprobs


_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads consecutive positions over the seed space
_NEG_INF = float("-inf")


def step_seed(seed: int, position: int) -> int:
    """The seed of one sampling draw: a function of the request's seed and its output position only."""
    return (seed ^ (position * _MIX)) & (2**63 - 1)


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: frozenset[int],
           generator: torch.Generator) -> list[int]:
    """One token per row of logits ``[batch, vocab]`` (on the CPU); see sample_one."""
    return [sample_one(logits[row], seq, eos_token_ids, generator) for row, seq in enumerate(seqs)]


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Each row's first argmax, or -1 for a row holding a NaN (which argmax would pick); the kernels'
    argmax_rows computes the same in one vector pass."""
    best = logits.argmax(dim=-1)
    return best.masked_fill(torch.isnan(logits.gather(1, best[:, None]).squeeze(1)), -1)


def plain_greedy_tokens(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: frozenset[int],
                        argmax: Callable[[torch.Tensor], torch.Tensor] = argmax_rows) -> list[int | None]:
    """One batched argmax for the rows that need nothing more (greedy, no bias or penalty, no NaN);
    None for the rows sample_one must decide. The common greedy step stays one pass over the batch.

    A row below its min_new_tokens takes the argmax too when that is not a stop token: masking the
    stop tokens lowers only other entries, so the first best of the rest is the same token. Only a
    row whose best is a stop token goes to sample_one."""
    return [token if token >= 0 and seq.params.greedy and not seq.params.processes_logits
            and (seq.num_output_tokens >= seq.params.min_new_tokens
                 or (token not in eos_token_ids and token not in seq.params.stop_token_ids)) else None
            for token, seq in zip(argmax(logits).tolist(), seqs)]


def sample_one(logits: torch.Tensor, seq: Sequence, eos_token_ids: frozenset[int],
               generator: torch.Generator) -> int:
    """The next token of seq from its row of logits ``[vocab]``; the row itself is not modified.

    Below min_new_tokens, EOS and stop tokens may not be chosen (vLLM's min_tokens). A row that is
    NaN throughout carries no choice at all: ValueError, and the request fails alone.
    """
    if bool(torch.isnan(logits).all()):
        raise ValueError("the model produced NaN for every token of this request's step")
    # A NaN logit (a broken model row) is never drawn; infinities stay what they are.
    raw = _process(logits.float().nan_to_num(nan=_NEG_INF, posinf=float("inf"), neginf=_NEG_INF), seq)
    masked = _suppress_stop_tokens(raw, seq, eos_token_ids)
    if seq.params.greedy:
        return _argmax(masked, raw)
    probs = _probabilities(masked, seq.params)
    if probs is None:
        return _argmax(masked, raw)
    generator.manual_seed(step_seed(seq.seed, seq.num_output_tokens))
    return int(torch.multinomial(probs, 1, generator=generator).item())


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> TokenLogprobs:
    """token's log probability under the model's own distribution at this position (the raw logits,
    before bias, penalties or temperature: vLLM's default) and the `top` most likely tokens'."""
    return rows_logprobs(logits[None], [token], top)[0]


def rows_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprobs]:
    """For each row of logits ``[rows, vocab]``: tokens[row]'s log probability, rank, and the `top`
    most likely tokens'."""
    # A NaN logit counts as -inf, as when sampling; an infinite one leaves NaN, reported as the floor.
    rows = logits.float().nan_to_num(nan=_NEG_INF, posinf=float("inf"), neginf=_NEG_INF)
    logprobs = torch.log_softmax(rows, dim=-1).nan_to_num(nan=LOGPROB_FLOOR).clamp(min=LOGPROB_FLOOR)
    chosen = logprobs.gather(1, torch.tensor(tokens)[:, None])
    ranks = (logprobs > chosen).sum(dim=1) + 1
    best: list[tuple[tuple[int, float], ...]] = [()] * len(tokens)
    if top:
        values, ids = torch.topk(logprobs, min(top, logprobs.shape[1]), dim=1)
        best = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    return [TokenLogprobs(lp, b, rank) for lp, b, rank in zip(chosen[:, 0].tolist(), best, ranks.tolist())]


def _process(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """logit_bias, then vLLM's penalties: repetition (on every prompt and output token: positive
    logits divided by it, negative ones multiplied), frequency (times each output token's count)
    and presence (once per output token seen). The output so far is the sequence's, so a decode
    server that continues a request prefilled elsewhere penalizes exactly as a colocated one."""
    params = seq.params
    if not params.processes_logits:
        return logits
    out = logits.clone()
    if seq.matcher is not None:
        _apply_grammar(out, seq.matcher)
    if params.logit_bias:
        ids = torch.tensor([token for token, _ in params.logit_bias])
        out.index_add_(0, ids, torch.tensor([bias for _, bias in params.logit_bias]))
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(seq.all_token_ids).unique()
        values = out[seen]
        out[seen] = torch.where(values > 0, values / params.repetition_penalty,
                                values * params.repetition_penalty)
    if seq.output_token_ids and (params.frequency_penalty or params.presence_penalty):
        counts = torch.bincount(torch.tensor(seq.output_token_ids), minlength=out.numel()).float()
        out -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
    return out  # no NaN: infinities only ever meet finite, positive factors and finite terms


def _apply_grammar(logits: torch.Tensor, matcher) -> None:
    """-inf for every token the request's grammar does not allow next (in place)."""
    import llguidance.torch

    words = llguidance.torch.allocate_token_bitmask(1, logits.numel())
    llguidance.torch.fill_next_token_bitmask(matcher, words, 0)
    allowed = (words[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1  # bit i of word w: token 32w + i
    logits.masked_fill_(allowed.flatten()[:logits.numel()] == 0, _NEG_INF)


def _suppress_stop_tokens(logits: torch.Tensor, seq: Sequence, eos_token_ids: frozenset[int]) -> torch.Tensor:
    if seq.num_output_tokens >= seq.params.min_new_tokens:
        return logits
    banned = list(eos_token_ids | set(seq.params.stop_token_ids))
    masked = logits.clone()
    masked[banned] = _NEG_INF
    return masked


def _argmax(masked: torch.Tensor, raw: torch.Tensor) -> int:
    """The best allowed token; when min_tokens (or NaN) left nothing allowed, the best of all."""
    if bool(torch.isneginf(masked).all()):
        return int(raw.argmax().item())  # may be an all -inf row: still an id in range
    return int(masked.argmax().item())


def _probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor | None:
    """The distribution to draw from after temperature, top-k, min-p and top-p; None when it is degenerate.

    The max is subtracted before scaling, so no finite logit and temperature overflow: the best token
    scales to exactly 0 and the others to <= 0 (-inf at worst, which softmax turns into 0).
    """
    logits = _top_k(logits, params.top_k)
    top = logits.max()
    if not bool(torch.isfinite(top)):
        return None  # every candidate masked, or an infinite logit: the argmax decides
    masked = torch.isneginf(logits)
    # -inf / inf would be NaN, so masked entries are restored rather than scaled.
    scaled = torch.where(masked, _NEG_INF, (logits - top) / params.temperature)
    probs = _top_p(_min_p(torch.softmax(scaled, dim=-1), params.min_p), params.top_p)
    if not (bool(torch.isfinite(probs).all()) and bool(probs.sum() > 0)):
        return None  # cannot happen by the arithmetic above; multinomial must never see it
    return probs


def _top_k(logits: torch.Tensor, top_k: int | None) -> torch.Tensor:
    if top_k is None or top_k >= logits.numel():
        return logits
    # Exactly k candidates even when bfloat16 logits tie at the k-th value.
    values, indices = torch.topk(logits, top_k)
    return torch.full_like(logits, _NEG_INF).scatter_(0, indices, values)


def _min_p(probs: torch.Tensor, min_p: float) -> torch.Tensor:
    """vLLM's min_p: drop tokens less likely than min_p times the most likely one (which stays)."""
    if min_p <= 0.0:
        return probs
    kept = torch.where(probs >= min_p * probs.max(), probs, 0.0)
    return kept / kept.sum()


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(descending=True)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    drop = sorted_probs.cumsum(0) - sorted_probs >= top_p
    sorted_probs[drop] = 0.0
    return torch.zeros_like(probs).scatter_(0, order, sorted_probs)
