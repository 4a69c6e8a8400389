"""Our torch implementation of the Llama-family decoder (Llama incl. Llama-3 RoPE, Mistral, Qwen2,
Qwen3), reading transformers' weights by name. q/k/v and gate/up projections are fused at load."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from splitserve.engine.attention import AttentionBatch
from splitserve.engine.kv_cache import KVCache
from splitserve.engine.ops import Linear, TorchOps, rms_norm

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class UnsupportedModel(ValueError):
    """The checkpoint's architecture or options are outside what this engine implements."""


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a Llama-family model, read from a transformers config."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qkv_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    # Attention window of Mistral / sliding-window Qwen; we implement full attention, so the
    # engine caps the context here (identical results up to the window).
    sliding_window: int | None = None

    @property
    def max_context(self) -> int:
        """The longest context served exactly: the position limit, or the window if smaller."""
        return min(self.max_position_embeddings, self.sliding_window or self.max_position_embeddings)

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelSpec:
        arch = (getattr(config, "architectures", None) or ["LlamaForCausalLM"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModel(
                f"architecture {arch} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        rope_type = rope_parameters(config).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModel(
                f"rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        num_heads = config.num_attention_heads
        return cls(
            architecture=arch,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
            rms_norm_eps=config.rms_norm_eps,
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(getattr(config, "attention_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            max_position_embeddings=config.max_position_embeddings,
            sliding_window=_sliding_window(config, arch),
        )


def _sliding_window(config: Any, arch: str) -> int | None:
    if arch.startswith("Qwen") and not getattr(config, "use_sliding_window", False):
        return None
    return getattr(config, "sliding_window", None)


def rope_parameters(config: Any) -> dict:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(params)


def rope_cos_sin(config: Any, spec: ModelSpec, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[max_positions, head_dim]`` computed exactly as transformers does."""
    params = rope_parameters(config)
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        dim = spec.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        scaling = 1.0
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    positions = torch.arange(spec.max_position_embeddings, dtype=torch.float)
    freqs = positions[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, ops: TorchOps) -> None:
        super().__init__()
        self.spec = spec
        self.ops = ops
        self.q_size = spec.num_heads * spec.head_dim
        self.kv_size = spec.num_kv_heads * spec.head_dim
        self.qkv = Linear(spec.hidden_size, self.q_size + 2 * self.kv_size, bias=spec.qkv_bias)
        self.o_proj = Linear(self.q_size, spec.hidden_size, bias=False)
        self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.scale = spec.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv: tuple[torch.Tensor, torch.Tensor],
        batch: AttentionBatch,
    ) -> torch.Tensor:
        spec = self.spec
        q, k, v = self.ops.linear(x, self.qkv).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, spec.num_heads, spec.head_dim)
        k = k.view(-1, spec.num_kv_heads, spec.head_dim)
        v = v.view(-1, spec.num_kv_heads, spec.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.ops.rope_write_kv(q, k, v, *cos_sin, kv[0], kv[1], batch.slot_mapping)
        if batch.chunks is not None:
            out = self.ops.mixed_attention(q, k, v, kv[0], kv[1], batch, self.scale)
        elif batch.is_prefill:
            assert batch.query_lens is not None
            out = self.ops.prefill_attention(q, k, v, batch.query_lens, self.scale)
        else:
            out = self.ops.decode_attention(q, kv[0], kv[1], batch, self.scale)
        return self.ops.linear(out.reshape(-1, self.q_size), self.o_proj)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, ops: TorchOps) -> None:
        super().__init__()
        self.ops = ops
        self.gate_up = Linear(spec.hidden_size, 2 * spec.intermediate_size, bias=False)
        self.down_proj = Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(self.ops.silu_mul(self.ops.linear(x, self.gate_up)), self.down_proj)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, ops: TorchOps) -> None:
        super().__init__()
        self.ops = ops
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, ops)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec, ops)

    def forward(self, residual, normed, cos_sin, kv, batch: AttentionBatch, next_norm: RMSNorm):
        """Takes the residual stream and its input-normed copy; returns both for the next layer
        (the residual add is fused with the next norm: next_norm is the next layer's input norm)."""
        residual, normed = self.attention_part(residual, normed, cos_sin, kv, batch)
        return self.mlp_part(residual, normed, next_norm)

    def attention_part(self, residual, normed, cos_sin, kv, batch: AttentionBatch):
        """The layer's first half: attention and its residual add, normed for the MLP."""
        attn = self.self_attn(normed, cos_sin, kv, batch)
        return self.ops.add_rmsnorm(residual, attn, self.post_attention_layernorm)

    def mlp_part(self, residual, normed, next_norm: RMSNorm):
        """The layer's second half: the MLP and its residual add, normed for the next layer."""
        return self.ops.add_rmsnorm(residual, self.mlp(normed), next_norm)


@dataclass
class LayerState:
    """A forward pass between two layer parts (each layer's attention, then its MLP): the residual
    stream, its normed copy and the next part to run. A layered prefill keeps one across steps."""

    cos_sin: tuple[torch.Tensor, torch.Tensor]
    residual: torch.Tensor
    normed: torch.Tensor
    next_part: int = 0  # layer i's attention is part 2i, its MLP part 2i + 1


class LlamaModel(nn.Module):
    """Decoder stack plus LM head. forward() returns hidden states; logits() projects chosen rows."""

    def __init__(self, spec: ModelSpec, ops: TorchOps) -> None:
        super().__init__()
        self.spec = spec
        self.ops = ops
        # Given an empty weight: the default normal_ init imports torch._dynamo (~1 s per process),
        # and the checkpoint overwrites it anyway.
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size,
                                         _weight=torch.empty(spec.vocab_size, spec.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(spec, ops) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.tie_weights()
        self.rope_cos = torch.empty(0)
        self.rope_sin = torch.empty(0)

    def set_rope(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Install the cos/sin tables (see rope_cos_sin); kept apart from the weights."""
        self.rope_cos, self.rope_sin = cos, sin

    def tie_weights(self) -> None:
        if self.spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch, cache: KVCache
    ) -> torch.Tensor:
        state = self.embed(input_ids, positions)
        # A decode step, or a chunked engine's step that holds no prompt chunk, may run every layer at once.
        if batch.is_prefill or batch.chunks or not self.ops.decode_layers(self, state, batch, cache):
            self.run_parts(state, self.num_parts, batch, cache)
        return state.normed

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> LayerState:
        """The pass's state before layer 0: forward() is embed() and then every layer."""
        cos_sin = (self.rope_cos[positions], self.rope_sin[positions])
        residual, normed = self.ops.add_rmsnorm(self.embed_tokens(input_ids), None, self.layers[0].input_layernorm)
        return LayerState(cos_sin, residual, normed)

    @property
    def num_parts(self) -> int:
        return 2 * len(self.layers)

    def run_parts(self, state: LayerState, count: int, batch: AttentionBatch, cache: KVCache) -> bool:
        """Run the next count layer parts (fewer at the end) of a pass; True once the last has run,
        when state.normed holds the final hidden states (the last MLP applies the final norm)."""
        stop = min(state.next_part + count, self.num_parts)
        for part in range(state.next_part, stop):
            i, mlp = divmod(part, 2)
            layer = self.layers[i]
            if mlp:
                next_norm = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
                state.residual, state.normed = layer.mlp_part(state.residual, state.normed, next_norm)
            else:
                state.residual, state.normed = layer.attention_part(
                    state.residual, state.normed, state.cos_sin, cache.layer(i), batch)
        state.next_part = stop
        return stop == self.num_parts

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(hidden, self.lm_head)
