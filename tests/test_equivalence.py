"""Our engine against transformers' own implementation of the same checkpoint."""

import pytest
import torch

from conftest import make_prompts
from splitserve.engine import EngineConfig, LLMEngine, SamplingParams
from splitserve.engine.request import Sequence

LENGTHS = [10, 37, 95, 180, 333, 512, 777, 1000]
# The chunked and layered schedules step through their prompts arriving one by one: the first six
# (1,167 tokens, 25 chunks of 48) exercise them as well, at 40% of the cost of all eight.
STAGGERED = 6
NEW_TOKENS = 24
# float32 prefill logits differ from transformers only by summation order (observed ~5e-5).
LOGIT_ATOL = 1e-3


@pytest.fixture(scope="module")
def prompts(model_fp32):
    return make_prompts(model_fp32.tokenizer, LENGTHS)


@pytest.fixture(scope="module")
def hf_greedy(hf_fp32, prompts):
    return [_hf_generate(hf_fp32, p) for p in prompts]


def greedy(n: int) -> SamplingParams:
    # min_new_tokens suppresses EOS exactly as transformers' min_new_tokens does.
    return SamplingParams(temperature=0.0, max_new_tokens=n, min_new_tokens=n)


def test_greedy_mixed_batch_matches_transformers_token_for_token(model_fp32, prompts, hf_greedy):
    engine = LLMEngine(EngineConfig(dtype="float32", token_budget=4096, kv_cache_bytes=256 << 20),
                       loaded=model_fp32)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, greedy(NEW_TOKENS))
    first = engine.step()
    assert len(first) == len(prompts)  # all eight prompts were prefilled in one forward
    seqs = {rid: [] for rid in (f"r{i}" for i in range(len(prompts)))}
    for out in first:
        seqs[out.request_id].append(out.token_id)
    while engine.has_work:
        for out in engine.step():
            seqs[out.request_id].append(out.token_id)
    assert [seqs[f"r{i}"] for i in range(len(prompts))] == hf_greedy
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


@pytest.mark.parametrize("chunk_size", [48])  # chunks longer than a prompt: test_prefix_cache, test_colocated
def test_chunked_prefill_matches_transformers_token_for_token(model_fp32, prompts, hf_greedy, chunk_size):
    """Prompts arrive while others decode; their chunks ride along with the decodes (Sarathi-Serve)."""
    engine = LLMEngine(EngineConfig(dtype="float32", kv_cache_bytes=256 << 20, chunk_size=chunk_size),
                       loaded=model_fp32)
    step_sizes, mixed = [], 0
    run_mixed = engine.runner.mixed

    def recording(chunks, decodes, *tables):
        nonlocal mixed
        step_sizes.append(sum(n for _, n in chunks) + len(decodes))
        mixed += bool(chunks and decodes)
        return run_mixed(chunks, decodes, *tables)

    engine.runner.mixed = recording
    outputs: dict[str, list[int]] = {}
    arrivals = list(enumerate(prompts[:STAGGERED]))
    step = 0
    while arrivals or engine.has_work:
        if arrivals and step % 4 == 0:  # a new prompt every 4 steps
            i, p = arrivals.pop(0)
            engine.add_request(f"r{i}", p, greedy(NEW_TOKENS))
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out.token_id)
        step += 1
    assert [outputs[f"r{i}"] for i in range(STAGGERED)] == hf_greedy[:STAGGERED]
    assert max(step_sizes) <= chunk_size and mixed > 0
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_layered_prefill_matches_transformers_token_for_token(model_fp32, prompts, hf_greedy):
    """Prompts arrive while others decode; their passes run a layer part per step, decode steps between."""
    engine = LLMEngine(EngineConfig(dtype="float32", token_budget=4096, kv_cache_bytes=256 << 20,
                                    prefill_slice_ms=1e-6), loaded=model_fp32)  # one layer part per slice
    outputs: dict[str, list[int]] = {}
    kinds: list[str] = []
    arrivals = list(enumerate(prompts[:STAGGERED]))
    step = 0
    while arrivals or engine.has_work:
        if arrivals and step % 8 == 0:
            i, p = arrivals.pop(0)
            engine.add_request(f"r{i}", p, greedy(NEW_TOKENS))
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out.token_id)
        kinds.append(engine.last_step.kind if engine.last_step else "")
        step += 1
    assert [outputs[f"r{i}"] for i in range(STAGGERED)] == hf_greedy[:STAGGERED]
    # Slices alternate with decode steps: a slice is followed by a decode step while any decodes.
    pairs = list(zip(kinds, kinds[1:]))
    assert pairs.count(("prefill_slice", "decode")) >= model_fp32.spec.num_layers
    assert ("prefill_slice", "prefill_slice") not in pairs[:model_fp32.spec.num_layers]
    assert kinds.count("prefill") == 1  # the first prompt: nothing decoded yet, so it ran whole
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_prefill_logits_match_transformers(model_fp32, hf_fp32, prompts):
    engine = LLMEngine(EngineConfig(dtype="float32", kv_cache_bytes=256 << 20), loaded=model_fp32)
    seqs = [Sequence(f"p{i}", p, SamplingParams()) for i, p in enumerate(prompts[:4])]
    tables = [engine.blocks.allocate(s.request_id, s.num_tokens) for s in seqs]
    ours = engine.runner.prefill(seqs, tables)
    with torch.no_grad():
        ref = torch.stack([hf_fp32(torch.tensor([s.prompt_token_ids])).logits[0, -1] for s in seqs])
    assert torch.allclose(ours, ref, atol=LOGIT_ATOL, rtol=0)


def test_bfloat16_agrees_with_float32_as_often_as_transformers_bfloat16_does(
        model_bf16, prompts, hf_greedy, record_property):
    """bfloat16 flips near-ties in any implementation; ours must not flip more than transformers'."""
    from transformers import AutoModelForCausalLM

    engine = LLMEngine(EngineConfig(dtype="bfloat16", token_budget=4096, kv_cache_bytes=256 << 20),
                       loaded=model_bf16)
    ours = _agreement(engine.generate(prompts, greedy(NEW_TOKENS)), hf_greedy)
    hf_bf16 = AutoModelForCausalLM.from_pretrained(model_bf16.source.path, dtype=torch.bfloat16).eval()
    theirs = _agreement([_hf_generate(hf_bf16, p) for p in prompts], hf_greedy)
    record_property("bf16_token_agreement", ours)
    print(f"tokens equal to float32 transformers: ours in bf16 {ours:.1%}, transformers bf16 {theirs:.1%}")
    assert ours >= theirs - 0.05


def _hf_generate(model, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    return out[0, len(prompt):].tolist()


def _agreement(outs: list[list[int]], refs: list[list[int]]) -> float:
    same = sum(a == b for out, ref in zip(outs, refs) for a, b in zip(out, ref))
    return same / sum(len(r) for r in refs)
