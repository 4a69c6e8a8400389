"""Online re-planning: the scheduler recommends a placement for the workload it has seen, and
`splitserve up --adapt` switches to it without losing a request."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from conftest import start_cluster, stop_cluster

from splitserve.cli import build_parser
from splitserve.commands import adapt
from splitserve.commands.adapt import worker_plan
from splitserve.services.scheduler.registry import Registry
from splitserve.services.scheduler.replan import PlanConfig, Replanner
from splitserve.services.scheduler.workload import WorkloadEstimator
from splitserve.v1 import gateway_pb2, gateway_pb2_grpc
from splitserve.v1 import scheduler_pb2 as spb
from splitserve.v1 import scheduler_pb2_grpc

pytestmark = pytest.mark.timeout(300)
# A 2-core profile of the tests' own (the placeholder the planner first shipped), so that a newly
# measured profile does not move these expectations: at TTFT 2 s / TPOT 50 ms, for short prompts and
# long outputs two colocated workers serve ~1.8x the goodput of 1 prefill + 1 decode; for chatbot
# lengths, 1 + 1 wins.
PROFILE = str(Path(__file__).parent / "data" / "planner-profile-2core.json")
SLOS = (2.0, 0.05)
DECODE_HEAVY = (32, 128)


def test_worker_plan_hands_out_the_cores_in_order():
    cpus = (0, 1)
    assert worker_plan(spb.Placement(num_prefill=1, prefill_cores=1, num_decode=1, decode_cores=1), cpus) == [
        ("prefill", [0]), ("decode", [1])]
    assert worker_plan(spb.Placement(num_colocated=2, colocated_cores=1), cpus) == [
        ("colocated", [0]), ("colocated", [1])]
    assert worker_plan(spb.Placement(num_colocated=1, colocated_cores=2), cpus) == [("colocated", [0, 1])]


def _one_plus_one() -> Registry:
    registry = Registry()
    for name, role in (("prefill-0", spb.WORKER_ROLE_PREFILL), ("decode-0", spb.WORKER_ROLE_DECODE)):
        registry.register(spb.WorkerInfo(instance_id=name, role=role, num_cores=1, token_budget=2048,
                                         max_num_seqs=64), None, now=0.0)
    return registry


def _window(lengths: tuple[int, int], n: int = 40, rate: float = 2.0) -> WorkloadEstimator:
    workload = WorkloadEstimator(window_s=60.0)
    for i in range(n):
        workload.arrived(now=i / rate, prompt_len=lengths[0], max_tokens=lengths[1])
    return workload


def test_the_scheduler_recommends_colocated_workers_for_a_decode_heavy_window_and_keeps_1_plus_1_for_chat():
    config = PlanConfig(PROFILE, *SLOS, attainment=0.9, resources=2, margin=0.2)

    async def plan(workload: WorkloadEstimator) -> tuple[Replanner, bool, bool]:
        replanner = Replanner(config, workload, _one_plus_one(), clock=lambda: 20.0)
        try:
            first = await replanner.replan()
            again = await replanner.replan()  # nothing moved: no new plan
        finally:
            replanner.close()
        return replanner, first, again

    replanner, first, again = asyncio.run(plan(_window(DECODE_HEAVY)))
    rec = replanner.recommendation
    assert first and not again and rec.available
    assert rec.change and rec.recommended.num_colocated == 2 and rec.recommended.num_prefill == 0, rec
    assert rec.running.num_prefill == 1 and rec.recommended_goodput > 1.2 * rec.running_goodput
    assert rec.workload.num_arrivals == 40

    replanner, _, _ = asyncio.run(plan(_window((192, 48))))
    assert not replanner.recommendation.change, replanner.recommendation


def test_the_plans_simulate_colocated_workers_as_the_cluster_schedules_them():
    """A cluster of two layered workers (what `up --mode auto` starts for w2) is judged as layered:
    judged as prefill-first workers it would look like a third of what it serves."""
    registry = Registry()
    for name in ("colocated-0", "colocated-1"):
        registry.register(spb.WorkerInfo(instance_id=name, role=spb.WORKER_ROLE_COLOCATED, num_cores=1,
                                         token_budget=2048, max_num_seqs=64), None, now=0.0)

    async def plan(mode: str) -> spb.Recommendation:
        config = PlanConfig(PROFILE, 4.474, 0.0919, attainment=0.9, resources=2, colocated_mode=mode)
        replanner = Replanner(config, _window((1024, 16), rate=0.5), registry, clock=lambda: 20.0)
        try:
            await replanner.replan()
        finally:
            replanner.close()
        return replanner.recommendation

    layered, colocated = asyncio.run(plan("layered")), asyncio.run(plan("colocated"))
    assert layered.available and not layered.change, layered
    assert layered.running_goodput > 2 * colocated.running_goodput > 0, (layered, colocated)
    argv = adapt.scheduler_argv(build_parser().parse_args(
        ["up", "--mode", "layered", "--adapt", "--ttft-slo", "4", "--tpot-slo", "0.09"]), 2)
    assert argv[argv.index("--plan-colocated-mode") + 1] == "layered"


def _generate(address: str, prompt: list[int], max_tokens: int) -> int:
    with grpc.insecure_channel(address) as channel:
        request = gateway_pb2.GenerateRequest(prompt_token_ids=prompt, max_tokens=max_tokens, temperature=0.0,
                                              ignore_eos=True)
        responses = list(gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=240))
    return sum(len(r.token_ids) for r in responses)


def test_up_adapt_switches_to_the_recommended_placement_without_losing_a_request(tmp_path):
    """1 prefill + 1 decode, then a decode-heavy load: the launcher starts two colocated workers and
    drains the old pair while requests keep coming; every request gets all its tokens."""
    cluster = start_cluster(tmp_path, "--adapt", "--plan-profile", PROFILE, "--ttft-slo", str(SLOS[0]),
                            "--tpot-slo", str(SLOS[1]),
                            "--replan-interval", "2", "--workload-window", "60", "--cpus", "0,1",
                            "--kv-transport", "grpc", "--drain-timeout", "10")
    scheduler = scheduler_pb2_grpc.SchedulerStub(grpc.insecure_channel(cluster.scheduler_address))
    stop, futures = threading.Event(), []

    def roles() -> list[int]:
        return sorted(w.worker.role for w in scheduler.GetClusterState(spb.ClusterStateRequest(), timeout=5,
                                                                     metadata=cluster.metadata).workers)

    try:
        assert roles() == [spb.WORKER_ROLE_PREFILL, spb.WORKER_ROLE_DECODE]
        with ThreadPoolExecutor(64) as pool:
            def send() -> None:  # 2 requests a second until the switch is over
                i = 0
                while not stop.is_set():
                    prompt = [100 + (i * 7 + j) % 5000 for j in range(DECODE_HEAVY[0])]
                    futures.append(pool.submit(_generate, cluster.grpc_address, prompt, DECODE_HEAVY[1]))
                    i += 1
                    time.sleep(0.5)

            sender = threading.Thread(target=send)
            sender.start()
            try:
                deadline = time.monotonic() + 200
                while roles() != [spb.WORKER_ROLE_COLOCATED] * 2:
                    assert time.monotonic() < deadline, f"no switch to 2 colocated workers\n{cluster.log_tail()}"
                    time.sleep(1)
                time.sleep(3)  # requests placed on the new workers too
            finally:
                stop.set()
                sender.join()
            counts = [f.result() for f in futures]
        assert len(counts) >= 20 and counts == [DECODE_HEAVY[1]] * len(counts)
        log = (cluster.log_dir / "scheduler.log").read_text()
        assert "placement planned" in log and "worker drained and gone" in log
        rec = scheduler.GetRecommendation(spb.RecommendationRequest(), timeout=5, metadata=cluster.metadata)
        assert rec.available and rec.recommended.num_colocated == 2
    finally:
        code = stop_cluster(cluster)
    assert code == 0, cluster.log_tail()
