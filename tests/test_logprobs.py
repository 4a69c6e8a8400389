"""Log probabilities from the engine against transformers' in float32: each sampled token's, and
each prompt token's (vLLM's prompt_logprobs) through whole, chunked and batched prefills."""

import pytest
import torch
from conftest import make_prompts

from splitserve.engine import EngineConfig, LLMEngine, SamplingParams

TOP = 5


def run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> list[list]:
    """Every StepOutput of each prompt, all run together."""
    ids = [f"r{i}-{id(params)}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, params)
    outputs = {rid: [] for rid in ids}
    while engine.has_work:
        for out in engine.step():
            outputs[out.request_id].append(out)
    return [outputs[rid] for rid in ids]


@pytest.fixture(scope="module")
def prompts(model_fp32):
    return make_prompts(model_fp32.tokenizer, [9, 70])


@pytest.fixture(scope="module")
def hf_logprobs(hf_fp32, prompts):
    """transformers' log-softmax at every position of each prompt followed by its greedy output."""
    with torch.no_grad():
        greedy = [hf_fp32.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False)[0] for p in prompts]
        return [(seq.tolist(), torch.log_softmax(hf_fp32(seq[None]).logits[0].float(), dim=-1)) for seq in greedy]


@pytest.mark.parametrize("chunk_size", [None, 16])
def test_prompt_and_output_logprobs_equal_transformers(model_fp32, prompts, hf_logprobs, chunk_size):
    engine = LLMEngine(EngineConfig(dtype="float32", kv_cache_bytes=64 << 20, chunk_size=chunk_size),
                       loaded=model_fp32)
    params = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True, logprobs=True, top_logprobs=TOP,
                            prompt_logprobs=TOP)
    for prompt, outputs, (tokens, reference) in zip(prompts, run(engine, prompts, params), hf_logprobs):
        assert [o.token_id for o in outputs] == tokens[len(prompt):]
        scored = outputs[0].prompt_logprobs
        assert len(scored) == len(prompt) - 1 and all(o.prompt_logprobs is None for o in outputs[1:])
        positions = list(range(1, len(prompt))) + list(range(len(prompt), len(tokens)))
        got = list(scored) + [o.logprobs for o in outputs]
        for position, lp in zip(positions, got):
            row = reference[position - 1]  # the logits at position - 1 predict the token at position
            assert lp.logprob == pytest.approx(row[tokens[position]].item(), abs=2e-4)
            assert lp.rank == int((row > row[tokens[position]]).sum()) + 1
            top_values, top_ids = row.topk(TOP)
            assert [t for t, _ in lp.top] == top_ids.tolist()
            assert [v for _, v in lp.top] == pytest.approx(top_values.tolist(), abs=2e-4)


def test_prompt_logprobs_bypass_the_prefix_cache(model_fp32, prompts):
    """A cached prompt has no logits for its cached positions: such a request computes it whole."""
    engine = LLMEngine(EngineConfig(dtype="float32", kv_cache_bytes=64 << 20), loaded=model_fp32)
    plain = SamplingParams(temperature=0.0, max_new_tokens=2)
    scored = SamplingParams(temperature=0.0, max_new_tokens=2, prompt_logprobs=0)
    first = run(engine, [prompts[1]], scored)[0][0]
    run(engine, [prompts[1]], plain)
    assert engine.prefix_cache_stats.hits > 0  # the prompt is cached now
    again = run(engine, [prompts[1]], scored)[0][0]
    assert again.num_cached_tokens == 0
    assert [lp.logprob for lp in again.prompt_logprobs] == [lp.logprob for lp in first.prompt_logprobs]
    assert all(lp.top == () for lp in again.prompt_logprobs)
    one = run(engine, [[prompts[0][0]]], scored)[0][0]
    assert one.prompt_logprobs == ()  # a one-token prompt: nothing before its only token
