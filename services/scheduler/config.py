"""The scheduler's configuration, built once from flags and environment."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from splitserve.common.auth import (
    NO_AUTH,
    ClusterAuth,
    RedisCredentials,
    add_cluster_auth_args,
    add_redis_auth_args,
    cluster_auth_from_args,
    redis_credentials_from_args,
)
from splitserve.common.engine_args import positive_float, positive_int
from splitserve.common.tracing import add_tracing_args

from .replan import PlanConfig


@dataclass(frozen=True)
class SchedulerConfig:
    host: str
    port: int
    redis_url: str
    consumer: str  # this scheduler's name in the stream's consumer group
    prefill_queue_factor: float  # token budgets of work a prefill server may have outstanding
    worker_timeout_s: float  # heartbeat silence after which a worker is dropped
    claim_idle_s: float  # the leader takes over other consumers' entries unacknowledged this long
    drain_timeout_s: float = 30.0  # on SIGTERM, how long requests in flight get to finish
    workload_window_s: float = 120.0  # the arrival rate and lengths are estimated over this window
    plan: PlanConfig | None = None  # online re-planning; None: off
    rpc_timeout_s: float = 30.0  # Prefill.Submit waits for the running batch (seconds at worst)
    max_queued: int = 4096  # requests read from the stream and not started; past it reading pauses
    # The token callers must carry, and the scheduler's own calls to workers carry.
    cluster_auth: ClusterAuth = NO_AUTH
    redis_credentials: RedisCredentials = RedisCredentials()
    # Register only workers whose advertised gRPC host resolves to the address they connect from.
    check_worker_addresses: bool = True
    leader_lease_s: float = 3.0  # the leader lease's length: a dead leader is replaced within about this
    heartbeat_interval_s: float = 1.0  # what workers are told; a takeover waits for one round of them
    routing: str = "kv"  # prefill placement: "kv" (KV-aware, registry.py) or "least-loaded"
    route_request_tokens: int = 32  # KV-aware routing's load term: prompt tokens per assigned request
    otlp_endpoint: str | None = None  # OpenTelemetry collector for placement spans; None: no tracing


def add_args(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--host", default=env("SPLITSERVE_HOST", "127.0.0.1"),
                        help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=int(env("SPLITSERVE_PORT", 50052)),
                        help="gRPC port (default: 50052)")
    add_cluster_auth_args(parser)
    parser.add_argument("--trust-worker-addresses", action="store_true",
                        help="register a worker whatever address it advertises (default: only when its "
                             "gRPC host resolves to the address it connected from; turn the check off "
                             "behind a proxy or sidecar that hides workers' addresses)")
    parser.add_argument("--redis-url", default=env("SPLITSERVE_REDIS_URL", "redis://127.0.0.1:6379/0"),
                        help="Redis holding the request stream (default: redis://127.0.0.1:6379/0)")
    add_redis_auth_args(parser)
    parser.add_argument("--consumer", default=env("SPLITSERVE_CONSUMER", "scheduler-0"),
                        help="this scheduler's name: its consumer in the streams' group and in the leader "
                             "lease (default: scheduler-0)")
    parser.add_argument("--leader-lease", type=positive_float, default=3.0,
                        help="seconds of the leader lease in Redis: run several schedulers against one "
                             "Redis and one leads while the others stand by; when the leader dies a "
                             "standby takes over within about this long (default: 3)")
    parser.add_argument("--prefill-queue-factor", type=positive_float, default=2.0,
                        help="prompt tokens a prefill server may have assigned, in token budgets "
                             "(default: 2: one batch running, one forming)")
    parser.add_argument("--routing", choices=("kv", "least-loaded"), default=env("SPLITSERVE_ROUTING", "kv"),
                        help="how a request picks its prefill server: kv (default) the least expected "
                             "time to its first token given each server's cached prefix of its prompt, "
                             "its queue and its load; least-loaded the fewest prompt tokens queued")
    parser.add_argument("--route-request-tokens", type=int, default=32,
                        help="KV-aware routing's load term: what each request already assigned to a "
                             "server adds to its cost, in prompt tokens (default: 32)")
    parser.add_argument("--worker-timeout", type=positive_float, default=5.0,
                        help="seconds without a heartbeat before a worker is dropped and its requests "
                             "requeued (default: 5)")
    parser.add_argument("--claim-idle", type=positive_float, default=10.0,
                        help="the leader takes over requests other schedulers (deposed ones) left "
                             "unacknowledged this many seconds (default: 10; at a takeover, all)")
    parser.add_argument("--drain-timeout", type=positive_float,
                        default=float(env("SPLITSERVE_DRAIN_TIMEOUT", 30)),
                        help="on SIGTERM: start nothing new and give the requests in flight this many "
                             "seconds to finish; the rest stay pending in the stream for the next "
                             "scheduler (default: 30)")
    parser.add_argument("--workload-window", type=positive_float, default=120.0,
                        help="seconds of arrivals and finished requests the workload estimate covers "
                             "(ClusterState.workload; default: 120)")
    parser.add_argument("--max-queued", type=positive_int, default=4096,
                        help="requests read from the stream and waiting for a prefill server; at this "
                             "many the scheduler stops reading (the rest wait in Redis) until the queue "
                             "drains (default: 4096)")
    add_tracing_args(parser)
    g = parser.add_argument_group("online re-planning (on with --plan-ttft-slo and --plan-tpot-slo)")
    g.add_argument("--plan-ttft-slo", type=positive_float, default=None, help="TTFT SLO in seconds")
    g.add_argument("--plan-tpot-slo", type=positive_float, default=None, help="TPOT SLO in seconds")
    g.add_argument("--plan-attainment", type=positive_float, default=0.9,
                   help="fraction of requests that must meet both SLOs (default: 0.9)")
    g.add_argument("--plan-profile", default=None,
                   help="latency profile (default: the shipped one of this machine type)")
    g.add_argument("--plan-resources", type=positive_int, default=None,
                   help="cores (devices) a placement may use (default: what the running workers use)")
    g.add_argument("--replan-interval", type=positive_float, default=30.0,
                   help="seconds between plans; one is made only when the workload or placement moved "
                        "(default: 30)")
    g.add_argument("--replan-margin", type=positive_float, default=0.2,
                   help="recommend a change when its goodput beats the running placement's by this "
                        "fraction (default: 0.2)")
    g.add_argument("--plan-colocated-mode", choices=("colocated", "chunked", "layered"), default="colocated",
                   help="how the cluster's colocated workers schedule, as the plans simulate them: prefill "
                        "first, chunked or layered prefill (default: colocated)")


def from_args(args: argparse.Namespace) -> SchedulerConfig:
    return SchedulerConfig(args.host, args.port, args.redis_url, args.consumer, args.prefill_queue_factor,
                           args.worker_timeout, args.claim_idle, drain_timeout_s=args.drain_timeout,
                           workload_window_s=args.workload_window, plan=_plan_config(args),
                           max_queued=args.max_queued, cluster_auth=cluster_auth_from_args(args),
                           redis_credentials=redis_credentials_from_args(args),
                           check_worker_addresses=not args.trust_worker_addresses,
                           leader_lease_s=args.leader_lease, routing=args.routing,
                           route_request_tokens=_non_negative(args.route_request_tokens),
                           otlp_endpoint=args.otlp_endpoint)


def _non_negative(value: int) -> int:
    if value < 0:
        raise ValueError(f"--route-request-tokens must be >= 0, got {value}")
    return value


def _plan_config(args: argparse.Namespace) -> PlanConfig | None:
    if args.plan_ttft_slo is None and args.plan_tpot_slo is None:
        return None
    if args.plan_ttft_slo is None or args.plan_tpot_slo is None:
        raise ValueError("re-planning needs both --plan-ttft-slo and --plan-tpot-slo")
    if args.plan_profile and not os.path.isfile(args.plan_profile):
        raise ValueError(f"--plan-profile {args.plan_profile}: no such file")
    return PlanConfig(args.plan_profile, args.plan_ttft_slo, args.plan_tpot_slo, args.plan_attainment,
                      args.plan_resources or 0, args.replan_interval, args.replan_margin,
                      colocated_mode=args.plan_colocated_mode)
