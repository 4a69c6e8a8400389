"""Prefill in one engine, move the KV blocks, decode in another: the tokens must not change."""

import pytest

from conftest import make_prompts
from splitserve.engine import EngineConfig, EngineRole, LLMEngine, RequestState, SamplingParams
from splitserve.engine.block_manager import OutOfBlocks
from splitserve.engine.kernels import kernels_enabled
from splitserve.engine.kv_cache import export_bytes
from splitserve.engine.loader import LoadedModel

PARAMS = SamplingParams(temperature=0.0, max_new_tokens=20, ignore_eos=True)


def engine(loaded, role: EngineRole, kv_bytes: int = 64 << 20) -> LLMEngine:
    return LLMEngine(EngineConfig(dtype="float32", role=role, kv_cache_bytes=kv_bytes), loaded=loaded)


@pytest.fixture(scope="module")
def prompts(model_fp32):
    return make_prompts(model_fp32.tokenizer, [23, 150, 400])


def test_export_import_across_engines_gives_the_same_tokens(model_fp32, prompts):
    expected = engine(model_fp32, EngineRole.COLOCATED).generate(prompts, PARAMS)

    prefill = engine(model_fp32, EngineRole.PREFILL)
    decode = engine(model_fp32, EngineRole.DECODE)
    decode.blocks.allocate("someone-else", 40)  # so destination block ids differ from the source's
    for i, p in enumerate(prompts):
        prefill.add_request(f"r{i}", p, PARAMS)
    first = {o.request_id: o.token_id for o in prefill.step()}
    assert all(s.state is RequestState.KV_READY for s in prefill.sequences.values())
    for i, p in enumerate(prompts):
        rid = f"r{i}"
        blocks = prefill.export_kv(rid)
        dest = decode.reserve(rid, p, [first[rid]], PARAMS)
        assert dest != prefill.blocks.block_table(rid)
        decode.import_kv(rid, blocks)
        prefill.release(rid)
    assert prefill.blocks.num_free_blocks == prefill.blocks.num_blocks

    got = {f"r{i}": [first[f"r{i}"]] for i in range(len(prompts))}
    while decode.has_work:
        for out in decode.step():
            got[out.request_id].append(out.token_id)
    assert [got[f"r{i}"] for i in range(len(prompts))] == expected
    assert decode.blocks.num_used_blocks == 3  # only "someone-else" still holds blocks


def test_blocks_travel_as_raw_bytes(model_fp32, prompts):
    prefill = engine(model_fp32, EngineRole.PREFILL)
    decode = engine(model_fp32, EngineRole.DECODE)
    prefill.add_request("r", prompts[1], PARAMS)
    (first,) = prefill.step()
    blocks = prefill.export_kv("r")
    payload = export_bytes(blocks)
    assert len(payload) == len(prefill.blocks.block_table("r")) * prefill.layout.bytes_per_block
    decode.reserve("r", prompts[1], [first.token_id], PARAMS)
    decode.cache.import_bytes(decode.blocks.block_table("r"), payload)
    exported_again = decode.cache.export(decode.blocks.block_table("r"))
    assert exported_again.equal(blocks)


def test_reserve_refuses_when_the_decode_cache_is_full_and_fails_what_never_fits(model_fp32, prompts):
    """Full now is OutOfBlocks (the decode server retries when blocks free); more than the whole
    cache is ValueError (the request fails). Before, both were OutOfBlocks: a request that could
    never fit waited at the head of the decode server's queue, and every request behind it, for good."""
    small = engine(model_fp32, EngineRole.DECODE, kv_bytes=4 * 368_640 * 2)  # 4 blocks of fp32
    small.blocks.allocate("someone-else", 40)  # 3 of them
    with pytest.raises(OutOfBlocks):
        small.reserve("r", prompts[0], [1], PARAMS)  # 23 + 1 tokens now: 2 blocks
    with pytest.raises(ValueError, match="whole cache holds 4"):
        small.reserve("r", prompts[2], [1], PARAMS)  # 400 + 20 tokens: 27 blocks
    assert small.sequences == {}
    small.blocks.free("someone-else")
    small.reserve("r", prompts[0], [1], PARAMS)


def test_import_rejects_a_foreign_layout(model_fp32, prompts):
    decode = engine(model_fp32, EngineRole.DECODE)
    decode.reserve("r", prompts[0], [1], PARAMS)
    wrong = decode.cache.export(decode.blocks.block_table("r")).to(dtype=__import__("torch").bfloat16)
    with pytest.raises(ValueError, match="layout"):
        decode.import_kv("r", wrong)


def test_seeded_sampling_is_the_same_colocated_and_disaggregated(model_fp32, prompts):
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=11, max_new_tokens=12, ignore_eos=True)
    expected = engine(model_fp32, EngineRole.COLOCATED).generate([prompts[0]], params)[0]
    prefill, decode = engine(model_fp32, EngineRole.PREFILL), engine(model_fp32, EngineRole.DECODE)
    prefill.add_request("r", prompts[0], params)
    (first,) = prefill.step()
    decode.reserve("r", prompts[0], [first.token_id], params)
    decode.import_kv("r", prefill.export_kv("r"))
    prefill.release("r")
    got = [first.token_id]
    while decode.has_work:
        got += [o.token_id for o in decode.step()]
    assert got == expected


