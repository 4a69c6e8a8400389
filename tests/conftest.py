"""Shared fixtures: the real default model (loaded once per session per dtype) and real local clusters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import torch
from otlp import OtlpCollector

from splitserve.common.auth import REDIS_PASSWORD_ENV, TOKEN_ENV, ClusterAuth, new_token
from splitserve.common.certs import load_cluster_tls, write_cluster_certs
from splitserve.common.net import free_port
from splitserve.common.rpc import open_blocking_channel
from splitserve.engine import EngineConfig, LoadedModel
from splitserve.services.scheduler.registry import ROLE_NAMES
from splitserve.v1 import common_pb2, decode_pb2_grpc, prefill_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def model_fp32() -> LoadedModel:
    return LoadedModel.load(EngineConfig(dtype="float32"))


@pytest.fixture(scope="session")
def model_bf16() -> LoadedModel:
    return LoadedModel.load(EngineConfig(dtype="bfloat16"))


@pytest.fixture(scope="session")
def hf_fp32(model_fp32: LoadedModel):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_fp32.source.path, dtype=torch.float32).eval()


def make_prompts(tokenizer, lengths: list[int]) -> list[list[int]]:
    """Distinct natural-text prompts cut to exact token counts."""
    topics = ["the history of Rome", "how bread rises", "the tides", "prime numbers",
              "a cat on a boat", "writing a parser", "mountain weather", "the printing press"]
    prompts = []
    for i, n in enumerate(lengths):
        topic = topics[i % len(topics)]
        text = " ".join(
            f"Paragraph {k} about {topic}: people have studied {topic} for a long time, and "
            f"each generation adds notes, questions and small discoveries of its own."
            for k in range(n // 20 + 2)
        )
        ids = tokenizer(text)["input_ids"]
        assert len(ids) >= n
        prompts.append(ids[:n])
    return prompts


# -- a real local cluster, started with `splitserve up` -------------------------------------------


def log_events(log: Path, event: str) -> list[dict]:
    """The JSON lines of a service's log (--log-json) whose event is event, in order."""
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == event]


