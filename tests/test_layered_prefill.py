"""Layered prefill (--prefill-slice-ms): a prompt that arrives while others decode runs a few layer
parts (a layer's attention, or its MLP) per step, with a decode step of the running sequences
between slices, and gives the same tokens as a whole prefill. An abort or a failure part-way
through a pass hurts only its own request. (Token-for-token agreement with transformers: test_equivalence.py.)"""

from __future__ import annotations

import argparse

import pytest
from conftest import make_prompts

from splitserve.common.engine_args import add_engine_args, engine_config_from_args
from splitserve.engine import EngineConfig, EngineRole, LLMEngine, SamplingParams

ONE_PART = 1e-6  # ms: every slice runs exactly one layer part (each takes longer than this)


def params(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)


def new_engine(model, slice_ms: float | None = ONE_PART) -> LLMEngine:
    return LLMEngine(EngineConfig(dtype="bfloat16", kv_cache_bytes=64 << 20, prefill_slice_ms=slice_ms),
                     loaded=model)


Arrival = tuple[int, str, list[int], int]  # (step, request id, prompt, output tokens)


def run(engine: LLMEngine, arrivals: list[Arrival]) -> tuple[dict[str, list[int]], list[str]]:
    """Add each (step, id, prompt, tokens) at its step; step until idle: the tokens and step kinds."""
    outputs: dict[str, list[int]] = {}
    kinds: list[str] = []
    step = 0
    while arrivals or engine.has_work:
        while arrivals and arrivals[0][0] <= step:
            _, rid, prompt, n = arrivals.pop(0)
            engine.add_request(rid, prompt, params(n))
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out.token_id)
        kinds.append(engine.last_step.kind if engine.last_step else "")
        step += 1
    return outputs, kinds


@pytest.fixture(scope="module")
def prompts(model_bf16):
    return make_prompts(model_bf16.tokenizer, [30, 200, 120])


def test_a_prompt_arriving_while_others_decode_runs_in_slices_with_the_same_tokens(model_bf16, prompts):
    arrivals = [(0, "a", prompts[0], 130), (2, "b", prompts[1], 8), (3, "c", prompts[2], 8)]
    whole, whole_kinds = run(new_engine(model_bf16, None), list(arrivals))
    engine = new_engine(model_bf16)
    layered, kinds = run(engine, list(arrivals))
    assert layered == whole
    assert "prefill_slice" not in whole_kinds
    parts = 2 * model_bf16.spec.num_layers
    # b's pass: one part per slice, each followed by a decode step of a (c waits for b's pass).
    first = kinds.index("prefill_slice")
    assert kinds[first:first + 2 * parts - 1] == (["prefill_slice", "decode"] * parts)[:-1]
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_with_nothing_decoding_a_pass_runs_whole(model_bf16, prompts):
    engine = new_engine(model_bf16)
    _, kinds = run(engine, [(0, "a", prompts[1], 4), (0, "b", prompts[2], 4)])
    assert kinds[0] == "prefill" and "prefill_slice" not in kinds


def test_the_last_decode_finishing_lets_the_rest_of_the_pass_run_at_once(model_bf16, prompts):
    engine = new_engine(model_bf16)
    outputs, kinds = run(engine, [(0, "a", prompts[0], 4), (1, "b", prompts[1], 4)])
    # a has 3 decode steps left when b arrives: b's first 3 slices alternate with them, and its
    # fourth slice runs every layer left.
    first = kinds.index("prefill_slice")
    assert kinds[first:first + 7] == ["prefill_slice", "decode"] * 3 + ["prefill_slice"]
    assert kinds.count("prefill_slice") == 4
    assert len(outputs["b"]) == 4


def test_aborting_a_request_part_way_through_its_pass_frees_its_blocks_after_the_pass(model_bf16, prompts):
    engine = new_engine(model_bf16)
    engine.add_request("a", prompts[0], params(60))
    engine.step()  # a prefilled: it decodes from now on
    engine.add_request("b", prompts[1], params(8))
    engine.add_request("c", prompts[2], params(8))
    engine.step()  # the first slice of b and c's pass
    assert engine.last_step.kind == "prefill_slice"
    free_in_pass = engine.blocks.num_free_blocks
    engine.abort("b")
    # The pass still writes b's KV into its blocks: they must not go to a decode step meanwhile.
    assert engine.blocks.num_free_blocks == free_in_pass
    outputs, _ = run(engine, [])
    assert "b" not in outputs and len(outputs["c"]) == 8
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    # c's tokens are those of c alone.
    alone, _ = run(new_engine(model_bf16, None), [(0, "c", prompts[2], 8)])
    assert outputs["c"] == alone["c"]


