"""`splitserve bench serve`'s pure parts: the report's arithmetic, arrivals, workloads, prompts."""

from __future__ import annotations

import json
import statistics
from itertools import pairwise

import numpy as np
import pytest

from splitserve.bench.loadgen.arrivals import ArrivalProcess, arrival_times
from splitserve.bench.loadgen.metrics import Slo, summarize
from splitserve.bench.loadgen.prompts import NONCE_TOKENS, PromptFactory, new_nonce
from splitserve.bench.loadgen.records import RequestRecord
from splitserve.bench.loadgen.sweep import sweep_goodput
from splitserve.bench.loadgen.workloads import WORKLOADS, get_workload, sample_lengths

pytestmark = pytest.mark.timeout(120)


# -- the report on a hand-built timeline ----------------------------------------------------------


def _record(i: int, send: float, chunks: list[float], prompt: int, end: float | None = None,
            error: str | None = None) -> RequestRecord:
    return RequestRecord(i, prompt, len(chunks), scheduled_s=send, send_s=send, chunk_times_s=chunks,
                         end_s=end if end is not None else chunks[-1], prompt_tokens=prompt,
                         completion_tokens=len(chunks) if chunks else None, error=error)


def timeline() -> list[RequestRecord]:
    """r0: TTFT 100, TPOT 100, ITL 100 x3, E2E 400; r1: TTFT 300, TPOT 200, E2E 500;
    r2: one token, TTFT 200, E2E 200; r3 failed at 4.0 s (the last end: duration 4 s)."""
    return [_record(0, 0.0, [0.1, 0.2, 0.3, 0.4], 10, end=0.45),
            _record(1, 1.0, [1.3, 1.5], 20),
            _record(2, 2.0, [2.2], 30),
            _record(3, 3.0, [], 40, end=4.0, error="HTTP 400: too long")]


def test_report_arithmetic_on_a_known_timeline():
    report = summarize(timeline(), Slo(ttft_s=0.25, tpot_s=0.2, target=0.5))
    assert (report.num_requests, report.completed, report.failed) == (4, 3, 1)
    assert report.duration_s == pytest.approx(4.0)
    assert report.request_throughput == pytest.approx(3 / 4)
    assert report.input_token_throughput == pytest.approx((10 + 20 + 30) / 4)  # completed requests only
    assert report.output_token_throughput == pytest.approx((4 + 2 + 1) / 4)
    ttft, tpot, itl, e2e = report.ttft_ms, report.tpot_ms, report.itl_ms, report.e2e_ms
    assert (ttft.count, ttft.mean, ttft.p50, ttft.p90, ttft.p99) == pytest.approx((3, 200, 200, 280, 298))
    assert (tpot.count, tpot.mean, tpot.p50, tpot.p90, tpot.p99) == pytest.approx((2, 150, 150, 190, 199))
    assert (itl.count, itl.mean, itl.p50, itl.p90, itl.p99) == pytest.approx((4, 125, 100, 170, 197))
    assert (e2e.count, e2e.mean, e2e.p50, e2e.p90, e2e.p99) == pytest.approx((3, 1100 / 3, 400, 480, 498))
    assert e2e.p90 == pytest.approx(np.percentile([200, 400, 500], 90))
    slo = report.slo
    # r0 meets both; r1 misses TTFT (300 ms) but meets TPOT (200 ms); r2 has no TPOT (counts as met);
    # r3 failed and misses both.
    assert (slo.ttft_attainment, slo.tpot_attainment, slo.attainment) == pytest.approx((0.5, 0.75, 0.5))
    assert slo.goodput_rps == pytest.approx(2 / 4)
    assert slo.meets_target
    assert not summarize(timeline(), Slo(ttft_s=0.25, tpot_s=0.2, target=0.9)).slo.meets_target
    assert summarize(timeline()).slo is None


def test_report_of_nothing_completed_has_no_latencies():
    report = summarize([_record(0, 0.0, [], 8, end=1.0, error="boom")], Slo(ttft_s=1.0))
    assert (report.completed, report.failed, report.request_throughput) == (0, 1, 0)
    assert report.ttft_ms.count == 0 and report.ttft_ms.p50 is None
    assert report.slo.attainment == 0


def test_record_round_trips_through_json():
    r = timeline()[0]
    data = json.loads(json.dumps(r.to_json()))
    assert data["ttft_s"] == pytest.approx(0.1) and data["tpot_s"] == pytest.approx(0.1)
    assert RequestRecord.from_json(data) == r


def test_sweep_goodput_interpolates_between_last_pass_and_first_fail():
    points = [(3, 0.8), (1, 1.0), (4, 0.95), (2, 0.95)]  # any order; the later pass at 4 does not count
    g = sweep_goodput(points, 0.9)
    assert g.goodput_rps == pytest.approx(2 + (0.95 - 0.9) / (0.95 - 0.8) * (3 - 2))
    assert (g.last_passing_rate, g.first_failing_rate, g.lower_bound_only) == (2, 3, False)
    every_pass = sweep_goodput([(1, 1.0), (2, 0.92)], 0.9)
    assert (every_pass.goodput_rps, every_pass.lower_bound_only) == (2, True)
    first_fails = sweep_goodput([(1, 0.5), (2, 0.2)], 0.9)
    assert first_fails.goodput_rps is None and first_fails.first_failing_rate == 1


