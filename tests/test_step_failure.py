"""One request can only hurt itself (issue 13): a failed engine step fails its own requests, frees
their blocks, and the engine goes on serving the others correctly.

No input known today makes a step fail (sampling is total), so the failures here are injected: the
model runner raising for one step, or sampling raising for one row.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import make_prompts

from splitserve.engine import EngineConfig, FinishReason, LLMEngine, RequestState, SamplingParams
from splitserve.engine import engine as engine_module
from splitserve.engine.block_manager import blocks_for
from splitserve.engine.engine import MAX_FAILED_FORWARDS_IN_A_ROW
from splitserve.worker.engine_loop import EngineLoop

PARAMS = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)
CHUNK_SIZE = 32


def new_engine(model, chunk_size: int | None = None) -> LLMEngine:
    config = EngineConfig(dtype="float32", kv_cache_bytes=64 << 20, chunk_size=chunk_size)
    return LLMEngine(config, loaded=model)


class FailFirst:
    """Stands in for a runner method: the first `times` calls raise, later ones run the real one."""

    def __init__(self, fn, times: int = 1) -> None:
        self.fn, self.times, self.calls = fn, times, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls <= self.times:
            raise RuntimeError("injected forward failure")
        return self.fn(*args, **kwargs)


def run_all(engine: LLMEngine) -> None:
    while engine.has_work:
        engine.step()


@pytest.fixture(scope="module")
def prompts(model_fp32):
    return make_prompts(model_fp32.tokenizer, [23, 40, 70])


@pytest.fixture(scope="module")
def expected(model_fp32, prompts):
    """Each prompt's greedy tokens, alone in a healthy engine, whole-prompt and chunked."""
    return {chunk: [new_engine(model_fp32, chunk).generate([p], PARAMS)[0] for p in prompts]
            for chunk in (None, CHUNK_SIZE)}


def assert_failed(outputs, request_ids: list[str]) -> None:
    assert [o.request_id for o in outputs] == request_ids
    for out in outputs:
        assert out.token_id is None and out.finish_reason is FinishReason.ERROR
        assert out.error == "the engine step failed for this request: RuntimeError: injected forward failure"


def test_a_failed_prefill_fails_exactly_its_batch_and_the_engine_serves_on(model_fp32, prompts, expected,
                                                                            monkeypatch):
    engine = new_engine(model_fp32)
    a = engine.add_request("a", prompts[0], PARAMS)
    engine.step()  # a prefilled, now decoding
    a_blocks = engine.blocks.block_table("a")
    assert len(a_blocks) == blocks_for(len(prompts[0]), engine.blocks.block_size)
    b = engine.add_request("b", prompts[1], PARAMS)
    engine.add_request("c", prompts[2], PARAMS)
    monkeypatch.setattr(engine.runner, "prefill", FailFirst(engine.runner.prefill))

    assert_failed(engine.step(), ["b", "c"])

    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks - len(a_blocks)
    assert engine.blocks.block_table("a") == a_blocks
    assert engine.scheduler.running == [a] and not engine.scheduler.waiting
    assert set(engine.sequences) == {"a"}
    assert b.state is RequestState.FAILED and b.output_token_ids == [] and b.is_finished
    engine.add_request("b", prompts[1], PARAMS)  # the id is free again; the prompt runs afresh
    run_all(engine)
    assert a.output_token_ids == expected[None][0]
    assert engine.generate([prompts[2]], PARAMS) == [expected[None][2]]
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_a_failed_decode_step_fails_every_running_request_and_frees_all_blocks(model_fp32, prompts, expected,
                                                                                monkeypatch):
    engine = new_engine(model_fp32)
    engine.add_request("a", prompts[0], PARAMS)
    engine.add_request("b", prompts[1], PARAMS)
    engine.step()
    monkeypatch.setattr(engine.runner, "decode", FailFirst(engine.runner.decode))

    assert_failed(engine.step(), ["a", "b"])

    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert not engine.has_work and not engine.sequences
    assert engine.generate(prompts[:2], PARAMS) == expected[None][:2]


def test_a_failed_mixed_step_fails_its_decodes_and_chunks_and_leaves_the_queue(model_fp32, prompts, expected,
                                                                               monkeypatch):
    engine = new_engine(model_fp32, CHUNK_SIZE)
    a = engine.add_request("a", prompts[0], PARAMS)
    engine.step()  # a's whole prompt in one chunk: a decodes
    b = engine.add_request("b", prompts[2], PARAMS)
    c = engine.add_request("c", prompts[1], PARAMS)
    engine.step()  # a's decode + b's first chunk; no room left for c
    assert b.num_computed_tokens == CHUNK_SIZE - 1 and engine.scheduler.prefilling == [b]
    monkeypatch.setattr(engine.runner, "mixed", FailFirst(engine.runner.mixed))

    assert_failed(engine.step(), ["b", "a"])  # chunks first, then decodes, as the step ran them

    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks  # c holds nothing until scheduled
    assert not engine.scheduler.running and not engine.scheduler.prefilling
    assert list(engine.scheduler.waiting) == [c] and c.state is RequestState.QUEUED
    assert a.state is RequestState.FAILED and b.state is RequestState.FAILED
    run_all(engine)
    assert c.output_token_ids == expected[CHUNK_SIZE][1]
    again = engine.generate([prompts[2], prompts[0]], PARAMS)
    assert again == [expected[CHUNK_SIZE][2], expected[CHUNK_SIZE][0]]


