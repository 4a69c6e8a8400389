"""Prefill in one engine, move the KV blocks, decode in another: the tokens must not change."""

import pytest

from conftest import make_prompts
from splitserve.engine import EngineConfig, EngineRole, LLMEngine, RequestState, SamplingParams
from splitserve.engine.block_manager import OutOfBlocks
from splitserve.engine.kv_cache import export_bytes

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


def test_reserve_refuses_when_the_decode_cache_is_full(model_fp32, prompts):
    small = engine(model_fp32, EngineRole.DECODE, kv_bytes=4 * 368_640 * 2)  # 8 blocks of fp32
    with pytest.raises(OutOfBlocks):
        small.reserve("r", prompts[2], [1], PARAMS)
    assert small.sequences == {}


def test_import_rejects_a_foreign_layout(model_fp32, prompts):
    decode = engine(model_fp32, EngineRole.DECODE)
    decode.reserve("r", prompts[0], [1], PARAMS)
    wrong = decode.cache.export(decode.blocks.block_table("r")).to(dtype=__import__("torch").bfloat16)
    with pytest.raises(ValueError, match="layout"):
        decode.import_kv("r", wrong)
