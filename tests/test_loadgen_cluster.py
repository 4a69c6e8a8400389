"""`splitserve bench serve` as a user runs it (a subprocess) against a real local cluster."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from splitserve.bench.loadgen.metrics import summarize
from splitserve.bench.loadgen.records import RequestRecord
from splitserve.bench.loadgen.run import STEPS_LAG_S

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_bench_serve_point_against_the_cluster(ucx_cluster, tmp_path: Path):
    out = tmp_path / "point.json"
    # Earlier tests' steps reach /metrics with the workers' heartbeats: let them land before the
    # point's first scrape, so that the point's figures are its own.
    time.sleep(STEPS_LAG_S)
    argv = [sys.executable, "-m", "splitserve.cli", "bench", "serve", "--url", ucx_cluster.http_url,
            "--num-requests", "4", "--rate", "4", "--input-len", "32", "--output-len", "8", "--seed", "3",
            "--ttft-slo", "5", "--tpot-slo", "1", "--label", "disaggregated", "--output", str(out)]
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4 completed, 0 failed" in done.stdout

    data = json.loads(out.read_text())
    assert data["config"]["model"] == "SmolLM2-135M-Instruct" and data["config"]["label"] == "disaggregated"
    (point,) = data["points"]
    report, records = point["report"], point["records"]
    assert (report["completed"], report["failed"]) == (4, 0)
    for r in records:
        assert r["error"] is None
        assert (r["prompt_tokens"], r["completion_tokens"], r["finish_reason"]) == (32, 8, "length")
        assert r["ttft_s"] > 0 and r["send_s"] >= 0
        assert 1 <= len(r["chunk_times_s"]) <= 8  # a chunk may carry several tokens' text
    recomputed = summarize([RequestRecord.from_json(r) for r in records]).to_json()
    assert report == {**recomputed, "slo": report["slo"]}
    assert report["slo"]["attainment"] == sum(
        r["ttft_s"] <= 5 and r["tpot_s"] <= 1 for r in records) / 4

    # The workers' engine steps over the point, from the gateway's /metrics (issue 17): the prefill
    # server computed the 4 prompts (its first token each), the decode server the 7 tokens left each.
    steps = point["engine_steps"]
    by_kind = {kind: [f for f in steps if f["kind"] == kind] for kind in ("prefill", "decode")}
    assert {f["role"] for f in by_kind["prefill"]} == {"prefill"}
    assert {f["role"] for f in by_kind["decode"]} == {"decode"}
    assert sum(f["tokens"] for f in by_kind["prefill"]) == 4 * 32
    assert sum(f["tokens"] for f in by_kind["decode"]) == 4 * 7
    assert 7 <= sum(f["steps"] for f in by_kind["decode"]) <= 28  # 4 x 7 tokens, batched or not
    assert all(f["mean_ms"] > 0 and 0 < f["cpu_share"] <= 1.05 for f in steps)
    assert "engine steps in the workers" in done.stdout
    # The KV the decode server pulled, from the gateway's kv_transfer_bytes: at least the 4 requests'
    # (earlier tests' requests may end during the point too).
    pulled = re.fullmatch(r"KV pulled: [0-9.]+ MB for (\d+) requests \(([0-9.]+) kB per request\)",
                          point["kv_pulled"])
    assert pulled and int(pulled[1]) >= 4 and float(pulled[2]) > 0
    assert point["kv_pulled"] in done.stdout
