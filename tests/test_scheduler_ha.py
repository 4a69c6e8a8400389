"""Scheduler high availability with real processes: `splitserve up --schedulers 2`, then kill -9 of
the leading scheduler while requests stream. Once the lease runs out, a scheduler takes it (the
standby, or the killed one as `up` restarts it: whichever asks first), adopts what the decode server
runs and queues the rest; every client gets exactly its greedy output (no token missing or
repeated), the stream keeps nothing pending, and every KV block is free after."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import redis
from conftest import log_events, start_cluster, stop_cluster
from test_poison_request import _command_lines, _flag

from splitserve.queue.streams import REQUEST_STREAM, SCHEDULER_GROUP
from splitserve.v1 import gateway_pb2, gateway_pb2_grpc
from splitserve.v1 import scheduler_pb2 as spb
from splitserve.v1 import scheduler_pb2_grpc

pytestmark = pytest.mark.timeout(300)
NUM_REQUESTS = 10
MAX_TOKENS = 120
# The leader dies once a request has this few tokens left: it finishes while none leads (a takeover
# takes seconds: the lease must run out; 24 decode steps take 0.1-0.5 s on the VMs here, a worker
# gives up its own report within ~1 s), so its report must ride the heartbeats, on a slow machine too.
TOKENS_LEFT_AT_KILL = 24


def _schedulers(redis_url: str) -> dict[str, tuple[int, str]]:
    """pid and gRPC address of each scheduler process of the cluster on redis_url, by consumer name."""
    found = {}
    for pid, argv in _command_lines().items():
        if "scheduler" in argv and _flag(argv, "--redis-url") == redis_url and _flag(argv, "--consumer"):
            found[_flag(argv, "--consumer")] = (pid, f"{_flag(argv, '--host')}:{_flag(argv, '--port')}")
    return found


def _state(cluster, address: str) -> spb.ClusterState | None:
    try:
        with cluster.channel(address, server="scheduler") as channel:
            return scheduler_pb2_grpc.SchedulerStub(channel).GetClusterState(
                spb.ClusterStateRequest(), timeout=2, metadata=cluster.metadata)
    except grpc.RpcError:
        return None


def _leaders(cluster, addresses) -> dict[str, spb.ClusterState]:
    """The schedulers at these addresses that say they lead an epoch after the first, by address."""
    states = {address: _state(cluster, address) for address in addresses}
    return {a: s for a, s in states.items() if s is not None and s.leader and s.epoch > 1}


def _generate(address: str, prompt: str, progress: dict | None = None) -> list[int]:
    """The token ids of every response, in order (a duplicate or a hole would show); progress, where
    given, holds how many have come so far by prompt."""
    with grpc.insecure_channel(address) as channel:
        request = gateway_pb2.GenerateRequest(prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                                              ignore_eos=True)
        ids = []
        for response in gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=240):
            ids += response.token_ids
            if progress is not None:
                progress[prompt] = len(ids)
        return ids


def test_kill_9_of_the_leading_scheduler_under_load_loses_and_repeats_nothing(tmp_path):
    cluster = start_cluster(tmp_path / "logs", "--schedulers", "2", "--kv-transport", "grpc")
    try:
        redis_url = next(_flag(argv, "--redis-url") for argv in _command_lines().values()
                         if "scheduler" in argv and _flag(argv, "--port") == cluster.scheduler_address.split(":")[1])
        schedulers = _schedulers(redis_url)
        (leader_pid, leader_address), (_, standby_address) = schedulers["scheduler-0"], schedulers["scheduler-1"]
        assert _state(cluster, leader_address).leader and not _state(cluster, standby_address).leader
        prompts = [f"Note {i}: the weather in town {i} today is" for i in range(NUM_REQUESTS)]
        with ThreadPoolExecutor(NUM_REQUESTS) as pool:  # fault-free (one at a time took ~12 s more)
            reference = dict(zip(prompts, pool.map(lambda p: _generate(cluster.grpc_address, p), prompts)))

        progress: dict[str, int] = {}
        with ThreadPoolExecutor(NUM_REQUESTS) as pool:
            futures = {p: pool.submit(_generate, cluster.grpc_address, p, progress) for p in prompts}
            deadline = time.monotonic() + 120
            # Some request near its end and still streaming when the leader dies.
            near_end = range(MAX_TOKENS - TOKENS_LEFT_AT_KILL, MAX_TOKENS)
            while not any(n in near_end for n in dict(progress).values()):
                assert time.monotonic() < deadline, f"no request near its end: {progress}"
                time.sleep(0.01)
            killed_at = time.monotonic()
            os.kill(leader_pid, signal.SIGKILL)
            while not (leaders := _leaders(cluster, (leader_address, standby_address))):
                assert time.monotonic() < killed_at + 30, "no scheduler took over"
                time.sleep(0.05)
            failover_s = time.monotonic() - killed_at
            results = {p: f.result() for p, f in futures.items()}
        (new_leader, state), = leaders.items()
        print(f"{new_leader} leading {failover_s:.2f} s after kill -9 of the leader (epoch {state.epoch})")

        assert results == reference  # nothing lost, nothing repeated, nothing spliced
        assert failover_s < 10
        cluster.wait_all_blocks_free()
        with redis.Redis.from_url(redis_url, password=cluster.redis_password) as client:
            deadline = time.monotonic() + 10
            while client.xpending(REQUEST_STREAM, SCHEDULER_GROUP)["pending"]:  # acknowledged: done
                assert time.monotonic() < deadline, client.xpending(REQUEST_STREAM, SCHEDULER_GROUP)
                time.sleep(0.1)
        logs = [tmp_path / "logs" / name for name in ("scheduler.log", "scheduler-1.log")]
        leading = [event for log in logs for event in log_events(log, "leading") if event["epoch"] == 2]
        assert leading and leading[0]["pending"] >= 1, leading  # it took the dead leader's requests over
        # Requests that finished while no scheduler led: their RequestDone failed, and the first
        # heartbeats to the new leader delivered it (without that, they would run again).
        assert "reports delivered with a heartbeat" in (tmp_path / "logs" / "decode-0.log").read_text()
        # The killed one came back (up restarts it): one scheduler leads, the other stands by.
        deadline = time.monotonic() + 30
        while [s is not None and s.leader for s in map(lambda a: _state(cluster, a), (leader_address, standby_address))] \
                not in ([True, False], [False, True]):
            assert time.monotonic() < deadline, "the killed scheduler did not come back"
            time.sleep(0.2)
    finally:
        assert stop_cluster(cluster) == 0