def test_a_decode_engine_recomputes_what_it_preempts(model_fp32, prompts):
    """Two requests that outgrow a small decode cache: one is preempted, recomputed, and both
    still produce exactly the colocated tokens."""
    params = PARAMS  # 20 tokens: the second request needs its 11th block after 10 of them
    expected = engine(model_fp32, EngineRole.COLOCATED).generate(prompts[:2], params)
    prefill = engine(model_fp32, EngineRole.PREFILL)
    block_bytes = prefill.layout.bytes_per_block
    need = sum(-(-(len(p) + 1) // 16) for p in prompts[:2])  # both fit at import ...
    decode = engine(model_fp32, EngineRole.DECODE, kv_bytes=(need + 1) * block_bytes)  # ... not at +20
    preempted, preempt = [], decode.scheduler._preempt
    decode.scheduler._preempt = lambda seq: preempted.append(seq.request_id) or preempt(seq)
    got = {}
    for i, p in enumerate(prompts[:2]):
        prefill.add_request(f"r{i}", p, params)
        (first,) = prefill.step()
        decode.reserve(f"r{i}", p, [first.token_id], params)
        decode.import_kv(f"r{i}", prefill.export_kv(f"r{i}"))
        prefill.release(f"r{i}")
        got[f"r{i}"] = [first.token_id]
    preempted_before = decode.scheduler.waiting
    steps = 0
    while decode.has_work and steps < 500:
        steps += 1
        for out in decode.step():
            got[out.request_id].append(out.token_id)
    assert [got["r0"], got["r1"]] == expected
    assert preempted, "nothing was preempted: the test no longer tests recomputation"
    assert decode.blocks.num_used_blocks == 0 and not preempted_before


def test_lifecycle_misuse_gets_clear_errors_and_changes_nothing(model_fp32, prompts):
    prefill, decode = engine(model_fp32, EngineRole.PREFILL), engine(model_fp32, EngineRole.DECODE)
    with pytest.raises(ValueError, match="decode engine takes requests"):
        decode.add_request("x", prompts[0], PARAMS)
    prefill.add_request("done", prompts[0], SamplingParams(temperature=0.0, max_new_tokens=1))
    prefill.add_request("held", prompts[1], PARAMS)
    prefill.step()
    with pytest.raises(ValueError, match="holds no KV blocks"):
        prefill.export_kv("done")  # finished at its first token: nothing was kept
    prefill.release("done")  # harmless
    blocks = prefill.export_kv("held")
    with pytest.raises(ValueError, match="already finished"):
        decode.reserve("y", prompts[1], [5] * 20, PARAMS)  # max_new_tokens already reached
    decode.reserve("held", prompts[1], [7], PARAMS)
    decode.import_kv("held", blocks)
    with pytest.raises(ValueError, match="no reserved blocks"):
        decode.import_kv("held", blocks)  # a retried pull must not add it twice
    assert len(decode.scheduler.running) == 1
    prefill.release("held")
    assert prefill.blocks.num_used_blocks == 0


def test_reserve_respects_max_num_seqs(model_fp32, prompts):
    decode = LLMEngine(EngineConfig(dtype="float32", role=EngineRole.DECODE, max_num_seqs=1,
                                    kv_cache_bytes=64 << 20), loaded=model_fp32)
    decode.reserve("a", prompts[0], [1], PARAMS)
    with pytest.raises(OutOfBlocks, match="decode batch is full"):
        decode.reserve("b", prompts[0], [1], PARAMS)


@pytest.mark.skipif(not kernels_enabled(), reason="this CPU has no AVX512_BF16")
def test_bfloat16_engines_on_the_kernels_move_plain_blocks(model_bf16, monkeypatch):
    """On the kernels a cache keeps its blocks tiled, but they leave and arrive in plain rows: a
    kernel engine's export matches an engine on torch ops (the kernels off), and a request prefilled
    on one kernel engine decodes on another to the colocated engine's tokens."""
    prompts = make_prompts(model_bf16.tokenizer, [23, 150])

    def bf16_engine(loaded, role):
        return LLMEngine(EngineConfig(dtype="bfloat16", role=role, kv_cache_bytes=64 << 20), loaded=loaded)

    expected = bf16_engine(model_bf16, EngineRole.COLOCATED).generate(prompts, PARAMS)
    prefill, decode = bf16_engine(model_bf16, EngineRole.PREFILL), bf16_engine(model_bf16, EngineRole.DECODE)
    assert prefill.cache.retile is not None and decode.cache.retile is not None
    monkeypatch.setenv("SPLITSERVE_KERNELS", "0")
    on_torch = LoadedModel.load(EngineConfig(dtype="bfloat16"))
    plain = bf16_engine(on_torch, EngineRole.PREFILL)
    assert plain.cache.retile is None
    decode.blocks.allocate("someone-else", 40)
    for i, p in enumerate(prompts):
        prefill.add_request(f"r{i}", p, PARAMS)
        plain.add_request(f"r{i}", p, PARAMS)
    first = {o.request_id: o.token_id for o in prefill.step()}
    plain.step()
    for i, p in enumerate(prompts):
        rid = f"r{i}"
        blocks, reference = prefill.export_kv(rid).float(), plain.export_kv(rid).float()
        # Other arithmetic (the kernels' GEMMs), the same tokens' K and V: close, where a block in
        # another layout would put other tokens' and dims' values side by side.
        assert (blocks - reference).abs().mean() < 0.1 * reference.abs().mean()
        decode.reserve(rid, p, [first[rid]], PARAMS)
        decode.import_kv(rid, prefill.export_kv(rid))
    got = {f"r{i}": [first[f"r{i}"]] for i in range(len(prompts))}
    while decode.has_work:
        for out in decode.step():
            got[out.request_id].append(out.token_id)
    assert [got[f"r{i}"] for i in range(len(prompts))] == expected
