"""Sampling is total: any row of logits and any valid parameters give a token id in range (issue 13).

No model here: rows of logits are made up, extreme values, infinities and NaN included.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from splitserve.engine.request import SAMPLING_EPS, SamplingParams, Sequence
from splitserve.engine.sampler import plain_greedy_tokens, sample, sample_one

INF, NAN = math.inf, math.nan
EXTREMES = [INF, -INF, NAN, 3.4e38, -3.4e38, 1e-45, -1e-45, 0.0, 88.7, -88.7, 1e6]

logit = st.one_of(st.floats(width=32), st.sampled_from(EXTREMES))
rows = st.lists(logit, min_size=1, max_size=48)
temperatures = st.one_of(
    st.sampled_from([0.0, 1e-40, 1e-6, SAMPLING_EPS, 1e-4, 1.0, 1e30, INF]),
    st.floats(min_value=0.0, max_value=1e-3),
    st.floats(min_value=0.0, allow_nan=False),  # infinity included
)


@st.composite
def sequences(draw, vocab: int) -> Sequence:
    """A sequence with random valid sampling parameters and some tokens already out."""
    token = st.integers(0, vocab - 1)
    max_new_tokens = draw(st.integers(1, 8))
    params = SamplingParams(
        temperature=draw(temperatures),
        top_p=draw(st.floats(min_value=0.0, max_value=1.0, exclude_min=True)),
        top_k=draw(st.one_of(st.none(), st.integers(1, vocab + 4))),
        max_new_tokens=max_new_tokens,
        min_new_tokens=draw(st.integers(0, max_new_tokens)),
        stop_token_ids=tuple(draw(st.lists(token, max_size=vocab))),
    )
    output = draw(st.lists(token, max_size=max_new_tokens - 1))
    return Sequence("r", [1], params, output_token_ids=output, seed=draw(st.integers(0, 2**62)))


@st.composite
def cases(draw) -> tuple[list[float], Sequence, frozenset[int]]:
    row = draw(rows)
    eos = frozenset(draw(st.lists(st.integers(0, len(row) - 1), max_size=3)))
    return row, draw(sequences(len(row))), eos


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_any_row_and_valid_params_give_an_allowed_token_in_range(case):
    row, seq, eos = case
    assume(not all(math.isnan(v) for v in row))  # a row of NaN alone holds no choice: see below
    logits = torch.tensor(row, dtype=torch.float32)
    before = logits.clone()
    token = sample_one(logits, seq, eos, torch.Generator())
    assert 0 <= token < len(row)
    assert torch.equal(logits.nan_to_num(), before.nan_to_num())  # the engine's logits are not touched
    held_back = seq.num_output_tokens < seq.params.min_new_tokens
    banned = eos | set(seq.params.stop_token_ids) if held_back else set()
    allowed = [i for i, v in enumerate(row) if i not in banned and v > -INF]  # NaN > -inf is False
    if allowed:  # something could be chosen: never a banned, -inf or NaN token
        assert token in allowed


@settings(max_examples=200, deadline=None)
@given(rows, st.integers(0, 2**62), temperatures)
def test_a_bfloat16_row_is_sampled_as_well(row, seed, temperature):
    assume(not all(math.isnan(v) for v in row))
    seq = Sequence("r", [1], SamplingParams(temperature=temperature), seed=seed)
    token = sample_one(torch.tensor(row).to(torch.bfloat16), seq, frozenset(), torch.Generator())
    assert 0 <= token < len(row)


@pytest.mark.parametrize("temperature", [1e-40, 1e-6, 0.99 * SAMPLING_EPS])
def test_a_temperature_below_the_epsilon_is_greedy(temperature):
    params = SamplingParams(temperature=temperature)
    assert params.greedy
    logits = torch.tensor([0.0, 2.0, 1.9, -1.0])
    seqs = [Sequence("r", [1], params, seed=s) for s in range(20)]
    assert {sample_one(logits, s, frozenset(), torch.Generator()) for s in seqs} == {1}


def test_a_temperature_at_the_epsilon_samples_and_is_as_good_as_greedy():
    params = SamplingParams(temperature=SAMPLING_EPS)
    assert not params.greedy
    logits = torch.tensor([0.0, 2.0, 1.999, -1.0])  # a margin of 1e-3 is 100 after scaling
    seqs = [Sequence("r", [1], params, seed=s) for s in range(20)]
    assert {sample_one(logits, s, frozenset(), torch.Generator()) for s in seqs} == {1}


def test_a_huge_temperature_draws_uniformly_from_the_unmasked_tokens():
    params = SamplingParams(temperature=1e30, min_new_tokens=1, max_new_tokens=4)
    logits = torch.tensor([50.0, -50.0, 0.0, -INF, 3.0])
    seqs = [Sequence("r", [1], params, seed=s) for s in range(200)]
    picks = {sample_one(logits, s, frozenset({4}), torch.Generator()) for s in seqs}
    assert picks == {0, 1, 2}  # never -inf, never the EOS held back by min_tokens


def test_min_tokens_masking_every_candidate_falls_back_to_the_best_token():
    params = SamplingParams(temperature=0.7, min_new_tokens=2, max_new_tokens=4, stop_token_ids=(0, 1))
    seq = Sequence("r", [1], params, seed=3)
    assert sample_one(torch.tensor([1.0, 5.0, -INF]), seq, frozenset({2}), torch.Generator()) == 1


def test_nan_logits_from_the_model_never_win():
    logits = torch.tensor([NAN, 1.0, NAN, 0.5])
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_p=0.5, top_k=3)):
        seqs = [Sequence("r", [1], params, seed=s) for s in range(30)]
        assert {sample_one(logits, s, frozenset(), torch.Generator()) for s in seqs} <= {1, 3}


def test_an_infinite_logit_is_chosen_whatever_the_temperature():
    logits = torch.tensor([1.0, INF, 3.0])
    seq = Sequence("r", [1], SamplingParams(temperature=1e-4, top_p=0.3), seed=1)
    assert sample_one(logits, seq, frozenset(), torch.Generator()) == 1


def test_seeded_draws_repeat_and_follow_the_seed():
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, top_p=0.9)
    seqs = [Sequence(f"r{i}", [1], params, seed=i) for i in range(4)]
    first = sample(logits, seqs, frozenset(), torch.Generator())
    assert sample(logits, seqs, frozenset(), torch.Generator()) == first
    reseeded = [Sequence(f"r{i}", [1], params, seed=i + 100) for i in range(4)]
    assert sample(logits, reseeded, frozenset(), torch.Generator()) != first


def test_a_row_of_nan_alone_fails_its_request_rather_than_picking_token_0():
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_p=0.5)):
        with pytest.raises(ValueError, match="NaN"):
            sample_one(torch.full((8,), NAN), Sequence("r", [1], params), frozenset(), torch.Generator())


def test_the_batched_greedy_pass_leaves_nan_rows_and_a_banned_best_to_sample_one():
    logits = torch.tensor([[0.0, 2.0, 1.0], [NAN, 5.0, 1.0], [0.0, 2.0, 1.0], [0.0, 2.0, 1.0]])
    plain, needs_min = (SamplingParams(temperature=0.0, max_new_tokens=4, min_new_tokens=m) for m in (0, 2))
    seqs = [Sequence("a", [1], plain), Sequence("b", [1], plain), Sequence("c", [1], needs_min),
            Sequence("d", [1], SamplingParams(temperature=1.0))]
    # Below min_tokens, a best token that is EOS (1 here) must be masked: sample_one decides.
    assert plain_greedy_tokens(logits, seqs, frozenset({1})) == [1, None, None, None]
    # A best that no stop rule bans is the masked row's argmax as well: the batched pass keeps it.
    assert plain_greedy_tokens(logits, seqs, frozenset({2})) == [1, None, 1, None]
    stop_at_1 = SamplingParams(temperature=0.0, max_new_tokens=4, min_new_tokens=2, stop_token_ids=(1,))
    assert plain_greedy_tokens(logits[2:3], [Sequence("e", [1], stop_at_1)], frozenset({2})) == [None]


def test_the_batched_greedy_pass_agrees_with_sample_one_below_min_tokens():
    generator = torch.Generator().manual_seed(3)
    eos = frozenset({0, 5})
    for trial in range(200):
        logits = torch.randint(-3, 4, (6, 12), generator=generator).float()  # many ties
        logits[trial % 6, trial % 12] = float("-inf")
        params = SamplingParams(temperature=0.0, max_new_tokens=8, min_new_tokens=4,
                                stop_token_ids=(trial % 12,))
        seqs = [Sequence(f"r{i}", [1], params, output_token_ids=[7] * (i % 6)) for i in range(6)]
        for row, token in enumerate(plain_greedy_tokens(logits, seqs, eos)):
            expected = sample_one(logits[row], seqs[row], eos, torch.Generator())
            assert token in (None, expected)
            banned = eos | {trial % 12}
            if seqs[row].num_output_tokens < 4 and int(logits[row].argmax()) in banned:
                assert token is None and expected not in banned


def test_a_nan_temperature_is_refused():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=NAN)
