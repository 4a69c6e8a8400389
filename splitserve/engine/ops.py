"""The model's hot operations, behind one interface with two implementations.

TorchOps is the reference: plain torch, any device and dtype, and in float32 the same arithmetic
as transformers. CpuKernelOps runs the compiled bfloat16 kernels (kernels/cpu_bf16.cpp) on CPUs
with AVX512_BF16 and checks itself against TorchOps in the tests.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from splitserve.engine.attention import (AttentionBatch, PromptChunk, chunk_attention, decode_attention,
                                        prefill_attention, prompt_slices, write_kv)
from splitserve.engine.sampler import argmax_rows


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same order of operations as transformers, so float32 results match bit for bit.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[tokens, heads, head_dim]``; cos/sin ``[tokens, head_dim]``."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class TorchOps:
    name = "torch"

    def prepare(self, model: torch.nn.Module) -> None:
        """Transform loaded weights into whatever layout linear() reads (nothing to do here)."""

    def linear(self, x: torch.Tensor, layer) -> torch.Tensor:
        return F.linear(x, layer.weight, layer.bias)

    def add_rmsnorm(self, residual: torch.Tensor, delta: torch.Tensor | None, norm) -> tuple[torch.Tensor, torch.Tensor]:
        """residual + delta (if given) and its RMS norm: the residual stream and the next input."""
        if delta is not None:
            residual = residual + delta
        return residual, rms_norm(residual, norm.weight, norm.eps)

    def rope_write_kv(self, q, k, v, cos, sin, k_cache, v_cache, slots) -> tuple[torch.Tensor, torch.Tensor]:
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        write_kv(k_cache, v_cache, k, v, slots)
        return q, k

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def decode_attention(self, q, k_cache, v_cache, batch: AttentionBatch, scale: float) -> torch.Tensor:
        return decode_attention(q, k_cache, v_cache, batch, scale)

    def argmax_rows(self, logits: torch.Tensor) -> torch.Tensor:
        """Each row's first argmax, -1 for a row holding a NaN (sampler.argmax_rows)."""
        return argmax_rows(logits)

    def decode_layers(self, model, state, batch: AttentionBatch, cache) -> bool:
        """Run every decoder layer of a decode step at once, leaving the final-normed hidden states
        in state.normed, and return True; False (nothing run) where these ops cannot, and the model
        then runs its layers one by one."""
        return False

    def prefill_attention(self, q, k, v, query_lens: list[int], scale: float) -> torch.Tensor:
        return prefill_attention(q, k, v, query_lens, scale)

    def chunk_attention(self, q, k_cache, v_cache, chunk, scale: float) -> torch.Tensor:
        return chunk_attention(q, k_cache, v_cache, chunk, scale)

    def mixed_attention(self, q, k, v, k_cache, v_cache, batch: AttentionBatch, scale: float) -> torch.Tensor:
        """A mixed step: prompt chunks (a chunk with no cached prefix is a plain prefill), then decodes."""
        outputs, start = [], 0
        for chunk in batch.chunks:
            part = slice(start, start + chunk.num_tokens)
            if chunk.prefix_len == 0:
                outputs.append(self.prefill_attention(q[part], k[part], v[part], [chunk.num_tokens], scale))
            else:
                outputs.append(self.chunk_attention(q[part], k_cache, v_cache, chunk, scale))
            start = part.stop
        if start < q.shape[0]:
            outputs.append(self.decode_attention(q[start:], k_cache, v_cache, batch, scale))
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def tiles_kv(self, block_size: int) -> bool:
        """Whether a KV cache of this block size holds its blocks in the kernels' tiled layout
        (cpu_bf16.cpp, decode_attention) instead of plain ``[block_size, head_dim]`` rows."""
        return False

    def retile_kv(self, blocks: torch.Tensor, to_tiled: bool) -> None:
        """Rewrite KV blocks ``[..., 2, n, kv_heads, block_size, head_dim]`` in place, between plain
        rows and the tiled layout."""
        raise NotImplementedError("these ops keep KV blocks in plain rows")


