"""Graceful shutdown with real processes: a worker or the scheduler that gets SIGTERM takes nothing new,
finishes or hands back what it holds, and exits 0; every client still gets its whole output.

Each worker under test is started by the test itself (so its exit code is ours to read) and joins a
real cluster of one prefill and one decode server that takes over what it hands back (conftest's
ucx_cluster: its start and stop took a third of this file's time).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import redis
from conftest import log_events

from splitserve.queue.redis_server import LocalRedis
from splitserve.queue.streams import REQUEST_STREAM, SCHEDULER_GROUP, ProtoCodec, RequestStream, connect
from splitserve.v1 import common_pb2, decode_pb2_grpc, gateway_pb2, gateway_pb2_grpc, prefill_pb2_grpc

pytestmark = pytest.mark.timeout(300)


STARTED: list[Worker] = []  # by the test running now


@pytest.fixture
def cluster(ucx_cluster):
    """The shared cluster, with no worker of a test before left in it: a test that failed before it
    stopped its worker has it stopped here, not left registered for the tests after."""
    assert sorted(w.worker.instance_id for w in ucx_cluster.workers()) == ["decode-0", "prefill-0"]
    yield ucx_cluster
    for worker in STARTED:
        if worker.process.poll() is None:
            worker.terminate()
    STARTED.clear()


class Worker:
    """One worker process of ours, joined to the cluster."""

    def __init__(self, role: str, name: str, cluster, log: Path, *extra: str) -> None:
        self.role, self.name, self.cluster, self.log = role, name, cluster, log
        argv = [sys.executable, "-m", "splitserve.cli", "--log-json", role, "--scheduler", cluster.scheduler_address,
                "--redis-url", cluster.redis_url, "--port", "0", "--kv-cache-gb", "0.25", "--threads", "1",
                "--instance-id", name, *extra]
        with open(log, "wb") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=cluster.env)
        STARTED.append(self)
        self.address = self._wait_registered()

    def _wait_registered(self, timeout_s: float = 120.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"{self.name} exited:\n{self.log.read_text()[-3000:]}"
            for state in self.cluster.workers():
                if state.worker.instance_id == self.name:
                    return state.worker.grpc_address
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} did not register")

    def stats(self) -> common_pb2.WorkerStats:
        stub_type = decode_pb2_grpc.DecodeStub if self.role == "decode" else prefill_pb2_grpc.PrefillStub
        with grpc.insecure_channel(self.address) as channel:
            return stub_type(channel).GetStats(common_pb2.StatsRequest(), timeout=5, metadata=self.cluster.metadata)

    def wait_busy(self, busy, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not busy(self.stats()):
            assert time.monotonic() < deadline, f"{self.name} never got work"
            time.sleep(0.02)

    def terminate(self, timeout_s: float = 60.0) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        finally:
            if self.process.poll() is None:
                self.process.kill()

    def events(self, name: str) -> list[dict]:
        """The JSON log lines of this worker whose event is name."""
        return log_events(self.log, name)


def _generate(address: str, prompt: str, max_tokens: int) -> list[int]:
    with grpc.insecure_channel(address) as channel:
        request = gateway_pb2.GenerateRequest(prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                              ignore_eos=True)
        responses = list(gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=240))
    assert responses[-1].usage.completion_tokens == max_tokens
    return [t for r in responses for t in r.token_ids]


def _generate_all(cluster, prompts: list[str], max_tokens: int, while_running) -> list[list[int]]:
    """Send every prompt at once, call while_running(), and return each client's tokens."""
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(_generate, cluster.grpc_address, p, max_tokens) for p in prompts]
        while_running()
        return [f.result() for f in futures]


def _assert_gone_and_blocks_free(cluster, worker: Worker) -> None:
    # The scheduler forgets a drained worker when it says so, not after its heartbeats time out.
    assert worker.name not in {w.worker.instance_id for w in cluster.workers()}
    survivors = cluster.wait_all_blocks_free()
    assert all(s.num_free_blocks == s.num_blocks for s in survivors.values()), survivors


