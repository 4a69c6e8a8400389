"""`bench timeline` (inter-token gaps over prompt arrivals), `bench rescore` (saved runs under other
SLOs) and `bench latency` (the engine's floor)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from splitserve.bench.loadgen.metrics import Slo
from splitserve.bench.loadgen.plot import load_sweep
from splitserve.bench.loadgen.rescore import load_points, rescore
from splitserve.bench.loadgen.timeline import load_timeline, timeline_from_records


def _record(index, send, chunks, prompt_tokens):
    return {"index": index, "input_len": prompt_tokens, "output_len": len(chunks), "scheduled_s": send,
            "send_s": send, "chunk_times_s": chunks, "prompt_tokens": prompt_tokens}


RECORDS = [
    _record(0, 0.0, [0.10, 0.12, 0.14, 0.64, 0.66], 16),  # a 500 ms stall while request 1 prefilled
    _record(1, 0.14, [0.64, 0.66, 0.68], 700),
]


def test_gaps_are_placed_at_the_token_that_ended_them():
    timeline = timeline_from_records("colocated", 2.0, RECORDS)
    assert [(t, round(g)) for t, g in timeline.gaps] == [
        (0.12, 20), (0.14, 20), (0.64, 500), (0.66, 20), (0.66, 20), (0.68, 20)]
    assert timeline.arrivals == [(0.0, 16), (0.14, 700)]
    assert timeline.interrupted_share(100.0) == pytest.approx(1 / 6)


def test_the_cli_draws_one_panel_per_file_and_prints_the_stall_share(tmp_path):
    paths = []
    for label in ("colocated", "disaggregated"):
        path = tmp_path / f"{label}.json"
        path.write_text(json.dumps({"config": {"label": label}, "points": [{"rate": 2.0, "records": RECORDS}]}))
        paths.append(path)
    assert load_timeline(paths[0], 2.0).label == "colocated"
    with pytest.raises(ValueError, match="rate 3"):
        load_timeline(paths[0], 3.0)
    out = subprocess.run([sys.executable, "-m", "splitserve.cli", "bench", "timeline", *map(str, paths),
                          "--rate", "2", "--output", str(tmp_path / "t.png"), "--tpot-slo", "0.05"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "colocated: 6 gaps, 16.7% longer than 100 ms" in out.stdout
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_bench_latency_prints_the_engine_s_prefill_and_decode_step():
    out = subprocess.run([sys.executable, "-m", "splitserve.cli", "bench", "latency", "--input-len", "24",
                          "--output-len", "5", "--repeat", "2", "--warmup", "0", "--threads", "1",
                          "--batch", "1", "3"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["prefill_ms"]["count"] == 2 and report["decode_step_ms"]["count"] == 8
    assert 0 < report["decode_step_ms"]["p50"] and 0 < report["prefill_ms"]["p50"]
    # --batch 3: 2 rounds of 3 requests, each decoding its 4 tokens after the first in 4 steps of all 3.
    by_batch = report["decode_step_ms_by_batch"]
    assert by_batch["1"] == report["decode_step_ms"] and by_batch["3"]["count"] == 8


def _run_file(tmp_path, label, points):
    """points: rate -> list of (ttft_s, tpot_s) of its requests, each with 11 output tokens."""
    data = {"config": {"label": label}, "points": []}
    for rate, latencies in points.items():
        records = [_record(i, 0.0, [ttft + k * tpot for k in range(11)], 10) for i, (ttft, tpot) in
                   enumerate(latencies)]
        data["points"].append({"rate": rate, "records": records})
    path = tmp_path / f"{label}.json"
    path.write_text(json.dumps(data))
    return path


def test_rescore_recomputes_attainment_and_goodput_under_new_slos(tmp_path):
    # 10 requests per rate: at rate 2, two of them have a slow first token; at rate 3, eight do.
    fast, slow = (0.1, 0.02), (2.0, 0.02)
    path = _run_file(tmp_path, "run", {1.0: [fast] * 10, 2.0: [fast] * 8 + [slow] * 2, 3.0: [fast] * 2 + [slow] * 8})
    label, points = load_points(path)
    assert label == "run" and [rate for rate, _ in points] == [1.0, 2.0, 3.0]
    sweep, attainments = rescore(points, Slo(ttft_s=1.0, tpot_s=0.05, target=0.9))
    assert attainments == [1.0, 0.8, 0.2]
    assert sweep.goodput_rps == pytest.approx(1.0 + (1.0 - 0.9) / (1.0 - 0.8))  # crosses 90% at 1.5 req/s
    loose, attainments = rescore(points, Slo(ttft_s=3.0, tpot_s=0.05, target=0.9))
    assert attainments == [1.0, 1.0, 1.0] and loose.lower_bound_only
    tight, _ = rescore(points, Slo(ttft_s=1.0, tpot_s=0.01, target=0.9))
    assert tight.goodput_rps is None  # every request misses a 10 ms TPOT
    plotted = load_sweep(path, Slo(ttft_s=1.0, tpot_s=0.05, target=0.9))  # what `bench plot --ttft-slo` draws
    assert plotted.attainment == [1.0, 0.8, 0.2] and plotted.ttft_slo_ms == 1000.0


def test_rescore_cli_prints_each_run_side_by_side(tmp_path):
    a = _run_file(tmp_path, "a", {1.0: [(0.1, 0.02)] * 10, 2.0: [(0.1, 0.04)] * 10})
    b = _run_file(tmp_path, "b", {1.0: [(0.1, 0.02)] * 10, 2.0: [(0.1, 0.02)] * 10})
    out = subprocess.run([sys.executable, "-m", "splitserve.cli", "bench", "rescore", str(a), str(b),
                          "--ttft-slo", "1", "--tpot-slo", "0.03", "0.05", "--output", str(tmp_path / "g.json")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [line.split("\t") for line in out.stdout.splitlines()[2:4]]
    assert rows == [["1", "0.03", "1.10", "2.00+"], ["1", "0.05", "2.00+", "2.00+"]]
    assert len(json.loads((tmp_path / "g.json").read_text())) == 2
