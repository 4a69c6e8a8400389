"""Roofline arithmetic on a model whose numbers can be worked by hand."""

import pytest

from splitserve.bench.roofline import (MachineLimits, StepCost, decode_cost, kv_bytes_per_token, layer_params,
                                       prefill_cost, weight_bytes)
from splitserve.engine.models.llama import ModelSpec

SPEC = ModelSpec(architecture="LlamaForCausalLM", vocab_size=100, hidden_size=8, intermediate_size=16,
                 num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4, rms_norm_eps=1e-6, qkv_bias=False,
                 qk_norm=False, tie_word_embeddings=True, max_position_embeddings=64)


def test_parameter_and_byte_counts():
    # q 8x8 + k,v 8x4 each + o 8x8 = 192; mlp 3 * 8 * 16 = 384
    assert layer_params(SPEC) == 576
    assert weight_bytes(SPEC, 2) == (2 * 576 + 100 * 8) * 2
    assert kv_bytes_per_token(SPEC, 2) == 2 * 2 * 1 * 4 * 2


def test_decode_and_prefill_costs():
    d = decode_cost(SPEC, [10, 30], 2)
    assert d.flops == 2 * 2 * (2 * 576 + 800) + (4 * 10 * 8 + 4 * 30 * 8) * 2
    assert d.bytes == weight_bytes(SPEC, 2) + 40 * 32
    p = prefill_cost(SPEC, [3, 5], 2)
    assert p.flops == 2 * 8 * 2 * 576 + (2 * 9 * 8 + 2 * 25 * 8) * 2 + 2 * 2 * 800


def test_bound_is_the_slower_of_memory_and_compute():
    limits = MachineLimits(memory_read_gbps=10, matmul_gflops=100)
    assert StepCost(flops=1e9, bytes=1e9).bound_seconds(limits) == pytest.approx(0.1)
    assert StepCost(flops=50e9, bytes=1e9).bound_seconds(limits) == pytest.approx(0.5)
