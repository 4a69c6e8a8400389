"""Redis restarts under a running cluster (append-only file on, same port and folder): a request
queued before the restart completes after it, one decoding across it gets every token, the gateway,
scheduler and decode server ride it out in the same processes, and new requests work again.

The queued request is held in the scheduler's queue by the lack of a prefill server: the only one
is killed just before the request arrives (its Submit fails, the request goes back to the queue).
Redis then goes down, and stays down while a new prefill server starts, registers and prefills the
request (its first token waits for Redis) and while the gateway refuses a new request with 503.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import redis

from splitserve.commands.up import is_ready
from splitserve.common.net import free_port
from splitserve.queue.redis_server import LocalRedis
from splitserve.queue.streams import REQUEST_STREAM, SCHEDULER_GROUP
from splitserve.v1 import common_pb2 as pb
from splitserve.v1 import gateway_pb2, gateway_pb2_grpc, scheduler_pb2_grpc
from splitserve.v1 import scheduler_pb2 as spb

pytestmark = pytest.mark.timeout(180)
MAX_TOKENS = 8
DECODING_TOKENS = 300  # ~20 ms each: still decoding when Redis goes away


class Services:
    """The services of one cluster as separate processes, each logging to its own file."""

    def __init__(self, redis_url: str, log_dir: Path) -> None:
        self.redis_url, self.log_dir = redis_url, log_dir
        self.scheduler_port, self.http_port, self.grpc_port = free_port(), free_port(), free_port()
        self.processes: dict[str, subprocess.Popen] = {}

    @property
    def scheduler(self) -> str:
        return f"127.0.0.1:{self.scheduler_port}"

    def spawn(self, name: str, *argv: str) -> None:
        with open(self.log_dir / f"{name}.log", "ab") as log:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "splitserve.cli", "--log-json", *argv, "--redis-url", self.redis_url],
                stdout=log, stderr=subprocess.STDOUT)

    def spawn_worker(self, role: str) -> None:
        self.spawn(f"{role}-0", role, "--scheduler", self.scheduler, "--port", "0", "--kv-transport", "grpc",
                   "--kv-cache-gb", "0.25", "--threads", "1", "--instance-id", f"{role}-0")

    def start(self) -> None:
        # A long worker timeout: the killed prefill server is dropped when its Submit fails, not earlier.
        self.spawn("scheduler", "scheduler", "--port", str(self.scheduler_port), "--worker-timeout", "60")
        self.spawn_worker("decode")
        self.spawn_worker("prefill")
        self.spawn("gateway", "gateway", "--scheduler", self.scheduler, "--http-port", str(self.http_port),
                   "--grpc-port", str(self.grpc_port), "--cluster-poll-interval", "0.2")

    def cluster_state(self) -> spb.ClusterState:
        with grpc.insecure_channel(self.scheduler) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            return stub.GetClusterState(spb.ClusterStateRequest(), timeout=5)

    def generate(self, request_id: str, max_tokens: int = MAX_TOKENS,
                 decoding: threading.Event | None = None) -> list[gateway_pb2.GenerateResponse]:
        """The whole response; `decoding` is set once a few tokens came (the decode server has it)."""
        request = gateway_pb2.GenerateRequest(prompt=f"Request {request_id}: once upon a time",
                                              max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                              request_id=request_id)
        responses = []
        with grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}") as channel:
            for response in gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=90):
                responses.append(response)
                if decoding is not None and len(responses) == 5:
                    decoding.set()
        return responses

    def http(self, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def stop(self) -> None:
        """In reverse order of start, like `splitserve up`: workers still reach the scheduler."""
        for process in reversed(self.processes.values()):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def log_tails(self, lines: int = 30) -> str:
        return "\n".join(f"== {name}\n" + "\n".join(self.log(name).splitlines()[-lines:])
                         for name in self.processes)


def wait_until(condition, timeout_s: float, what: str) -> None:
    """Poll other processes' state (there is nothing to await across processes)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def num_tokens(responses: list[gateway_pb2.GenerateResponse]) -> tuple[int, int]:
    return sum(len(r.token_ids) for r in responses), responses[-1].usage.completion_tokens


