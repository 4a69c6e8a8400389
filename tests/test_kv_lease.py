"""Overload: prefilled requests wait for decode memory longer than the prefill server's KV lease. The
leading scheduler's heartbeat answers extend the lease of every request whose pull it awaits, so each
completes on its first run, rather than having its KV freed, its pull fail and its prefill run again
(and, after four runs, fail). The prefill server's cache is full of KV held for a pull meanwhile: its
next prompt waits for the Release (test_engine_loop: without its engine thread spinning)."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from conftest import log_events, start_cluster, stop_cluster

from splitserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.timeout(300)
LEASE_S = 2.5  # heartbeats come every second: each answer of the leader starts the lease again
PROMPT_TOKENS = 420
MAX_TOKENS = 400
REQUESTS = 3
# 52 16-token blocks (368,640 bytes each for the default model in bfloat16) on every worker: room for
# one request's 27 prompt blocks, not two, on the prefill server (which holds them for a pull), and on
# the decode server for one request of 820 tokens (~5 s of steps): each next request's KV waits on
# the prefill server for the decode server's memory about that long, twice the lease.
KV_CACHE_GB = 52 * 368_640 / (1 << 30) + 1e-6


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