# -- arrivals, workloads, prompts -----------------------------------------------------------------


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in pairwise(times)]


def test_poisson_arrivals_have_the_mean_rate_and_are_reproducible():
    times = arrival_times(ArrivalProcess(rate=4.0), seed=7, num_requests=4000)
    gaps = _gaps(times)
    assert times[0] == 0 and times == sorted(times)
    assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.05)
    assert statistics.stdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, rel=0.1)  # exponential: CV 1
    assert arrival_times(ArrivalProcess(4.0), seed=7, num_requests=4000) == times
    assert arrival_times(ArrivalProcess(4.0), seed=8, num_requests=4000) != times


def test_gamma_burstiness_keeps_the_rate_and_changes_the_variance():
    bursty = _gaps(arrival_times(ArrivalProcess(4.0, burstiness=0.25), seed=1, num_requests=8000))
    regular = _gaps(arrival_times(ArrivalProcess(4.0, burstiness=4.0), seed=1, num_requests=8000))
    for gaps in (bursty, regular):
        assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.08)
    # Gamma(shape B): squared coefficient of variation 1/B.
    assert statistics.variance(bursty) / 0.25**2 == pytest.approx(4.0, rel=0.2)
    assert statistics.variance(regular) / 0.25**2 == pytest.approx(0.25, rel=0.2)


def test_arrivals_by_duration_and_infinite_rate():
    times = arrival_times(ArrivalProcess(10.0), seed=0, duration_s=50.0)
    assert max(times) < 50 and len(times) == pytest.approx(500, rel=0.15)
    assert arrival_times(ArrivalProcess(float("inf")), seed=0, num_requests=5) == [0.0] * 5
    with pytest.raises(ValueError, match="exactly one"):
        arrival_times(ArrivalProcess(1.0), seed=0)


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_workload_lengths_are_in_range_with_the_documented_medians(name):
    workload = WORKLOADS[name]
    lengths = sample_lengths(workload, 4000, seed=3)
    for dist, values in ((workload.input, [i for i, _ in lengths]), (workload.output, [o for _, o in lengths])):
        assert dist.min <= min(values) and max(values) <= dist.max
        assert statistics.median(values) == pytest.approx(dist.median, rel=0.1)
        assert len(set(values)) > 10  # a spread, not a constant
    assert sample_lengths(workload, 50, seed=3) == lengths[:50]
    assert sample_lengths(workload, 50, seed=4) != lengths[:50]


def test_documented_workload_table():
    table = {name: (w.input.median, w.input.sigma, w.input.min, w.input.max,
                    w.output.median, w.output.sigma, w.output.min, w.output.max) for name, w in WORKLOADS.items()}
    assert table == {"chatbot": (192, 0.8, 16, 1024, 48, 0.6, 8, 192),
                     "code": (128, 0.5, 32, 512, 24, 0.5, 8, 96),
                     "summarization": (768, 0.4, 256, 1536, 32, 0.5, 8, 96)}


def test_fixed_and_scaled_workloads():
    assert set(sample_lengths(get_workload("fixed", 32, 8), 20, seed=0)) == {(32, 8)}
    scaled = get_workload("chatbot", input_len=384, output_len=24)
    assert (scaled.input.median, scaled.input.min, scaled.input.max) == (384, 32, 2048)
    assert (scaled.output.median, scaled.output.min, scaled.output.max) == (24, 4, 96)
    assert scaled.input.sigma == WORKLOADS["chatbot"].input.sigma
    with pytest.raises(ValueError, match="unknown workload"):
        get_workload("poetry")


def test_prompts_have_exact_lengths_and_are_unique_per_run():
    a = PromptFactory(seed=0, nonce=new_nonce())
    b = PromptFactory(seed=0, nonce=new_nonce())
    prompts = [a.token_ids(i, 64) for i in range(50)]
    assert all(len(p) == 64 and all(1000 <= t < 30000 for t in p) for p in prompts)
    assert len({tuple(p) for p in prompts}) == 50
    assert all(p[:NONCE_TOKENS] == list(a.nonce) for p in prompts)  # the run's nonce starts every prompt
    assert b.token_ids(0, 64)[:NONCE_TOKENS] != prompts[0][:NONCE_TOKENS]  # another run, another prefix
    assert len(a.token_ids(1, 2)) == 2  # shorter than the nonce
    fixed = PromptFactory(seed=5, token_range=(10, 20))
    assert fixed.token_ids(3, 16) == PromptFactory(seed=5, token_range=(10, 20)).token_ids(3, 16)
    assert all(10 <= t < 20 for t in fixed.token_ids(3, 16))
    assert PromptFactory(seed=5, point=1).token_ids(3, 16) != PromptFactory(seed=5).token_ids(3, 16)
    assert len(a.text(0, 30).split()) == 30 and a.text(0, 30) != b.text(0, 30)
