"""One request can only hurt itself (issue 13): a failed engine step fails its own requests, frees
their blocks, and the engine goes on serving the others correctly. When a batched forward pass
raises, its sequences run again one at a time, and only those that raise alone too fail.

No input known today makes a step fail (sampling is total), so the failures here are injected: the
model runner raising for one call or whenever a given request is in its batch, or sampling raising
for one row.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import make_prompts

from splitserve.engine import EngineConfig, FinishReason, LLMEngine, RequestState, SamplingParams
from splitserve.engine import engine as engine_module
from splitserve.engine.block_manager import block_hashes, blocks_for
from splitserve.engine.engine import PROBE_ID, EngineBroken
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


def seq_ids(seqs, tables) -> list[str]:
    return [s.request_id for s in seqs]


def mixed_ids(chunks, decodes, chunk_tables, decode_tables) -> list[str]:
    return [s.request_id for s, _ in chunks] + [s.request_id for s in decodes]


class FailWith:
    """Stands in for a runner method: raises whenever one of the culprits is in the batch it is given,
    and records the request ids of every batch."""

    def __init__(self, fn, culprits: set[str], ids_of=seq_ids) -> None:
        self.fn, self.culprits, self.ids_of = fn, culprits, ids_of
        self.batches: list[list[str]] = []

    def __call__(self, *args):
        ids = self.ids_of(*args)
        self.batches.append(ids)
        if self.culprits & set(ids):
            raise RuntimeError("injected forward failure")
        return self.fn(*args)


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


def tokens(outputs) -> dict[str, int | None]:
    return {o.request_id: o.token_id for o in outputs}


def test_a_failed_prefill_batch_reruns_each_prompt_alone_and_all_survive(model_fp32, prompts, expected,
                                                                         monkeypatch):
    engine = new_engine(model_fp32)
    a = engine.add_request("a", prompts[0], PARAMS)
    engine.step()  # a prefilled, now decoding
    b = engine.add_request("b", prompts[1], PARAMS)
    c = engine.add_request("c", prompts[2], PARAMS)
    flaky = FailFirst(engine.runner.prefill)
    monkeypatch.setattr(engine.runner, "prefill", flaky)

    outputs = engine.step()

    assert flaky.calls == 3  # the batch [b, c], then b alone, then c alone
    assert tokens(outputs) == {"b": expected[None][1][0], "c": expected[None][2][0]}
    assert engine.scheduler.running == [a, b, c] and not engine.scheduler.waiting
    run_all(engine)
    assert [s.output_token_ids for s in (a, b, c)] == expected[None]
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_a_prefill_culprit_fails_alone_and_its_neighbours_match_the_reference(model_fp32, prompts, expected,
                                                                              monkeypatch):
    engine = new_engine(model_fp32)
    poisoned = FailWith(engine.runner.prefill, {"b"})
    monkeypatch.setattr(engine.runner, "prefill", poisoned)
    a = engine.add_request("a", prompts[0], PARAMS)
    b = engine.add_request("b", prompts[1], PARAMS)
    c = engine.add_request("c", prompts[2], PARAMS)

    outputs = engine.step()

    assert poisoned.batches == [["a", "b", "c"], ["a"], ["b"], ["c"]]
    assert_failed(outputs[:1], ["b"])
    assert tokens(outputs[1:]) == {"a": expected[None][0][0], "c": expected[None][2][0]}
    assert b.state is RequestState.FAILED and b.output_token_ids == [] and set(engine.sequences) == {"a", "c"}
    block_size = engine.blocks.block_size
    assert engine.blocks.num_used_blocks == blocks_for(len(prompts[0]), block_size) + blocks_for(
        len(prompts[2]), block_size)
    assert engine.scheduler.running == [a, c] and not engine.scheduler.waiting
    run_all(engine)
    assert [a.output_token_ids, c.output_token_ids] == [expected[None][0], expected[None][2]]
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert engine.generate([prompts[1]], PARAMS) == [expected[None][1]]  # the prompt was never the culprit


def test_a_failed_decode_batch_reruns_each_sequence_alone_and_all_survive(model_fp32, prompts, expected,
                                                                          monkeypatch):
    engine = new_engine(model_fp32)
    a = engine.add_request("a", prompts[0], PARAMS)
    b = engine.add_request("b", prompts[1], PARAMS)
    engine.step()
    flaky = FailFirst(engine.runner.decode)
    monkeypatch.setattr(engine.runner, "decode", flaky)

    outputs = engine.step()

    assert flaky.calls == 3
    assert tokens(outputs) == {"a": expected[None][0][1], "b": expected[None][1][1]}
    run_all(engine)
    assert [a.output_token_ids, b.output_token_ids] == expected[None][:2]
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_a_decode_culprit_fails_alone_and_its_neighbours_match_the_reference(model_fp32, prompts, expected,
                                                                             monkeypatch):
    engine = new_engine(model_fp32)
    a, b, c = (engine.add_request(rid, p, PARAMS) for rid, p in zip("abc", prompts))
    engine.step()  # all three prefilled together, then decoding
    poisoned = FailWith(engine.runner.decode, {"b"})
    monkeypatch.setattr(engine.runner, "decode", poisoned)

    outputs = engine.step()

    assert poisoned.batches == [["a", "b", "c"], ["a"], ["b"], ["c"]]
    assert_failed(outputs[:1], ["b"])
    assert tokens(outputs[1:]) == {"a": expected[None][0][1], "c": expected[None][2][1]}
    assert b.state is RequestState.FAILED and b.output_token_ids == expected[None][1][:1]
    assert engine.scheduler.running == [a, c] and set(engine.sequences) == {"a", "c"}
    block_size = engine.blocks.block_size
    assert engine.blocks.num_used_blocks == sum(blocks_for(len(prompts[i]) + 1, block_size) for i in (0, 2))
    run_all(engine)
    assert [a.output_token_ids, c.output_token_ids] == [expected[None][0], expected[None][2]]
    assert poisoned.batches[4:] == [["a", "c"]] * (PARAMS.max_new_tokens - 2)  # batched again
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def start_mixed(engine: LLMEngine, prompts):
    """a decoding, b part-way through its prompt, c queued behind it (no room left in the step)."""
    a = engine.add_request("a", prompts[0], PARAMS)
    engine.step()  # a's whole prompt in one chunk: a decodes
    b = engine.add_request("b", prompts[2], PARAMS)
    c = engine.add_request("c", prompts[1], PARAMS)
    engine.step()  # a's decode + b's first chunk; no room left for c
    assert b.num_computed_tokens == CHUNK_SIZE - 1 and engine.scheduler.prefilling == [b]
    return a, b, c


def test_a_failed_mixed_step_reruns_each_chunk_and_decode_alone_and_all_survive(model_fp32, prompts, expected,
                                                                                monkeypatch):
    engine = new_engine(model_fp32, CHUNK_SIZE)
    a, b, c = start_mixed(engine, prompts)
    flaky = FailFirst(engine.runner.mixed)
    monkeypatch.setattr(engine.runner, "mixed", flaky)

    outputs = engine.step()  # b's middle chunk samples nothing: only a's token comes out

    assert flaky.calls == 3
    assert tokens(outputs) == {"a": expected[CHUNK_SIZE][0][2]}
    assert b.num_computed_tokens == 2 * (CHUNK_SIZE - 1) and engine.scheduler.prefilling == [b]
    run_all(engine)
    outputs = [s.output_token_ids for s in (a, b, c)]
    assert outputs == [expected[CHUNK_SIZE][0], expected[CHUNK_SIZE][2], expected[CHUNK_SIZE][1]]
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


@pytest.mark.parametrize("culprit", ["a", "b"])  # a is the step's decode, b its prompt chunk
def test_a_mixed_step_culprit_fails_alone_and_the_others_match_the_reference(model_fp32, prompts, expected,
                                                                             monkeypatch, culprit):
    engine = new_engine(model_fp32, CHUNK_SIZE)
    a, b, c = start_mixed(engine, prompts)
    poisoned = FailWith(engine.runner.mixed, {culprit}, ids_of=mixed_ids)
    monkeypatch.setattr(engine.runner, "mixed", poisoned)

    outputs = engine.step()

    assert poisoned.batches == [["b", "a"], ["b"], ["a"]]  # chunks first, then decodes
    assert_failed(outputs[:1], [culprit])
    assert tokens(outputs[1:]) == ({} if culprit == "a" else {"a": expected[CHUNK_SIZE][0][2]})
    failed, survivor = (a, b) if culprit == "a" else (b, a)
    assert failed.state is RequestState.FAILED and set(engine.sequences) == {survivor.request_id, "c"}
    assert failed not in engine.scheduler.running + engine.scheduler.prefilling
    assert engine.blocks.num_used_blocks == blocks_for(survivor.num_tokens, engine.blocks.block_size)
    assert list(engine.scheduler.waiting) == [c] and c.state is RequestState.QUEUED
    run_all(engine)
    want = {"a": expected[CHUNK_SIZE][0], "b": expected[CHUNK_SIZE][2], "c": expected[CHUNK_SIZE][1]}
    assert {s.request_id: s.output_token_ids for s in (survivor, c)} == {
        s.request_id: want[s.request_id] for s in (survivor, c)}
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


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


def test_a_broken_engine_raises_out_of_step_and_fails_no_request(model_fp32, prompts, monkeypatch):
    """Every forward pass failing, a one-token probe included, is the engine's fault (a broken device):
    step raises, so the worker exits and its requests run elsewhere; none of them is failed."""
    engine = new_engine(model_fp32)
    broken = FailFirst(engine.runner.prefill, times=10**6)
    monkeypatch.setattr(engine.runner, "prefill", broken)
    first = engine.add_request("r", prompts[0], PARAMS)
    second = engine.add_request("s", prompts[1], PARAMS)
    with pytest.raises(EngineBroken, match="probe failed too"):
        engine.step()
    assert broken.calls == 4  # the batch, each alone, the probe
    assert first.finish_reason is None and second.finish_reason is None


@pytest.mark.parametrize("lone", [True, False])
def test_culprits_failing_step_after_step_never_stop_the_engine(model_fp32, prompts, expected, monkeypatch,
                                                              lone):
    """A probe runs after each batch that failed for every sequence: requests were the culprits, so
    however many of them come in a row (alone, or in batches of culprits only), only they fail."""
    engine = new_engine(model_fp32)
    runner = FailWith(engine.runner.prefill, {f"bad{i}" for i in range(12)})
    monkeypatch.setattr(engine.runner, "prefill", runner)
    for i in range(0, 12, 2):
        ids = [f"bad{i}"] if lone else [f"bad{i}", f"bad{i + 1}"]
        for request_id, prompt in zip(ids, [prompts[0], prompts[2]]):  # distinct: a twin would wait a step
            engine.add_request(request_id, prompt, PARAMS)
        assert_failed(engine.step(), ids)
        assert runner.batches[-1] == [PROBE_ID]
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    good = engine.add_request("good", prompts[1], PARAMS)
    run_all(engine)
    assert good.output_token_ids == expected[None][1]


def test_the_probe_never_writes_a_cached_block_that_later_requests_reuse(model_fp32, prompts, expected,
                                                                         monkeypatch):
    """A culprit whose prompt starts with a cached prefix: the probe after its failed batch writes a
    slot of the culprit's own last block, not of the shared first one: the cached blocks keep their KV
    bit for bit, and the next request with that prefix gets the reference tokens."""
    engine = new_engine(model_fp32)
    engine.generate([prompts[2]], PARAMS)  # 70 tokens: its first 4 blocks stay cached
    cached = engine.blocks.cached_prefix(block_hashes(prompts[2], engine.blocks.block_size, None,
                                                      engine.cache_namespace))
    kv_before = engine.cache.export(cached).clone()
    runner = FailWith(engine.runner.prefill, {"bad"})
    monkeypatch.setattr(engine.runner, "prefill", runner)
    bad = engine.add_request("bad", prompts[2], PARAMS)
    assert_failed(engine.step(), ["bad"])
    assert bad.num_cached_tokens == 64 and runner.batches[-1] == [PROBE_ID]  # the probe ran
    assert len(cached) == 4 and torch.equal(engine.cache.export(cached), kv_before)
    good = engine.add_request("good", prompts[2], PARAMS)
    run_all(engine)
    assert good.num_cached_tokens == 64 and good.output_token_ids == expected[None][2]


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
