"""Overload: prefilled requests wait for decode memory longer than the prefill server's KV lease. The
leading scheduler's heartbeat answers (and only the current leader's) extend the lease of every request
whose pull it awaits, so each completes on its first run, rather than having its KV freed, its pull
fail and its prefill run again (and, after four runs, fail). The prefill server's cache is full of KV
held for a pull meanwhile: its next prompt waits for the Release (test_engine_loop: without its engine
thread spinning). A lease shorter than two heartbeats is refused."""

from __future__ import annotations

import asyncio
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from conftest import log_events, start_cluster, stop_cluster
from splitserve.services.prefill.server import Held, PrefillServer

from splitserve.common.auth import NO_AUTH
from splitserve.engine import EngineConfig, LLMEngine
from splitserve.engine.config import EngineRole
from splitserve.queue.streams import connect
from splitserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from splitserve.v1 import scheduler_pb2 as spb
from splitserve.worker.common import Fence, SchedulerLink
from splitserve.worker.config import WorkerConfig

pytestmark = pytest.mark.timeout(300)
LEASE_S = 4.0  # heartbeats come every second: each answer of the leader starts the lease again
PROMPT_TOKENS = 620
MAX_TOKENS = 600
REQUESTS = 2
# 77 16-token blocks (368,640 bytes each for the default model in bfloat16) on every worker: room for
# one request's 39 prompt blocks, not two, on the prefill server (which holds them for a pull), and on
# the decode server for one request of 1,220 tokens (~8 s of steps): the second request's KV waits on
# the prefill server for the decode server's memory about that long, twice the lease.
KV_CACHE_GB = 77 * 368_640 / (1 << 30) + 1e-6
UNUSED_REDIS = "redis://127.0.0.1:1/0"  # a client that never connects: nothing below publishes
CONFIG = WorkerConfig(EngineConfig(), "127.0.0.1", 0, "127.0.0.1:1", UNUSED_REDIS, "grpc", "p", 1.0,
                      cluster_auth=NO_AUTH)


def _generate(address: str, i: int) -> list[gateway_pb2.GenerateResponse]:
    prompt = [1000 + i] + [500 + j % 100 for j in range(PROMPT_TOKENS - 1)]  # no prefix in common
    with grpc.insecure_channel(address) as channel:
        request = gateway_pb2.GenerateRequest(prompt_token_ids=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                                              ignore_eos=True)
        return list(gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=240))


def test_requests_waiting_for_decode_memory_past_the_kv_lease_complete_on_their_first_run(tmp_path):
    cluster = start_cluster(tmp_path, "--kv-cache-gb", f"{KV_CACHE_GB:.9f}", "--kv-lease", f"{LEASE_S:g}")
    try:
        with ThreadPoolExecutor(REQUESTS) as pool:
            results = list(pool.map(lambda i: _generate(cluster.grpc_address, i), range(REQUESTS)))
        for responses in results:
            assert sum(len(r.token_ids) for r in responses) == MAX_TOKENS, responses[-1]
            assert responses[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert not log_events(tmp_path / "prefill-0.log", "kv lease expired before any pull")
        runs = Counter(e["request_id"] for e in log_events(tmp_path / "scheduler.log", "assigned to prefill"))
        assert len(runs) == REQUESTS and set(runs.values()) == {1}, runs
        # ... though their KV waited on the prefill server for longer than the lease
        waits = [r[-1].timeline.kv_transfer_start - r[-1].timeline.prefill_end for r in results]
        assert max(waits) > LEASE_S + 1, f"no request waited past the lease for its pull: {waits}"
        stats = cluster.wait_all_blocks_free()
        assert all(s.num_free_blocks == s.num_blocks for s in stats.values()), stats
    finally:
        stop_cluster(cluster)


def test_a_prefill_server_extends_the_leases_of_held_kv_it_is_told_of_and_nothing_else(model_fp32):
    """Only requests prefilled here (their lease running) start their lease again; one still being
    prefilled, or not here, is left alone; a lease no answer extends runs out as before."""
    engine = LLMEngine(EngineConfig(dtype="float32", role=EngineRole.PREFILL, kv_cache_bytes=4 << 20),
                       loaded=model_fp32)

    async def scenario() -> list[tuple[float, str]]:
        server = PrefillServer(CONFIG, engine, redis=connect(UNUSED_REDIS), kv_lease_s=0.3)
        freed: list[tuple[float, str]] = []
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def free(request_id: str, why: str) -> None:
            freed.append((loop.time() - start, request_id))
            server.requests.pop(request_id)

        server._free = free
        for rid in ("extended", "not-extended"):
            server.requests[rid] = Held(common_pb2.QueuedRequest(request_id=rid))
            server.requests[rid].lease = loop.call_later(server.kv_lease_s, server._expire, rid)
        server.requests["prefilling"] = Held(common_pb2.QueuedRequest(request_id="prefilling"))
        for _ in range(4):  # a heartbeat answer every 0.2 s for 0.8 s
            await asyncio.sleep(0.2)
            server.extend_leases(["extended", "prefilling", "unknown"])
        await asyncio.sleep(1.0)
        assert server.requests["prefilling"].lease is None
        return freed

    (t_not, not_extended), (t_ext, extended) = asyncio.run(scenario())
    assert (not_extended, extended) == ("not-extended", "extended")
    assert t_not < 0.8 and t_ext >= 1.1  # its lease ran out 0.3 s after the last answer, at 0.8 s or later


class Stub:
    """A scheduler's Heartbeat that answers what it is given."""

    def __init__(self, answer: spb.HeartbeatResponse) -> None:
        self.answer = answer

    async def Heartbeat(self, request, timeout=None) -> spb.HeartbeatResponse:
        return self.answer


@pytest.mark.parametrize("leader, epoch, extended", [(True, 3, True), (False, 3, False), (True, 2, False)])
def test_a_worker_extends_leases_at_the_word_of_the_current_leader_only(leader, epoch, extended):
    """A standby's answer names nothing to extend, nor does a deposed leader's (an epoch older than
    one this worker has seen), whatever its answer holds."""
    async def scenario() -> list:
        told: list = []
        fence = Fence()
        fence.see(3)
        link = SchedulerLink(CONFIG, spb.WorkerInfo(instance_id="p"), stats=_stats, held=lambda: ["r1"],
                             fence=fence, kv_awaited=lambda ids: told.append(list(ids)))
        answer = spb.HeartbeatResponse(leader=leader, epoch=epoch, kv_awaited_ids=["r1"])
        link.schedulers[0].stub = Stub(answer)
        await link._heartbeat(link.schedulers[0])
        return told

    assert asyncio.run(scenario()) == ([["r1"]] if extended else [])


async def _stats() -> common_pb2.WorkerStats:
    return common_pb2.WorkerStats()


@pytest.mark.parametrize("argv", [["up", "--kv-lease", "1.5"],
                                  ["prefill", "--kv-lease", "3", "--heartbeat-interval", "2"]])
def test_a_kv_lease_shorter_than_two_heartbeats_is_refused(argv):
    from splitserve.cli import build_parser
    from splitserve.commands.up import config_from_args

    args = build_parser().parse_args(argv)
    with pytest.raises(ValueError, match="at least two heartbeat intervals"):
        config_from_args(args) if argv[0] == "up" else args.func(args)
