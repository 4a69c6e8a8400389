"""The engine's prefix cache: a prompt whose prefix is cached computes only the rest, with the same
greedy output in float32 as without the cache."""

import pytest

from conftest import make_prompts
from splitserve.engine import EngineConfig, EngineRole, LLMEngine, SamplingParams
from splitserve.engine.block_manager import block_hashes, routing_key
from splitserve.engine.request import RequestState

NEW_TOKENS = 6


def greedy(n: int = NEW_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=n, min_new_tokens=n)


def engine(model, *, caching: bool = True, **config) -> LLMEngine:
    config = {"kv_cache_bytes": 64 << 20, **config}
    return LLMEngine(EngineConfig(dtype="float32", enable_prefix_caching=caching, **config), loaded=model)


@pytest.fixture(scope="module")
def system_prompt(model_fp32):
    return make_prompts(model_fp32.tokenizer, [200])[0]


@pytest.fixture(scope="module")
def questions(model_fp32):
    return [q[-30:] for q in make_prompts(model_fp32.tokenizer, [40, 41, 42, 43])]


@pytest.fixture(scope="module")
def uncached(model_fp32, system_prompt, questions):
    """What the engine generates with no cache, for the system prompt alone and with each question."""
    prompts = [system_prompt] + [system_prompt + q for q in questions]
    return dict(zip(["alone", 0, 1, 2, 3], engine(model_fp32, caching=False).generate(prompts, greedy())))


def run_one(eng: LLMEngine, request_id: str, prompt: list[int], **kwargs) -> tuple[list[int], int]:
    """Run one request alone to its end: (its tokens, the prompt tokens the cache supplied)."""
    seq = eng.add_request(request_id, prompt, greedy(), **kwargs)
    while eng.has_work:
        eng.step()
    assert seq.state is RequestState.FINISHED
    return seq.output_token_ids, seq.num_cached_tokens


