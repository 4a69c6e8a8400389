"""The engine step histograms (issue 17): recorded per kind and batch class on the engine thread,
checked at the scheduler, read back by `bench serve` from the gateway's /metrics; and the engine
built on a thread that leaves no OpenMP team behind."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from splitserve.bench.loadgen.steps import (StepFigures, format_kv_pulled, parse_kv_pulled, parse_steps,
                                            point_steps)
from splitserve.common.step_stats import (
    BATCH_CLASSES,
    STEP_BUCKETS,
    StepStats,
    batch_class,
    batch_label,
    check_step_histograms,
)
from splitserve.services.gateway.metrics import GatewayMetrics
from splitserve.v1 import common_pb2 as pb
from splitserve.v1 import scheduler_pb2 as spb


def test_batch_classes_are_powers_of_two_with_an_open_top():
    assert [batch_class(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 64, 65, 128, 129, 1000)] == \
        [1, 2, 3, 3, 5, 5, 9, 9, 17, 17, 33, 33, 65, 65, 129, 129]
    assert [batch_label(b) for b in BATCH_CLASSES] == ["1", "2", "3-4", "5-8", "9-16", "17-32", "33-64",
                                                      "65-128", "129+"]


def test_steps_land_in_their_series_and_bucket():
    stats = StepStats()
    stats.record("decode", 1, 1, 0.0125, 0.012)  # on a bound: Prometheus's le is inclusive
    stats.record("decode", 1, 1, 0.0126, 0.010)
    stats.record("decode", 4, 4, 7.0, 6.0)  # past the last bound: the open bucket
    stats.record("prefill", 2, 512, 0.4, 0.38)
    stats.record("mixed", 3, 70, 0.05, 0.05)
    stats.record("prefill_slice", 1, 0, 0.03, 0.03)
    by_key = {(h.kind, h.batch_min): h for h in stats.to_proto()}
    assert sorted(by_key) == [(pb.STEP_KIND_PREFILL, 2), (pb.STEP_KIND_DECODE, 1), (pb.STEP_KIND_DECODE, 3),
                              (pb.STEP_KIND_MIXED, 3), (pb.STEP_KIND_PREFILL_SLICE, 1)]
    one = by_key[(pb.STEP_KIND_DECODE, 1)]
    assert list(one.counts).index(1) == STEP_BUCKETS.index(0.0125)
    assert one.counts[STEP_BUCKETS.index(0.015)] == 1 and sum(one.counts) == 2
    assert one.wall_s == pytest.approx(0.0251) and one.cpu_s == pytest.approx(0.022) and one.num_tokens == 2
    assert by_key[(pb.STEP_KIND_DECODE, 3)].counts[-1] == 1
    assert by_key[(pb.STEP_KIND_PREFILL, 2)].num_tokens == 512
    check_step_histograms(stats.to_proto())  # what a worker makes passes the scheduler's check


@pytest.mark.parametrize("bad, fragment", [
    (dict(kind=0), "unknown"), (dict(batch_min=4), "unknown"), (dict(counts=[0] * 22), "23"),
    (dict(counts=[0] * 22 + [-1]), "negative"), (dict(wall_s=float("inf")), "finite"),
    (dict(cpu_s=-1.0), "finite"), (dict(num_tokens=-5), "finite"),
])
def test_histograms_a_worker_could_not_have_made_are_refused(bad, fragment):
    fields = dict(kind=pb.STEP_KIND_DECODE, batch_min=1, counts=[0] * 23, wall_s=0.0, cpu_s=0.0, num_tokens=0)
    with pytest.raises(ValueError, match=fragment):
        check_step_histograms([pb.StepHistogram(**{**fields, **bad})])


def test_the_gateway_exports_what_bench_serve_reads_back():
    stats = StepStats()
    for wall in (0.010, 0.012, 0.020):
        stats.record("decode", 2, 2, wall, wall * 0.9)
    metrics = GatewayMetrics()
    worker = spb.WorkerState(worker=spb.WorkerInfo(instance_id="colocated-0", role=spb.WORKER_ROLE_COLOCATED),
                             stats=pb.WorkerStats(steps=stats.to_proto()))
    metrics.update_cluster(spb.ClusterState(workers=[worker]))
    before = parse_steps(metrics.render().decode())
    key = ("colocated-0", "colocated", "decode", "2")
    assert before == {key: (3, pytest.approx(0.042), pytest.approx(0.0378), 6)}
    stats.record("decode", 2, 2, 0.030, 0.015)
    stats.record("prefill", 1, 100, 0.2, 0.2)
    worker.stats.CopyFrom(pb.WorkerStats(steps=stats.to_proto()))
    metrics.update_cluster(spb.ClusterState(workers=[worker]))
    point = point_steps(before, parse_steps(metrics.render().decode()))
    assert [(f.kind, f.batch, f.steps, f.tokens) for f in point] == [("decode", "2", 1, 2), ("prefill", "1", 1, 100)]
    assert point[0].mean_ms == pytest.approx(30) and point[0].to_json()["cpu_share"] == pytest.approx(0.5)
    # A worker that started again counts from zero; a page with no step metric is not splitserve's.
    restarted = {("colocated-0", "colocated", "decode", "2"): (1, 0.01, 0.01, 2)}
    assert point_steps(before, restarted) == [StepFigures("colocated-0", "colocated", "decode", "2", 1, 0.01, 0.01, 2)]
    assert parse_steps("# HELP vllm:num_requests_running x\n# TYPE vllm:num_requests_running gauge\n"
                       "vllm:num_requests_running 0.0\n") is None


def test_bench_serve_reads_the_kv_pulled_per_request():
    metrics = GatewayMetrics()
    before = parse_kv_pulled(metrics.render().decode())
    assert before == (0, 0.0)
    for num_bytes in (368_640, 1_105_920):  # one block, three blocks of the default model
        metrics.observe_timeline(pb.Timeline(kv_transfer_bytes=num_bytes))
    metrics.observe_timeline(pb.Timeline())  # a colocated request: nothing pulled
    after = parse_kv_pulled(metrics.render().decode())
    assert after == (2, 1_474_560.0)
    assert format_kv_pulled(before, after) == "KV pulled: 1.5 MB for 2 requests (737.3 kB per request)"
    assert format_kv_pulled(after, after) is None


def test_the_engine_records_what_each_step_ran(model_bf16):
    from splitserve.engine import EngineConfig, LLMEngine, SamplingParams

    def engine_factory(chunk_size):
        return LLMEngine(EngineConfig(kv_cache_bytes=64 << 20, chunk_size=chunk_size), loaded=model_bf16)

    engine = engine_factory(chunk_size=None)
    engine.add_request("a", list(range(100, 140)), SamplingParams(max_new_tokens=3, ignore_eos=True))
    engine.add_request("b", list(range(200, 210)), SamplingParams(max_new_tokens=3, ignore_eos=True))
    shapes = []
    while engine.has_work:
        engine.step()
        shapes.append(engine.last_step)
    assert [(s.kind, s.num_seqs, s.num_tokens) for s in shapes] == [("prefill", 2, 50), ("decode", 2, 2),
                                                                     ("decode", 2, 2)]
    chunked = engine_factory(chunk_size=16)
    chunked.add_request("c", list(range(100, 140)), SamplingParams(max_new_tokens=2, ignore_eos=True))
    kinds = []
    while chunked.has_work:
        chunked.step()
        kinds.append((chunked.last_step.kind, chunked.last_step.num_tokens))
    assert kinds == [("mixed", 16), ("mixed", 16), ("mixed", 8), ("decode", 1)]
    layered = LLMEngine(EngineConfig(kv_cache_bytes=64 << 20, prefill_slice_ms=1e-6), loaded=model_bf16)
    layered.add_request("d", list(range(100, 110)), SamplingParams(max_new_tokens=4, ignore_eos=True))
    layered.step()  # d prefilled whole (nothing decoding): it decodes from now on
    layered.add_request("e", list(range(300, 340)), SamplingParams(max_new_tokens=1, ignore_eos=True))
    kinds = []
    while layered.has_work:
        layered.step()
        kinds.append((layered.last_step.kind, layered.last_step.num_seqs, layered.last_step.num_tokens))
    # e's pass a layer per slice between d's three decode steps, then the rest at once; its
    # tokens count on the slice that ends it
    assert kinds == [("prefill_slice", 1, 0), ("decode", 1, 1)] * 3 + [("prefill_slice", 1, 40)]


# Run in a fresh process: the test process's own threads have run torch already.
OPENMP_TEAMS = r"""
import asyncio, json, os, sys, threading
import torch
torch.set_num_threads(2)
from splitserve.engine.config import EngineConfig
from splitserve.worker.engine_loop import load_engine