@pytest.mark.parametrize("role", ["decode", "colocated"])
def test_a_worker_out_of_drain_time_hands_back_its_running_requests_and_exits_0(cluster, tmp_path, role):
    """One second of drain is too short for 160 tokens: what is still running goes back to the
    scheduler, runs again on the cluster's own servers, and every client gets all its tokens."""
    scheduler_log = cluster.log_dir / "scheduler.log"
    logged_before = scheduler_log.stat().st_size  # the shared cluster's log: this test's part only
    worker = Worker(role, f"{role}-x", cluster, tmp_path / f"{role}.log", "--drain-timeout", "1")
    codes = []

    def terminate_once_running() -> None:
        worker.wait_busy(lambda s: s.num_running > 0)
        codes.append(worker.terminate())

    prompts = [f"Story number {i}: once upon a time" for i in range(4)]
    outputs = _generate_all(cluster, prompts, 160, terminate_once_running)
    assert codes == [0], worker.log.read_text()[-3000:]
    assert all(len(tokens) == 160 for tokens in outputs)
    drained, = worker.events("drained")
    assert drained["handed_back_running"] >= 1, drained  # part-way through their 160 tokens
    assert "handed back" in scheduler_log.read_bytes()[logged_before:].decode(errors="replace")
    _assert_gone_and_blocks_free(cluster, worker)


def test_a_draining_prefill_server_finishes_its_queue_and_its_kv_is_pulled_before_it_exits(cluster, tmp_path):
    """Requests it had when the signal came are prefilled there and pulled; requests sent after go
    to the other prefill server; nothing is handed back."""
    worker = Worker("prefill", "prefill-x", cluster, tmp_path / "prefill.log")
    long_prompt = " ".join(["The history of the river valley, told one village at a time."] * 30)
    codes, late = [], []

    def terminate_once_queued() -> None:
        worker.wait_busy(lambda s: s.num_waiting + s.num_running > 0)
        worker.process.send_signal(signal.SIGTERM)
        with ThreadPoolExecutor(2) as pool:  # sent while it drains: they must go elsewhere
            late.extend(pool.map(lambda i: _generate(cluster.grpc_address, f"{i}: {long_prompt}", 8), range(2)))
        codes.append(worker.process.wait(60))

    outputs = _generate_all(cluster, [f"{i}: {long_prompt}" for i in range(6)], 8, terminate_once_queued)
    assert codes == [0], worker.log.read_text()[-3000:]
    assert all(len(tokens) == 8 for tokens in outputs + late)
    draining, = worker.events("draining")
    drained, = worker.events("drained")
    assert draining["requests"] >= 1 and drained["handed_back"] == 0, (draining, drained)
    assert len(worker.events("kv blocks freed")) >= draining["requests"]
    _assert_gone_and_blocks_free(cluster, worker)


def test_a_draining_scheduler_exits_0_and_leaves_unstarted_requests_in_the_stream(tmp_path):
    """No workers: the request it read cannot start. On SIGTERM it exits at once, giving up the leader
    lease; the entry stays pending in the stream, and the next scheduler takes the lease at once (no
    waiting out the lease) and the request over."""
    with LocalRedis() as server:
        async def put() -> None:  # as a gateway does
            client = connect(server.url)
            stream = RequestStream(client, ProtoCodec(common_pb2.QueuedRequest))
            await stream.ensure_group()
            await stream.put(common_pb2.QueuedRequest(request_id="r-drain", prompt_token_ids=[1, 2, 3]))
            await client.aclose()

        first = _start_scheduler(server.url, tmp_path / "first.log")
        asyncio.run(put())
        client = redis.Redis(port=server.port)
        deadline = time.monotonic() + 20
        while client.xpending(REQUEST_STREAM, SCHEDULER_GROUP)["pending"] == 0:
            assert time.monotonic() < deadline and first.poll() is None, (tmp_path / "first.log").read_text()
            time.sleep(0.05)
        started = time.monotonic()
        first.send_signal(signal.SIGTERM)
        assert first.wait(20) == 0, (tmp_path / "first.log").read_text()
        assert time.monotonic() - started < 10  # nothing in flight: no waiting out the drain timeout
        assert client.xpending(REQUEST_STREAM, SCHEDULER_GROUP)["pending"] == 1
        second = _start_scheduler(server.url, tmp_path / "second.log")
        try:
            deadline = time.monotonic() + 20
            while not (leading := log_events(tmp_path / "second.log", "leading")):
                assert time.monotonic() < deadline and second.poll() is None, (tmp_path / "second.log").read_text()
                time.sleep(0.05)
            (taking,) = log_events(tmp_path / "second.log", "leader lease taken; taking over")
            assert (leading[0]["pending"], leading[0]["queued"], taking["epoch"]) == (1, 1, 2)
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(20) == 0


def _start_scheduler(redis_url: str, log: Path) -> subprocess.Popen:
    from splitserve.common.net import free_port

    argv = [sys.executable, "-m", "splitserve.cli", "--log-json", "scheduler", "--redis-url", redis_url,
            "--port", str(free_port()), "--consumer", "scheduler-drain", "--drain-timeout", "30"]
    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