class CpuKernelOps(TorchOps):
    name = "cpu-bf16-kernels"
    # Decode steps run every layer in one kernel call (decode_layers); False runs them layer by
    # layer in Python, on the same kernels (for comparisons: scripts/decode-layers-ab.py).
    fused_decode = True

    def __init__(self, kernels) -> None:
        self.k = kernels
        # Each KV cache's DecodeLayers (None: its layers run one by one), gone with the cache.
        self._decode_stacks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def prepare(self, model: torch.nn.Module) -> None:
        """Pack every linear weight into GEMM tiles and drop the unpacked copy (bar a tied head)."""
        tied = model.lm_head.weight is model.embed_tokens.weight
        for module in model.modules():
            if isinstance(module, Linear):
                module.packed = self.k.pack_weight(module.weight.data)
                if not (tied and module is model.lm_head):
                    module.weight.data = torch.empty(0, dtype=module.weight.dtype)

    def linear(self, x: torch.Tensor, layer) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = self.k.gemm(flat, layer.packed, layer.out_features, layer.bias)
        return out.view(*x.shape[:-1], layer.out_features)

    def add_rmsnorm(self, residual, delta, norm):
        return residual, self.k.add_rmsnorm(residual, delta, norm.weight, norm.eps)

    def tiles_kv(self, block_size: int) -> bool:
        return block_size % 16 == 0

    def retile_kv(self, blocks, to_tiled):
        self.k.retile_kv(blocks, to_tiled)

    def rope_write_kv(self, q, k, v, cos, sin, k_cache, v_cache, slots):
        if not self.tiles_kv(k_cache.shape[2]):
            return super().rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots)
        self.k.rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots)
        return q, k

    def silu_mul(self, gate_up):
        return self.k.silu_mul(gate_up)

    def use_kernels(self, kernels) -> None:
        """Run on another build of the kernels from the next step on (the scripts that time two
        revisions' kernels in one engine): the DecodeLayers built by the old build go with it, or
        decode steps would keep running its kernels."""
        self.k = kernels
        self._decode_stacks.clear()

    def decode_layers(self, model, state, batch, cache) -> bool:
        """The kernels' DecodeLayers: the layers' own kernels in the same order, so the same bits,
        without the Python between them. Built once per cache (and let go with it); models with q/k
        norms or norms of different eps, and caches in plain rows, run layer by layer."""
        if not self.fused_decode:
            return False
        if cache not in self._decode_stacks:
            self._decode_stacks[cache] = self._build_decode_layers(model, cache)
        stack = self._decode_stacks[cache]
        if stack is None:
            return False
        state.normed = stack.run(state.residual, state.normed, *state.cos_sin, batch.slot_mapping,
                                 batch.block_tables, batch.context_lens)
        state.next_part = model.num_parts
        return True

    def _build_decode_layers(self, model, cache):
        spec, layers = model.spec, model.layers
        norms = [norm for layer in layers for norm in (layer.input_layernorm, layer.post_attention_layernorm)]
        if (spec.qk_norm or not self.tiles_kv(cache.layout.block_size)
                or len({norm.eps for norm in [*norms, model.norm]}) != 1):
            return None
        no_bias = torch.empty(0, dtype=torch.bfloat16)
        attn = [layer.self_attn for layer in layers]
        return self.k.DecodeLayers(
            [a.qkv.packed for a in attn], [no_bias if a.qkv.bias is None else a.qkv.bias for a in attn],
            [a.o_proj.packed for a in attn], [layer.mlp.gate_up.packed for layer in layers],
            [layer.mlp.down_proj.packed for layer in layers],
            [layer.post_attention_layernorm.weight for layer in layers],
            [layer.input_layernorm.weight for layer in layers[1:]] + [model.norm.weight],
            [cache.layer(i)[0] for i in range(len(layers))], [cache.layer(i)[1] for i in range(len(layers))],
            spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.hidden_size, spec.intermediate_size,
            model.norm.eps, attn[0].scale)

    def decode_attention(self, q, k_cache, v_cache, batch, scale):
        if not self.tiles_kv(k_cache.shape[2]):
            return super().decode_attention(q, k_cache, v_cache, batch, scale)
        return self.k.decode_attention(q, k_cache, v_cache, batch.block_tables, batch.context_lens, scale)

    def prefill_attention(self, q, k, v, query_lens, scale):
        if q.shape[-1] % 64:
            return super().prefill_attention(q, k, v, query_lens, scale)
        outs = [self.k.prefill_attention(q[p], k[p], v[p], scale) for p in prompt_slices(query_lens)]
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def chunk_attention(self, q, k_cache, v_cache, chunk, scale):
        if not self.tiles_kv(k_cache.shape[2]):
            return super().chunk_attention(q, k_cache, v_cache, chunk, scale)
        k, v = plain_blocks(self, k_cache, v_cache, chunk.block_table)
        if q.shape[-1] % 64:
            whole = PromptChunk(chunk.num_tokens, chunk.prefix_len, torch.arange(len(chunk.block_table)))
            return super().chunk_attention(q, k, v, whole, scale)
        # [blocks, Hkv, block_size, D] -> [keys, Hkv, D], token-major like a prompt's own k and v.
        context = chunk.prefix_len + chunk.num_tokens
        k = k.transpose(1, 2).flatten(0, 1)[:context]
        v = v.transpose(1, 2).flatten(0, 1)[:context]
        return self.k.prefix_attention(q, k, v, chunk.prefix_len, scale)

    def argmax_rows(self, logits):
        kernel_dtype = logits.dtype in (torch.float32, torch.bfloat16)
        if not kernel_dtype or logits.device.type != "cpu" or not logits.shape[-1]:
            return super().argmax_rows(logits)
        return self.k.argmax_rows(logits)


def plain_blocks(ops: TorchOps, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of the given blocks of tiled K and V caches in plain rows, each
    ``[len(block_ids), kv_heads, block_size, head_dim]``."""
    blocks = k_cache.new_empty((2, len(block_ids), *k_cache.shape[1:]))
    torch.index_select(k_cache, 0, block_ids, out=blocks[0])
    torch.index_select(v_cache, 0, block_ids, out=blocks[1])
    ops.retile_kv(blocks, False)
    return blocks[0], blocks[1]


class Linear(torch.nn.Module):
    """y = x W^T + b, with W stored as transformers names it and, for kernels, a packed copy."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features))
        self.bias = torch.nn.Parameter(torch.empty(out_features)) if bias else None
        self.packed: torch.Tensor | None = None


def select_ops(device: torch.device, dtype: torch.dtype, head_dim: int, group: int) -> TorchOps:
    """The fastest implementation that supports this model, device and dtype."""
    from splitserve.engine.kernels import kernels_enabled, load_cpu_kernels

    if device.type != "cpu" or dtype != torch.bfloat16 or head_dim % 32 or head_dim > 256 or group > 16:
        return TorchOps()
    kernels = load_cpu_kernels() if kernels_enabled() else None
    return CpuKernelOps(kernels) if kernels is not None else TorchOps()
