"""The scheduler's running estimate of the workload (arrival rate, prompt and output lengths)."""

import pytest

from splitserve.services.scheduler.workload import WorkloadEstimator


def test_rate_and_lengths_over_a_young_window():
    est = WorkloadEstimator(window_s=100.0)
    assert est.estimate(now=0.0).arrival_rate == 0.0
    for i, n in enumerate([100, 200, 300, 400, 500]):
        est.arrived(now=10.0 + 2.0 * i, prompt_len=n)  # one every 2 s from t = 10
    e = est.estimate(now=18.0)
    assert e.window_s == pytest.approx(8.0) and e.num_arrivals == 5
    assert e.arrival_rate == pytest.approx(0.5)  # 4 intervals in 8 s: the first arrival opens it
    assert (e.prompt_len_mean, e.prompt_len_p50, e.prompt_len_p90) == pytest.approx((300, 300, 460))
    assert e.num_finished == 0 and e.output_len_mean == 0


def test_a_full_window_forgets_old_samples_and_follows_a_shift():
    est = WorkloadEstimator(window_s=10.0)
    for i in range(20):  # 2 req/s of 100-token prompts for 10 s ...
        est.arrived(now=0.5 * i, prompt_len=100)
        est.finished(now=0.5 * i, output_len=50)
    for i in range(5):  # ... then 0.5 req/s of 1,000-token prompts for 10 s
        est.arrived(now=10.0 + 2.0 * i, prompt_len=1000)
        est.finished(now=10.0 + 2.0 * i, output_len=500)
    e = est.estimate(now=19.9)  # the window is (9.9, 19.9]
    assert e.window_s == 10.0 and e.num_arrivals == 5 and e.arrival_rate == pytest.approx(0.5)
    assert e.prompt_len_mean == 1000 and e.output_len_p90 == 500 and e.num_finished == 5


def test_the_scheduler_counts_what_it_reads_and_what_finishes():
    import asyncio

    from test_scheduler_registry import _scheduler_with

    from splitserve.queue.streams import StreamEntry
    from splitserve.v1 import common_pb2 as pb
    from splitserve.v1 import scheduler_pb2 as spb

    async def scenario():
        server = _scheduler_with(("c", spb.WORKER_ROLE_COLOCATED))
        server._enqueue([StreamEntry(f"{i}-0".encode(), pb.QueuedRequest(request_id=f"r{i}", prompt_token_ids=[1] * n))
                         for i, n in enumerate([10, 20, 30])])
        for rid in ("r0", "r1"):
            server.tracked[rid].prefill_id = server.tracked[rid].decode_id = "c"
        await server.request_done(spb.RequestDoneRequest(request_id="r0", instance_id="c",
                                                         finish_reason=pb.FINISH_REASON_LENGTH, num_output_tokens=7))
        await server.request_done(spb.RequestDoneRequest(request_id="r1", instance_id="c",
                                                         finish_reason=pb.FINISH_REASON_ERROR, num_output_tokens=2))
        return server.cluster_state().workload

    workload = asyncio.run(scenario())
    assert workload.num_arrivals == 3 and workload.prompt_len_mean == 20
    assert workload.num_finished == 1 and workload.output_len_mean == 7  # a failed request says nothing
