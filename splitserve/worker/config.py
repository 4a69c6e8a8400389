"""A worker's configuration and flags (light: no engine, no sockets)."""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from splitserve.common.auth import (
    NO_AUTH,
    ClusterAuth,
    RedisCredentials,
    add_cluster_auth_args,
    add_redis_auth_args,
    cluster_auth_from_args,
    redis_credentials_from_args,
)
from splitserve.common.engine_args import add_engine_args, positive_float, positive_int
from splitserve.common.net import scheduler_addresses
from splitserve.common.tracing import add_tracing_args
from splitserve.kv_transfer.factory import DEFAULT_TRANSPORT, TRANSPORTS, transport_value

if TYPE_CHECKING:
    from splitserve.engine.config import EngineConfig


HEARTBEAT_INTERVAL_S = 1.0  # workers' --heartbeat-interval by default


def check_kv_lease(kv_lease_s: float, heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S) -> None:
    """A prefill server's KV lease goes on with each heartbeat answer of a leader that awaits the pull:
    one shorter than two heartbeats would run out between two answers. ValueError then."""
    if kv_lease_s < 2 * heartbeat_interval_s:
        raise ValueError(f"--kv-lease ({kv_lease_s:g} s) must be at least two heartbeat intervals "
                         f"({2 * heartbeat_interval_s:g} s): the leading scheduler's heartbeat answers "
                         "extend the leases of the KV blocks it still awaits a pull of")


@dataclass(frozen=True)
class WorkerConfig:
    """What a prefill or decode server needs beyond its engine."""

    engine: EngineConfig
    host: str
    port: int
    scheduler: str  # host:port, or several comma-separated (a leader and standbys)
    redis_url: str
    kv_transport: str
    instance_id: str
    heartbeat_interval_s: float
    drain_timeout_s: float = 30.0  # on SIGTERM, how long running requests get to finish
    max_waiting: int | None = None  # decode: requests submitted and not yet admitted; None: derived
    cluster_auth: ClusterAuth = NO_AUTH  # the token this worker's calls carry and its servers ask for
    redis_credentials: RedisCredentials = RedisCredentials()
    otlp_endpoint: str | None = None  # OpenTelemetry collector for request spans; None: no tracing

    @property
    def schedulers(self) -> list[str]:
        return scheduler_addresses(self.scheduler)

    @property
    def kv_transport_proto(self) -> int:
        return transport_value(self.kv_transport)

    @property
    def waiting_limit(self) -> int:
        """Decode: requests that may wait for blocks before Submit answers RESOURCE_EXHAUSTED. Four
        full batches by default: their KV waits on prefill servers meanwhile, under a lease."""
        return self.max_waiting or 4 * self.engine.max_num_seqs


def add_worker_args(parser: argparse.ArgumentParser, role: str, default_port: int) -> None:
    env = os.environ.get
    parser.add_argument("--host", default=env("SPLITSERVE_HOST", "127.0.0.1"),
                        help="address to bind (default: 127.0.0.1; 0.0.0.0 for other machines)")
    parser.add_argument("--port", type=int, default=int(env("SPLITSERVE_PORT", default_port)),
                        help=f"gRPC port (default: {default_port}; 0 picks a free one)")
    parser.add_argument("--scheduler", default=env("SPLITSERVE_SCHEDULER", "127.0.0.1:50052"),
                        help="scheduler host:port, or several comma-separated (a leader and its "
                             "standbys: the worker registers with each; default: 127.0.0.1:50052)")
    parser.add_argument("--redis-url", default=env("SPLITSERVE_REDIS_URL", "redis://127.0.0.1:6379/0"),
                        help="Redis holding the gateways' reply streams")
    add_redis_auth_args(parser)
    parser.add_argument("--kv-transport", choices=sorted(TRANSPORTS),
                        default=env("SPLITSERVE_KV_TRANSPORT", DEFAULT_TRANSPORT),
                        help="how KV blocks move from prefill to decode (default: ucx)")
    parser.add_argument("--instance-id", default=env("SPLITSERVE_INSTANCE_ID"),
                        help=f"unique name of this worker (default: {role}-<host>-<pid>)")
    parser.add_argument("--heartbeat-interval", type=positive_float, default=HEARTBEAT_INTERVAL_S,
                        help="seconds between heartbeats to the scheduler (default: "
                             f"{HEARTBEAT_INTERVAL_S:g})")
    parser.add_argument("--drain-timeout", type=positive_float,
                        default=float(env("SPLITSERVE_DRAIN_TIMEOUT", 30)),
                        help="on SIGTERM: take nothing new and give what this worker holds this many "
                             "seconds to finish (prefill: to be pulled); what is left goes back to the "
                             "scheduler, which runs it elsewhere (default: 30)")
    if role == "decode":
        parser.add_argument("--max-waiting", type=positive_int, default=None,
                            help="requests queued for KV blocks before Submit answers RESOURCE_EXHAUSTED "
                                 "and the scheduler places them elsewhere or later "
                                 "(default: 4 x --max-num-seqs)")
    add_cluster_auth_args(parser)
    add_tracing_args(parser)
    add_engine_args(parser)


def worker_config(args: argparse.Namespace, engine: EngineConfig, role: str) -> WorkerConfig:
    return WorkerConfig(
        engine=engine, host=args.host, port=args.port, scheduler=','.join(scheduler_addresses(args.scheduler)),
        redis_url=args.redis_url, kv_transport=args.kv_transport,
        instance_id=args.instance_id or f"{role}-{socket.gethostname()}-{os.getpid()}",
        heartbeat_interval_s=args.heartbeat_interval, cluster_auth=cluster_auth_from_args(args),
        redis_credentials=redis_credentials_from_args(args),
        drain_timeout_s=args.drain_timeout,
        max_waiting=args.max_waiting if role == "decode" else None,
        otlp_endpoint=args.otlp_endpoint,
    )