def test_a_sampling_failure_fails_only_its_own_request(model_fp32, prompts, expected, monkeypatch):
    def sample_one(logits, seq, eos_token_ids, generator):
        if seq.request_id == "bad":
            raise ValueError("injected sampling failure")
        return real(logits, seq, eos_token_ids, generator)

    real = engine_module.sample_one
    monkeypatch.setattr(engine_module, "sample_one", sample_one)
    engine = new_engine(model_fp32)
    good = engine.add_request("good", prompts[0], PARAMS)
    # Sampled, not greedy: the batched greedy pass would choose its token without sample_one.
    engine.add_request("bad", prompts[1], SamplingParams(temperature=0.8, max_new_tokens=10, seed=1))

    outputs = {o.request_id: o for o in engine.step()}

    assert outputs["good"].token_id == expected[None][0][0] and outputs["good"].finish_reason is None
    bad = outputs["bad"]
    assert bad.token_id is None and bad.finish_reason is FinishReason.ERROR
    assert bad.error == "the engine step failed for this request: ValueError: injected sampling failure"
    assert engine.blocks.num_used_blocks == blocks_for(len(prompts[0]), engine.blocks.block_size)
    run_all(engine)
    assert good.output_token_ids == expected[None][0]


def test_forward_passes_failing_batch_after_batch_raise_out_of_step(model_fp32, prompts, monkeypatch):
    """A device that fails every batch is the engine's fault: the worker must exit, not fail them all."""
    engine = new_engine(model_fp32)
    broken = FailFirst(engine.runner.prefill, times=10**6)
    monkeypatch.setattr(engine.runner, "prefill", broken)
    for i in range(MAX_FAILED_FORWARDS_IN_A_ROW - 1):
        engine.add_request(f"r{i}", prompts[0], PARAMS)
        assert_failed(engine.step(), [f"r{i}"])
    engine.add_request("last", prompts[0], PARAMS)
    with pytest.raises(RuntimeError, match="forward passes in a row failed"):
        engine.step()


def test_a_successful_forward_resets_the_count_of_failures(model_fp32, prompts, monkeypatch):
    engine = new_engine(model_fp32)
    flaky = FailFirst(engine.runner.prefill, times=MAX_FAILED_FORWARDS_IN_A_ROW - 1)
    monkeypatch.setattr(engine.runner, "prefill", flaky)
    for i in range(MAX_FAILED_FORWARDS_IN_A_ROW - 1):
        engine.add_request(f"r{i}", prompts[0], PARAMS)
        engine.step()
    engine.generate([prompts[0]], PARAMS)  # succeeds
    flaky.calls, flaky.times = 0, MAX_FAILED_FORWARDS_IN_A_ROW - 1
    engine.add_request("again", prompts[0], PARAMS)
    assert_failed(engine.step(), ["again"])  # a fresh count: not raised


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1e-40, max_new_tokens=10, ignore_eos=True),
    SamplingParams(temperature=1e-6, max_new_tokens=10, ignore_eos=True, seed=4),
])
def test_a_tiny_temperature_is_greedy_in_the_engine(model_fp32, prompts, expected, params):
    assert new_engine(model_fp32).generate([prompts[0]], params) == [expected[None][0]]


def test_extreme_temperatures_give_tokens_and_all_nan_logits_fail_alone(model_fp32, prompts, monkeypatch):
    engine = new_engine(model_fp32)
    vocab = model_fp32.spec.vocab_size
    for temperature in (1e-5, 1e-4, 1e30, float("inf")):
        params = SamplingParams(temperature=temperature, top_k=50, top_p=0.5, max_new_tokens=6,
                                min_new_tokens=6)
        [tokens] = engine.generate([prompts[0]], params)
        assert len(tokens) == 6 and all(0 <= t < vocab for t in tokens)
    nan_rows = lambda seqs, tables: torch.full((len(seqs), vocab), float("nan"))  # noqa: E731
    monkeypatch.setattr(engine.runner, "prefill", nan_rows)
    engine.add_request("nan", prompts[0], SamplingParams(temperature=0.8, max_new_tokens=4))
    [out] = engine.step()
    assert out.finish_reason is FinishReason.ERROR and out.token_id is None and "NaN" in out.error
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_the_engine_thread_keeps_serving_after_a_failed_step(model_fp32, prompts, expected, monkeypatch):
    """What a worker sees: the failed request's ERROR output, then the same thread serves the next one."""
    engine = new_engine(model_fp32)
    monkeypatch.setattr(engine.runner, "prefill", FailFirst(engine.runner.prefill))

    async def scenario() -> list[int]:
        steps: asyncio.Queue = asyncio.Queue()
        loop = EngineLoop(engine, on_step=steps.put_nowait)
        loop.start()
        await loop.call(lambda e: e.add_request("poison", prompts[0], PARAMS))
        assert_failed((await asyncio.wait_for(steps.get(), 30)).outputs, ["poison"])
        await loop.call(lambda e: e.add_request("next", prompts[0], PARAMS))
        tokens = []
        while len(tokens) < PARAMS.max_new_tokens:
            tokens += [o.token_id for o in (await asyncio.wait_for(steps.get(), 30)).outputs]
        assert not loop.failed.done()
        await asyncio.wait_for(loop.stop(), 10)
        return tokens

    assert asyncio.run(scenario()) == expected[None][0]