def threads():
    return len(os.listdir("/proc/self/task"))

async def main():
    await asyncio.to_thread(lambda: None)  # the executor thread load_engine joins on exists already
    before = threads()
    if sys.argv[1] == "to_thread":  # a thread that stays runs a parallel region: its team stays too
        await asyncio.to_thread(lambda: torch.ones(1 << 22).mul_(2))
    engine = await load_engine(EngineConfig())
    for _ in range(50):  # libgomp's team threads leave just after their thread does
        if threads() == before:
            break
        await asyncio.sleep(0.02)
    loaded = threads()  # before + the team left on the executor thread, if any
    # The prefill server exports KV off its engine thread, on the executor thread: a copy in numpy.
    engine.cache.export(list(range(8)))
    await asyncio.to_thread(engine.cache.export, list(range(8)))
    print(json.dumps({"before": before, "loaded": loaded, "exported": threads()}))

asyncio.run(main())
"""


@pytest.mark.parametrize("how, extra_threads", [("load_engine", 0), ("to_thread", 1)])
def test_only_the_engine_thread_keeps_an_openmp_team(how, extra_threads):
    """libgomp keeps a team of worker threads for each thread that ran a parallel region, while that
    thread lives. A second team beside the engine thread's made every step 1.5-2x slower with two
    threads (docs/benchmarks.md, "In-worker step time"): the engine is built on a thread that exits,
    and the KV export copies in numpy. The to_thread case, a parallel region on asyncio's executor
    thread, shows that the count sees a team."""
    done = subprocess.run([sys.executable, "-c", OPENMP_TEAMS, how], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts["loaded"] == counts["before"] + extra_threads
    assert counts["exported"] == counts["loaded"]