def queued_in_redis(client: redis.Redis) -> list[str]:
    """The requests in the stream (each stays until the scheduler acknowledges it), told apart by
    their max_tokens: their ids are the gateway's own, not the names the test gave them."""
    names = {DECODING_TOKENS: "decoding", MAX_TOKENS: "queued"}
    return [names.get(pb.QueuedRequest.FromString(fields[b"msg"]).sampling.max_tokens, "other")
            for _, fields in client.xrange(REQUEST_STREAM)]


def pending_in_group(client: redis.Redis) -> int:
    return client.xpending(REQUEST_STREAM, SCHEDULER_GROUP)["pending"]


def waiting_without_prefill(services: Services) -> bool:
    state = services.cluster_state()
    roles = {w.worker.role for w in state.workers}
    return state.num_waiting == 1 and spb.WORKER_ROLE_PREFILL not in roles


def taken_by_a_new_prefill_server(services: Services) -> bool:
    """The scheduler handed the queued request over, and the gateway knows the new server too."""
    state = services.cluster_state()
    registered = any(w.worker.role == spb.WORKER_ROLE_PREFILL for w in state.workers)
    return registered and state.num_waiting == 0 and services.http("/ready")[1]["prefill_workers"] == 1


def test_requests_queued_and_decoding_across_a_redis_restart_complete(tmp_path):
    local_redis = LocalRedis(appendonly=True).start()
    services = Services(local_redis.url, tmp_path)
    client = redis.Redis(port=local_redis.port, socket_connect_timeout=1)
    try:
        services.start()
        wait_until(lambda: is_ready(f"http://127.0.0.1:{services.http_port}"), 120, "the cluster")
        alive = {name: services.processes[name].pid for name in ("gateway", "scheduler", "decode-0")}
        with ThreadPoolExecutor(2) as pool:
            on_decode = threading.Event()
            decoding = pool.submit(services.generate, "decoding", DECODING_TOKENS, on_decode)
            assert on_decode.wait(60), "the long request never reached the decode server"
            services.processes["prefill-0"].kill()
            services.processes["prefill-0"].wait()
            queued = pool.submit(services.generate, "queued")
            wait_until(lambda: waiting_without_prefill(services), 30, "the request back in the queue")
            assert queued_in_redis(client) == ["decoding", "queued"] and not decoding.done()

            local_redis.terminate()
            services.spawn_worker("prefill")
            wait_until(lambda: taken_by_a_new_prefill_server(services), 90, "a new prefill server")
            status, body = services.http("/v1/completions", {"prompt": "refused", "max_tokens": 1})
            assert status == 503 and "Redis unavailable" in body["error"]["message"], body
            assert body["error"]["type"] == "service_unavailable_error"
            assert services.http("/ready")[0] == 503 and services.http("/health")[0] == 200
            local_redis.start()
            # Read at once: the services are still waiting out their retry delays (up to 2 s).
            assert "queued" in queued_in_redis(client)  # replayed from the append-only file

            assert num_tokens(decoding.result(timeout=90)) == (DECODING_TOKENS, DECODING_TOKENS)
            assert num_tokens(queued.result(timeout=90)) == (MAX_TOKENS, MAX_TOKENS)

        assert num_tokens(services.generate("after")) == (MAX_TOKENS, MAX_TOKENS)
        assert {name: p.pid for name, p in services.processes.items() if p.poll() is None} == {
            **alive, "prefill-0": services.processes["prefill-0"].pid}  # none of them exited
        wait_until(lambda: not queued_in_redis(client) and pending_in_group(client) == 0, 10,
                   "every request acknowledged")
        for name in ("gateway", "scheduler", "decode-0"):
            log = services.log(name)
            assert "redis unreachable, retrying" in log and "redis reconnected" in log, name
    except BaseException:
        print(services.log_tails())
        raise
    finally:
        services.stop()
        client.close()
        local_redis.stop()
