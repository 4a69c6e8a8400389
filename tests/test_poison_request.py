"""Regression for issue 13 through a real cluster: a request with an extreme temperature once made the
prefill server's sampler produce NaN probabilities, the engine step raise, and the worker exit; the
scheduler then requeued the request onto the next worker, taking the whole cluster down.

The gateway now sends temperatures below 1e-5 as 0 (greedy), so the second test puts a request with
temperature 1e-40 straight into the request stream, as a client of the stream other than this
gateway could, to show that the workers' sampler itself no longer fails on it. Worker processes
are compared by pid: `splitserve up` restarts a dead worker under the same instance id.

Once sampling is total no input is known that makes a step fail, so the crash isolation itself (a
failed step fails only its requests, and the worker serves on) is shown with injected failures in
test_step_failure.py and test_step_failure_workers.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis
from test_cluster import MODEL, _post

from splitserve.queue.streams import FIELD, REQUEST_STREAM, entry_payloads
from splitserve.v1 import common_pb2 as pb

pytestmark = pytest.mark.timeout(300)
EXTREMES = [
    {"temperature": 1e-40},
    {"temperature": 1e-6, "min_tokens": 4},
    {"temperature": 2e-5, "top_p": 1e-6, "min_tokens": 4},  # above the greedy threshold: sampled
    {"temperature": 1e30, "top_k": 3, "min_tokens": 4},
]


def _command_lines() -> dict[int, list[str]]:
    """argv of every process readable in /proc, by pid."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            found[int(proc.name)] = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (OSError, ValueError):
            continue
    return found


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv[:-1] else None


def _worker_processes(scheduler_address: str) -> dict[str, int]:
    """pid of each worker of the cluster whose scheduler is at scheduler_address."""
    return {_flag(argv, "--instance-id"): pid for pid, argv in _command_lines().items()
            if _flag(argv, "--instance-id") and _flag(argv, "--scheduler") == scheduler_address}


def _scheduler_pid(scheduler_address: str) -> int:
    port = scheduler_address.rsplit(":", 1)[1]
    for pid, argv in _command_lines().items():
        if "scheduler" in argv and _flag(argv, "--port") == port and _flag(argv, "--redis-url"):
            return pid
    raise LookupError("no scheduler process for this cluster")


def _redis_url(scheduler_address: str) -> str:
    """The cluster's Redis, as its scheduler process was told."""
    port = scheduler_address.rsplit(":", 1)[1]
    for argv in _command_lines().values():
        if "scheduler" in argv and _flag(argv, "--port") == port and _flag(argv, "--redis-url"):
            return _flag(argv, "--redis-url")
    raise LookupError("no scheduler process for this cluster")


def test_extreme_temperatures_get_text_and_every_worker_keeps_serving(grpc_cluster):
    processes = _worker_processes(grpc_cluster.scheduler_address)
    assert {"prefill-0", "decode-0"} <= set(processes)
    url = grpc_cluster.http_url + "/v1/completions"
    for extreme in EXTREMES:
        status, reply = _post(url, {"model": MODEL, "prompt": "The sea is", "max_tokens": 6, **extreme})
        assert status == 200, (extreme, reply)
        assert reply["choices"][0]["text"] and reply["usage"]["completion_tokens"] >= 4, (extreme, reply)
    assert _worker_processes(grpc_cluster.scheduler_address) == processes  # none died and came back
    status, reply = _post(url, {"model": MODEL, "prompt": "hi", "max_tokens": 3})
    assert status == 200 and reply["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(s.num_free_blocks == s.num_blocks for s in grpc_cluster.wait_all_blocks_free().values())


def test_a_tiny_temperature_past_the_gateway_is_sampled_by_the_workers(grpc_cluster):
    processes = _worker_processes(grpc_cluster.scheduler_address)
    client = redis.Redis.from_url(_redis_url(grpc_cluster.scheduler_address), password=grpc_cluster.redis_password,
                                  socket_timeout=60)
    last_id = client.xadd("test:poison-replies", {b"open": b"1"})  # workers append to existing streams only
    for i, top_k in enumerate((0, 5)):  # whole vocabulary, and top-k
        request = pb.QueuedRequest(
            request_id=f"poison-{i}", prompt_token_ids=[1, 504, 3156, 314],
            reply_stream="test:poison-replies",
            sampling=pb.SamplingParams(temperature=1e-40, top_p=1.0, top_k=top_k, seed=7, max_tokens=4,
                                       min_tokens=4))
        client.xadd(REQUEST_STREAM, {FIELD: request.SerializeToString()})
        tokens, event = [], pb.TokenEvent()
        deadline = time.monotonic() + 120
        while event.finish_reason == pb.FINISH_REASON_UNSPECIFIED:
            assert time.monotonic() < deadline, f"no last event for {request.request_id}: {tokens}"
            for _, entries in client.xread({"test:poison-replies": last_id}, count=1, block=5000) or ():
                (last_id, fields), = entries
                for payload in entry_payloads(fields):
                    event = pb.TokenEvent.FromString(payload)
                    tokens += event.token_ids
        assert event.finish_reason == pb.FINISH_REASON_LENGTH, event.error
        assert len(tokens) == 4
    client.delete("test:poison-replies")
    client.close()
    assert _worker_processes(grpc_cluster.scheduler_address) == processes
