"""Lower bounds on step time: a step cannot beat max(bytes / bandwidth, FLOPs / matmul rate)."""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.engine.models.llama import ModelSpec


@dataclass(frozen=True)
class MachineLimits:
    memory_read_gbps: float
    matmul_gflops: float


@dataclass(frozen=True)
class StepCost:
    flops: float
    bytes: float

    def bound_seconds(self, limits: MachineLimits) -> float:
        return max(self.bytes / (limits.memory_read_gbps * 1e9), self.flops / (limits.matmul_gflops * 1e9))


def layer_params(spec: ModelSpec) -> int:
    h, d = spec.hidden_size, spec.head_dim
    attn = h * (spec.num_heads + 2 * spec.num_kv_heads) * d + spec.num_heads * d * h
    return attn + 3 * h * spec.intermediate_size


def weight_bytes(spec: ModelSpec, itemsize: int) -> int:
    """Bytes a forward pass reads from weights: every layer plus the LM head (embedding rows are few)."""
    return (spec.num_layers * layer_params(spec) + spec.vocab_size * spec.hidden_size) * itemsize


def kv_bytes_per_token(spec: ModelSpec, itemsize: int) -> int:
    return spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * itemsize


def prefill_cost(spec: ModelSpec, prompt_lens: list[int], itemsize: int) -> StepCost:
    """Matmul FLOPs of a prefill batch (causal attention counted once) and the bytes it must read."""
    tokens = sum(prompt_lens)
    linear = 2 * tokens * spec.num_layers * layer_params(spec)
    attention = sum(2 * n * n * spec.num_heads * spec.head_dim for n in prompt_lens) * spec.num_layers
    head = 2 * len(prompt_lens) * spec.vocab_size * spec.hidden_size
    written_kv = tokens * kv_bytes_per_token(spec, itemsize)
    return StepCost(flops=linear + attention + head, bytes=weight_bytes(spec, itemsize) + written_kv)


def decode_cost(spec: ModelSpec, context_lens: list[int], itemsize: int) -> StepCost:
    """One decode step: every sequence reads the weights' worth of FLOPs and its whole KV context."""
    batch = len(context_lens)
    linear = 2 * batch * (spec.num_layers * layer_params(spec) + spec.vocab_size * spec.hidden_size)
    attention = sum(4 * c * spec.num_heads * spec.head_dim for c in context_lens) * spec.num_layers
    kv = sum(context_lens) * kv_bytes_per_token(spec, itemsize)
    return StepCost(flops=linear + attention, bytes=weight_bytes(spec, itemsize) + kv)