def b_aborted_part_way_through_its_pass(model, prompts, a_tokens: int) -> LLMEngine:
    """An engine where a (a_tokens of output) decodes and b, which arrived meanwhile, was aborted
    after the first slice of its layered pass (its blocks free only when the pass ends)."""
    engine = new_engine(model)
    engine.add_request("a", prompts[0], params(a_tokens))
    engine.step()
    engine.add_request("b", prompts[1], params(8))
    engine.step()
    assert engine.last_step.kind == "prefill_slice"
    engine.abort("b")
    return engine


def test_a_request_sent_again_while_its_aborted_copy_s_pass_runs_is_busy_until_the_pass_ends(model_bf16, prompts):
    """A worker dropped and registered again gets its request back while its aborted copy is still
    in the layered pass: that id is busy (RequestIdBusy: the scheduler places it again later), not
    invalid (a ValueError, which failed the request for good); once the pass ended it is taken."""
    from splitserve.engine.request import RequestIdBusy

    engine = b_aborted_part_way_through_its_pass(model_bf16, prompts, a_tokens=40)
    with pytest.raises(RequestIdBusy):
        engine.add_request("b", prompts[1], params(8))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", prompts[0], params(8))  # running, not aborted: never free
    while "b" in engine.sequences:
        engine.step()
    engine.add_request("b", prompts[1], params(8))
    outputs, _ = run(engine, [])
    assert len(outputs["b"]) == 8


def test_a_pass_whose_every_request_was_aborted_ends_at_its_next_step(model_bf16, prompts):
    engine = b_aborted_part_way_through_its_pass(model_bf16, prompts, a_tokens=20)
    outputs, kinds = run(engine, [])
    assert set(outputs) == {"a"} and kinds.count("prefill_slice") == 0  # no layer ran for nobody
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks and not engine.sequences


def test_a_slice_that_raises_runs_its_batch_again_whole(model_bf16, prompts):
    engine = new_engine(model_bf16)
    layered = engine.runner.layered

    def failing_pass(*args, **kwargs):  # its second slice raises
        run = layered(*args, **kwargs)
        advance, slices = run.advance, 0

        def fail_second(until):
            nonlocal slices
            slices += 1
            if slices == 2:
                raise RuntimeError("injected slice failure")
            return advance(until)

        run.advance = fail_second
        return run

    engine.runner.layered = failing_pass
    arrivals = [(0, "a", prompts[0], 10), (1, "b", prompts[1], 6)]
    outputs, kinds = run(engine, list(arrivals))
    whole, _ = run(new_engine(model_bf16, None), list(arrivals))
    assert outputs == whole  # a whole prefill rewrote every KV slot the failed pass had written
    assert kinds.count("prefill_slice") == 1 and kinds.count("prefill") == 2
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


@pytest.mark.parametrize("config, message", [
    ({"prefill_slice_ms": 0.0}, "prefill_slice_ms must be in"),
    ({"prefill_slice_ms": -5.0}, "prefill_slice_ms must be in"),
    ({"prefill_slice_ms": 1e9}, "prefill_slice_ms must be in"),
    ({"prefill_slice_ms": 30.0, "chunk_size": 64}, "without chunked prefill"),
    ({"prefill_slice_ms": 30.0, "role": EngineRole.PREFILL}, "colocated engine"),
])
def test_the_slice_is_checked(config, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**config)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "1e9"])
def test_the_flag_refuses_what_the_engine_cannot_take(value, capsys):
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--prefill-slice-ms", value])
    assert "--prefill-slice-ms" in capsys.readouterr().err
    assert engine_config_from_args(parser.parse_args(["--prefill-slice-ms", "25"])).prefill_slice_ms == 25.0
