"""Attention over the paged KV cache: a batch of fresh prompts (prefill), one token per sequence
(decode), or both in one pass (a mixed step of chunked prefill). Tensors are token-major: q ``[tokens, heads, head_dim]``; caches are
``[num_blocks, num_kv_heads, block_size, head_dim]``."""

from __future__ import annotations

from dataclasses import dataclass

import itertools

import torch
import torch.nn.functional as F


@dataclass
class AttentionBatch:
    """Where a forward pass reads and writes the KV cache.

    slot_mapping[i] is the cache slot (block_id * block_size + offset) of input token i. For prefill,
    query_lens splits the flat token axis into sequences; for decode (one token per sequence),
    block_tables ``[batch, max_blocks]`` and context_lens ``[batch]`` say what each one attends to.
    """

    is_prefill: bool
    slot_mapping: torch.Tensor
    query_lens: list[int] | None = None
    block_tables: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    # A mixed step (chunked prefill): the flat axis holds these prompt chunks first, then one token
    # per decoding sequence, which block_tables / context_lens describe.
    chunks: list[PromptChunk] | None = None


@dataclass(frozen=True)
class PromptChunk:
    """The next num_tokens of a prompt, after prefix_len tokens already in the cache."""

    num_tokens: int
    prefix_len: int
    block_table: torch.Tensor  # [blocks] covering prefix_len + num_tokens positions


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    """Store k, v ``[tokens, kv_heads, head_dim]`` at their slots (block * block_size + offset)."""
    block_size = k_cache.shape[2]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, :, offsets] = k
    v_cache[blocks, :, offsets] = v


def prompt_slices(query_lens: list[int]) -> list[slice]:
    """Where each prompt of a prefill batch sits on the flat token axis."""
    starts = itertools.accumulate(query_lens[:-1], initial=0)
    return [slice(start, start + n) for start, n in zip(starts, query_lens)]


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_lens: list[int], scale: float
) -> torch.Tensor:
    """Causal attention of each prompt over itself (no cached prefix), one SDPA call per prompt."""
    group = q.shape[1] // k.shape[1]
    out_dtype = q.dtype
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # torch's CPU flash kernel runs 10-15% faster in float32 than in bfloat16 (measured on
        # AVX512_BF16 hardware), and the upcast of q/k/v is small next to the L^2 work.
        q, k, v = q.float(), k.float(), v.float()
    if group > 1:
        # SDPA's enable_gqa falls back to the slow math kernel on CPU; expanded heads use flash.
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    outputs = []
    for prompt in prompt_slices(query_lens):
        # [1, heads, n, head_dim]: the CPU flash kernel takes 4-D inputs only.
        qi, ki, vi = (t[prompt].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale)
        outputs.append(out[0].transpose(0, 1))
    out = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    return out.to(out_dtype)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence over its cached context (padded gather, masked softmax)."""
    assert batch.block_tables is not None and batch.context_lens is not None
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    # [B, blocks, Hkv, block_size, D] -> [B, Hkv, T, D]
    k = k_cache[batch.block_tables].transpose(1, 2).flatten(2, 3)
    v = v_cache[batch.block_tables].transpose(1, 2).flatten(2, 3)
    qg = q.view(num_seqs, num_kv_heads, group, head_dim)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # [B, Hkv, G, T]
    positions = torch.arange(scores.shape[-1], device=q.device)
    mask = positions[None, :] >= batch.context_lens[:, None]
    scores.masked_fill_(mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).view(num_seqs, num_heads, head_dim)


def chunk_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, chunk: PromptChunk, scale: float
) -> torch.Tensor:
    """Causal attention of a prompt chunk over its cached prefix and itself.

    The chunk's own K/V were written to the cache before this call, so the whole context is read
    from there. q ``[n, heads, head_dim]`` -> ``[n, heads, head_dim]``.
    """
    n, context = chunk.num_tokens, chunk.prefix_len + chunk.num_tokens
    group = q.shape[1] // k_cache.shape[1]
    # [blocks, Hkv, block_size, D] -> [Hkv, T, D], cut at the context length.
    k = k_cache[chunk.block_table].transpose(0, 1).flatten(1, 2)[:, :context]
    v = v_cache[chunk.block_table].transpose(0, 1).flatten(1, 2)[:, :context]
    out_dtype = q.dtype
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        q, k, v = q.float(), k.float(), v.float()  # as prefill_attention: faster on CPU
    if group > 1:
        k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
    # Query i sits at position prefix_len + i and sees keys 0 .. prefix_len + i.
    rows = torch.arange(n, device=q.device)[:, None] + chunk.prefix_len
    mask = torch.arange(context, device=q.device)[None, :] <= rows
    out = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                         attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1).to(out_dtype)
