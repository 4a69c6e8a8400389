"""A decode server that dies mid-request: the scheduler notices the silence, requeues its requests,
and they complete on the surviving server; the clients see whole outputs; `up` restarts the dead one."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from conftest import log_events, start_cluster, stop_cluster

from splitserve.v1 import gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.timeout(300)
MAX_TOKENS = 100  # ~20 ms each: still decoding when its server is killed (within 0.1 s of its first)


def _pid_of(instance_id: str, scheduler_address: str) -> int:
    """The pid of the worker started with this instance id for this cluster (from /proc)."""
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if instance_id.encode() in argv and scheduler_address.encode() in argv:
            return int(proc.name)
    raise LookupError(f"no process for {instance_id}")


def _live_pid_of(instance_id: str, scheduler_address: str) -> int | None:
    try:
        return _pid_of(instance_id, scheduler_address)
    except LookupError:
        return None


def _generate(address: str, prompt: str) -> list[gateway_pb2.GenerateResponse]:
    with grpc.insecure_channel(address) as channel:
        request = gateway_pb2.GenerateRequest(prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                                              ignore_eos=True)
        return list(gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=240))


def test_requests_on_a_killed_decode_server_complete_elsewhere(tmp_path):
    cluster = start_cluster(tmp_path, "--decode", "2", "--kv-transport", "grpc")
    try:
        prompts = [f"Story number {i}: once upon a time" for i in range(4)]
        with ThreadPoolExecutor(len(prompts)) as pool:
            futures = [pool.submit(_generate, cluster.grpc_address, p) for p in prompts]
            deadline = time.monotonic() + 60
            while cluster.worker_stats()["decode-0"].num_running == 0:
                assert time.monotonic() < deadline, "decode-0 never got a request"
                time.sleep(0.1)
            killed = _pid_of("decode-0", cluster.scheduler_address)
            os.kill(killed, signal.SIGKILL)
            results = [f.result() for f in futures]
        for responses in results:
            tokens = [t for r in responses for t in r.token_ids]
            assert len(tokens) == MAX_TOKENS and responses[-1].usage.completion_tokens == MAX_TOKENS
        # ... and they did so because decode-0's were requeued, not because they finished before the kill
        dropped = [e for e in log_events(tmp_path / "scheduler.log", "worker dropped")
                   if e["worker"] == "decode-0"]
        assert dropped and dropped[0]["requeued"] >= 1, dropped
        # `up` restarts the killed server (a new process under the same name), as a container runtime would.
        deadline = time.monotonic() + 60
        while _live_pid_of("decode-0", cluster.scheduler_address) in (None, killed):
            assert time.monotonic() < deadline, "decode-0 was not restarted"
            time.sleep(0.2)
        survivors = cluster.wait_all_blocks_free()
        assert all(s.num_free_blocks == s.num_blocks for s in survivors.values()), survivors
    finally:
        stop_cluster(cluster)