@pytest.mark.parametrize("chunk_size", [None, 64])
def test_full_and_partial_hits_give_the_uncached_tokens(model_fp32, system_prompt, questions, uncached,
                                                        chunk_size):
    eng = engine(model_fp32, chunk_size=chunk_size)
    assert run_one(eng, "first", system_prompt) == (uncached["alone"], 0)
    # The same prompt again: every full block but the one holding its last token (computed for logits).
    assert run_one(eng, "again", system_prompt) == (uncached["alone"], (200 - 1) // 16 * 16)
    # A longer prompt sharing the system prompt: its 12 full blocks hit (a partial hit of the prompt).
    assert run_one(eng, "q0", system_prompt + questions[0]) == (uncached[0], 192)
    stats = eng.prefix_cache_stats
    assert (stats.queries, stats.hits) == (200 + 200 + 230, 192 + 192)
    assert eng.blocks.num_free_blocks == eng.blocks.num_blocks


@pytest.mark.parametrize("chunk_size", [None, 64])
def test_concurrent_identical_prefixes_are_computed_once(model_fp32, system_prompt, questions, uncached,
                                                         chunk_size):
    """A prompt whose prefix another prompt of the batch is computing waits a step for it (the
    chunked path: until the chunks holding it ran) instead of computing it again."""
    eng = engine(model_fp32, chunk_size=chunk_size)
    seqs = [eng.add_request(f"q{i}", system_prompt + q, greedy()) for i, q in enumerate(questions[:2])]
    twin = eng.add_request("twin", system_prompt + questions[0], greedy())
    while eng.has_work:
        eng.step()
    assert [s.output_token_ids for s in [*seqs, twin]] == [uncached[0], uncached[1], uncached[0]]
    # q1 reuses the system prompt's 12 blocks, the twin all of q0's full blocks but its last token's.
    assert [s.num_cached_tokens for s in [*seqs, twin]] == [0, 192, 224]
    assert eng.prefix_cache_stats.hits == 192 + 224
    assert eng.blocks.num_cached_blocks == 230 // 16 * 2 - 12  # one copy of the shared 12 blocks
    assert run_one(eng, "q2", system_prompt + questions[2]) == (uncached[2], 192)


def test_an_evicted_prefix_is_computed_again_exactly(model_fp32, system_prompt, questions, uncached):
    num_blocks = 24
    eng = engine(model_fp32, kv_cache_bytes=num_blocks * engine(model_fp32).layout.bytes_per_block)
    assert eng.blocks.num_blocks == num_blocks
    run_one(eng, "first", system_prompt + questions[0])
    # An unrelated prompt (another topic) that needs every block evicts every cached one.
    unrelated = make_prompts(model_fp32.tokenizer, [1, num_blocks * 16 - NEW_TOKENS])[1]
    assert run_one(eng, "unrelated", unrelated)[1] == 0
    assert run_one(eng, "q1", system_prompt + questions[1]) == (uncached[1], 0)
    assert run_one(eng, "q2", system_prompt + questions[2]) == (uncached[2], 192)


def test_salted_requests_never_share_blocks(model_fp32, system_prompt, uncached):
    eng = engine(model_fp32)
    assert run_one(eng, "alice-1", system_prompt, cache_salt="alice") == (uncached["alone"], 0)
    assert run_one(eng, "bob-1", system_prompt, cache_salt="bob") == (uncached["alone"], 0)
    assert run_one(eng, "nobody", system_prompt) == (uncached["alone"], 0)
    assert run_one(eng, "alice-2", system_prompt, cache_salt="alice") == (uncached["alone"], 192)


def test_caching_off_reuses_nothing(model_fp32, system_prompt, uncached):
    eng = engine(model_fp32, caching=False)
    run_one(eng, "first", system_prompt)
    assert run_one(eng, "again", system_prompt) == (uncached["alone"], 0)
    assert eng.blocks.num_cached_blocks == 0 and eng.prefix_cache_stats.queries == 0


def test_reset_forgets_the_cached_prefixes(model_fp32, system_prompt, uncached):
    eng = engine(model_fp32)
    run_one(eng, "first", system_prompt)
    assert eng.reset_prefix_cache() == 200 // 16
    assert run_one(eng, "again", system_prompt) == (uncached["alone"], 0)


def test_a_prefill_server_keeps_released_blocks_cached(model_fp32, system_prompt, questions):
    """The blocks a decode server pulled stay cached on the prefill engine, and the next request's
    export carries the same KV whether its prefix came from the cache or not."""
    eng = engine(model_fp32, role=EngineRole.PREFILL)
    plain = engine(model_fp32, role=EngineRole.PREFILL, caching=False)
    prompt = system_prompt + questions[3]
    for e in (eng, plain):
        e.add_request("r1", prompt, greedy())
        e.step()
        e.release("r1")
        e.add_request("r2", prompt, greedy())
        e.step()
    assert eng.sequences["r2"].num_cached_tokens == 224 and plain.sequences["r2"].num_cached_tokens == 0
    cached, computed = eng.export_kv("r2"), plain.export_kv("r2")
    assert (cached - computed).abs().max() < 1e-3


def disaggregated_turn(prefill: LLMEngine, decode: LLMEngine, rid: str, prompt: list[int],
                       **kwargs) -> tuple[list[int], int]:
    """One request through a prefill engine and a decode engine, the decode pulling only the blocks
    its prefix cache lacks: (its tokens, the blocks pulled)."""
    prefill.add_request(rid, prompt, greedy(), **kwargs)
    [first] = prefill.step()
    table = decode.reserve(rid, prompt, [first.token_id], greedy(), **kwargs)
    reused = decode.sequences[rid].num_cached_tokens // decode.blocks.block_size
    pulled = len(table) - reused
    decode.import_kv(rid, prefill.export_kv(rid, reused))
    prefill.release(rid)
    seq = decode.sequences[rid]
    while decode.has_work:
        decode.step()
    assert seq.state is RequestState.FINISHED
    return seq.output_token_ids, pulled


def test_a_decode_engine_keeps_a_finished_turn_and_the_next_pulls_only_the_rest(model_fp32, system_prompt,
                                                                               questions):
    """Multi-turn: the next turn's prompt repeats the whole conversation. The decode engine that ran
    the last turn kept its blocks, outputs included (all but the last token's, never computed), so
    the next turn pulls only the blocks past them, with the same greedy tokens as a full pull."""
    prefill, decode = engine(model_fp32, role=EngineRole.PREFILL), engine(model_fp32, role=EngineRole.DECODE)
    turn1, pulled = disaggregated_turn(prefill, decode, "t1", system_prompt)
    assert pulled == 13  # 200 tokens: every block
    assert decode.blocks.num_cached_blocks == (200 + NEW_TOKENS - 1) // 16  # 12: 205 tokens with KV
    turn2 = system_prompt + turn1 + questions[0]  # 236 tokens
    fresh = engine(model_fp32, role=EngineRole.PREFILL), engine(model_fp32, role=EngineRole.DECODE)
    expected, full = disaggregated_turn(*fresh, "u2", turn2)
    assert full == 15
    tokens, pulled = disaggregated_turn(prefill, decode, "t2", turn2)
    assert (tokens, pulled) == (expected, 15 - 12)
    assert (decode.prefix_cache_stats.queries, decode.prefix_cache_stats.hits) == (200 + 236, 12 * 16)
    # Another tenant's salt shares none of it: a full pull.
    assert disaggregated_turn(prefill, decode, "s2", turn2, cache_salt="other")[1] == 15


def test_a_pull_past_the_request_s_blocks_is_refused(model_fp32, system_prompt):
    prefill = engine(model_fp32, role=EngineRole.PREFILL)
    prefill.add_request("r", system_prompt, greedy())
    prefill.step()
    assert prefill.export_kv("r", 12).shape[2] == 1  # the last of 13 blocks
    with pytest.raises(ValueError, match="holds 13 blocks"):
        prefill.export_kv("r", 13)


def test_the_cached_blocks_keys_are_published_when_the_cache_changes(model_fp32, system_prompt):
    """What a worker lists to its schedulers: the routing key of every cached block, named as any
    engine of the same model, dtype and block size names it."""
    eng = engine(model_fp32)
    version, keys = eng.published_cache(now=True)
    assert keys == [] and eng.cache_namespace == f"{model_fp32.source.name}|float32|16"
    run_one(eng, "a", system_prompt)
    expected = [routing_key(h) for h in block_hashes(system_prompt, 16, None, eng.cache_namespace)]
    later, keys = eng.published_cache(now=True)
    assert later > version and keys == expected  # 12 full blocks: 200 prompt tokens + 5 outputs with KV
    eng.reset_prefix_cache()
    assert eng.published_cache(now=True)[1] == []