@dataclass
class RunningCluster:
    http_url: str
    grpc_address: str
    scheduler_address: str
    log_dir: Path
    process: subprocess.Popen  # its stdout (and stderr) a pipe, read without blocking by output()
    token: str  # the cluster token every internal call must carry
    tls_dir: Path | None = None  # with --cluster-tls: the certificates (splitserve certs) up was given
    redis_password: str | None = None  # what up's private Redis asks for (given to up, like the token)
    _printed: list[bytes] = field(default_factory=list)

    def auth(self, role: str = "admin") -> ClusterAuth:
        """The credentials of a member of role: the token and, under mutual TLS, role's certificate."""
        return ClusterAuth(self.token, load_cluster_tls(self.tls_dir / role) if self.tls_dir else None)

    def channel(self, address: str, role: str = "admin", server: str | None = None) -> grpc.Channel:
        """A blocking channel to one of the cluster's internal services, as a member of role, the
        server checked for its own role (server; by default what it is: the scheduler, or the
        worker registered at address). Calls still pass metadata=self.metadata for the token."""
        return open_blocking_channel(address, self.auth(role), server or self.server_role(address))

    def server_role(self, address: str) -> str:
        if address == self.scheduler_address:
            return "scheduler"
        for state in self.workers():
            if state.worker.grpc_address == address:
                return ROLE_NAMES[state.worker.role]
        raise LookupError(f"no service of this cluster at {address}")

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """For a test's own calls to the cluster's internal services."""
        return (("x-splitserve-cluster-token", self.token),)

    @property
    def redis_url(self) -> str:
        """The cluster's Redis, as its scheduler said when ready (its password goes in env, not here)."""
        return log_events(self.log_dir / "scheduler.log", "scheduler ready")[0]["redis"]

    @property
    def env(self) -> dict[str, str]:
        """The environment of a process that joins this cluster (it carries the cluster token)."""
        return {**os.environ, TOKEN_ENV: self.token,
                **({REDIS_PASSWORD_ENV: self.redis_password} if self.redis_password else {})}

    def output(self) -> str:
        """All that `up` has printed so far (stdout and stderr)."""
        while True:
            try:
                chunk = os.read(self.process.stdout.fileno(), 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            self._printed.append(chunk)
        return b"".join(self._printed).decode(errors="replace")

    def state(self) -> scheduler_pb2.ClusterState:
        with self.channel(self.scheduler_address, server="scheduler") as channel:
            return scheduler_pb2_grpc.SchedulerStub(channel).GetClusterState(
                scheduler_pb2.ClusterStateRequest(), timeout=5, metadata=self.metadata)

    def workers(self) -> list[scheduler_pb2.WorkerState]:
        return list(self.state().workers)

    def wait_workers(self, count: int, timeout_s: float = 60.0) -> list[scheduler_pb2.WorkerState]:
        """The workers once count of them registered: up is ready once the gateway is, which needs
        only some of them."""
        deadline = time.monotonic() + timeout_s
        while len(workers := self.workers()) < count:
            assert time.monotonic() < deadline, f"{len(workers)} of {count} workers\n{self.log_tail()}"
            time.sleep(0.2)
        return workers

    def as_scheduler(self) -> tuple[tuple[str, str], ...]:
        """Metadata for a test's Submit or Abort to a worker, as the leading scheduler's (its epoch)."""
        return (*self.metadata, ("x-splitserve-epoch", str(self.state().epoch)))

    def worker_stats(self) -> dict[str, common_pb2.WorkerStats]:
        """Each worker's stats, asked from the worker itself (its admin RPC), not from heartbeats."""
        stats = {}
        for state in self.workers():
            stub_type = (decode_pb2_grpc.DecodeStub if state.worker.role == scheduler_pb2.WORKER_ROLE_DECODE
                         else prefill_pb2_grpc.PrefillStub)  # colocated workers serve the Prefill API
            with self.channel(state.worker.grpc_address) as channel:
                stats[state.worker.instance_id] = stub_type(channel).GetStats(common_pb2.StatsRequest(), timeout=5,
                                                                              metadata=self.metadata)
        return stats

    def wait_all_blocks_free(self, timeout_s: float = 30.0) -> dict[str, common_pb2.WorkerStats]:
        """Poll until every worker's KV cache is entirely free again (or give up and return the last view)."""
        deadline = time.monotonic() + timeout_s
        while True:
            stats = self.worker_stats()
            if all(s.num_free_blocks == s.num_blocks for s in stats.values()) or time.monotonic() > deadline:
                return stats
            time.sleep(0.2)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(f"== {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:])
                         for p in sorted(self.log_dir.glob("*.log")))


def start_cluster(log_dir: Path, *extra: str, timeout_s: float = 180.0, tls: bool = False,
                  give_redis_password: bool = True) -> RunningCluster:
    """`splitserve up` with extra flags, started and waited for; with tls, mutual TLS between its
    services, with certificates written next to log_dir (so that tests can call in as any role).
    up's private Redis gets a password the test knows, unless give_redis_password is False (up
    then makes its own)."""
    http, grpc_port, scheduler = free_port(), free_port(), free_port()
    tls_dir = log_dir.with_name(log_dir.name + "-certs") if tls else None
    if tls_dir:
        write_cluster_certs(tls_dir, gateway_names=("127.0.0.1", "localhost"))  # the edge test serves HTTPS
    argv = [sys.executable, "-m", "splitserve.cli", "up", "--http-port", str(http), "--grpc-port", str(grpc_port),
            "--scheduler-port", str(scheduler), "--log-dir", str(log_dir), "--kv-cache-gb", "0.25", *extra,
            *(["--cluster-tls", str(tls_dir)] if tls_dir else [])]
    # Given to up, which would otherwise make its own, so that tests can call in (and reach its Redis).
    token = new_token()
    redis_password = new_token() if give_redis_password and "--redis-url" not in extra else None
    env = {k: v for k, v in os.environ.items() if k != REDIS_PASSWORD_ENV}
    env.update({TOKEN_ENV: token, **({REDIS_PASSWORD_ENV: redis_password} if redis_password else {})})
    env["OTEL_BSP_SCHEDULE_DELAY"] = "100"  # with --otlp-endpoint: spans reach a test's collector at once
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    os.set_blocking(process.stdout.fileno(), False)
    cluster = RunningCluster(f"http://127.0.0.1:{http}", f"127.0.0.1:{grpc_port}", f"127.0.0.1:{scheduler}",
                             log_dir, process, token, tls_dir, redis_password)
    deadline = time.monotonic() + timeout_s
    while True:
        # up's own word, not the gateway's /ready: until up has seen the cluster ready, a service that
        # exits counts as a start-up failure and up stops everything.
        if "splitserve is ready." in cluster.output():
            return cluster
        if process.poll() is not None:
            raise RuntimeError(f"splitserve up exited {process.returncode} (negative: the signal that "
                               f"killed it): {cluster.output()}\n{cluster.log_tail()}")
        if time.monotonic() > deadline:
            stop_cluster(cluster)
            raise RuntimeError(f"cluster not ready after {timeout_s} s\n{cluster.log_tail()}")
        time.sleep(0.25)


def stop_cluster(cluster: RunningCluster) -> int:
    cluster.process.send_signal(signal.SIGTERM)
    try:
        return cluster.process.wait(60)
    except subprocess.TimeoutExpired:
        cluster.process.kill()
        return cluster.process.wait()


@pytest.fixture(scope="session")
def otlp_collector():
    """The OpenTelemetry collector the traced clusters export their spans to."""
    collector = OtlpCollector().start()
    yield collector
    collector.stop()


def _cluster_fixture(transport: str, *extra: str, tls: bool = False, traced: bool = False):
    @pytest.fixture(scope="session")
    def fixture(request, tmp_path_factory):
        tracing = ("--otlp-endpoint", request.getfixturevalue("otlp_collector").endpoint) if traced else ()
        cluster = start_cluster(tmp_path_factory.mktemp(f"cluster-{transport}"), "--kv-transport", transport,
                                *extra, *tracing, tls=tls)
        yield cluster
        code = stop_cluster(cluster)
        assert code == 0, f"splitserve up exited {code} on SIGTERM\n{cluster.log_tail()}"
    return fixture


# Shared by the files that use them, in file order. Two of them change the cluster they are given:
# test_drain.py joins workers of its own to ucx_cluster and drains them away, and
# test_up_supervision.py SIGKILLs grpc_cluster's prefill server and gateway (up restarts them).
# Without tracing (as by default) ...
ucx_cluster = _cluster_fixture("ucx", "--max-pending", "40")
# ... and with it, under mutual TLS (and the token) between its services: the gRPC KV transport runs
# encrypted.
grpc_cluster = _cluster_fixture("grpc", tls=True, traced=True)
