"""`splitserve up --adapt`: the local cluster follows the scheduler's placement recommendation.

The scheduler, given a profile and SLOs (the flags below, which `up` passes on), re-plans for the
workload it has seen of late (services/scheduler/replan.py) and answers GetRecommendation. The
launcher asks every few seconds; when the recommendation says to change, it starts the recommended
workers on its own cores (--cpus) first, waits until they have registered, and only then drains the
workers they replace (SIGTERM: each finishes or hands back what it holds), so no request is lost.
After a change it leaves the placement alone for a cool-down, so that the next plan sees the new
placement at work.
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

import grpc

from splitserve.common.engine_args import format_cpus, positive_float
from splitserve.common.rpc import open_blocking_channel
from splitserve.services.scheduler.registry import placement_roles
from splitserve.v1 import scheduler_pb2 as spb
from splitserve.v1 import scheduler_pb2_grpc

if TYPE_CHECKING:
    from .up import Cluster

POLL_INTERVAL_S = 5.0


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("re-planning (--adapt)")
    g.add_argument("--adapt", action="store_true",
                   help="re-plan the placement for the workload seen of late and apply it: start the "
                        "recommended workers, then drain the ones they replace (needs --ttft-slo, --tpot-slo)")
    g.add_argument("--plan-profile", default=None,
                   help="latency profile the scheduler plans with (default: the shipped profile of this "
                        "machine type)")
    g.add_argument("--ttft-slo", type=positive_float, default=None, help="TTFT SLO in seconds, for planning")
    g.add_argument("--tpot-slo", type=positive_float, default=None, help="TPOT SLO in seconds, for planning")
    g.add_argument("--attainment", type=positive_float, default=0.9,
                   help="fraction of requests that must meet both SLOs (default: 0.9)")
    g.add_argument("--replan-interval", type=positive_float, default=30.0,
                   help="seconds between the scheduler's plans (default: 30)")
    g.add_argument("--replan-margin", type=positive_float, default=0.2,
                   help="switch only when the recommended placement's goodput beats the running one's "
                        "by this fraction (default: 0.2)")
    g.add_argument("--adapt-cooldown", type=positive_float, default=60.0,
                   help="seconds after a change before the next one (default: 60)")
    g.add_argument("--workload-window", type=positive_float, default=120.0,
                   help="seconds of requests the workload estimate (and so the plan) covers (default: 120)")


def scheduler_argv(args: argparse.Namespace, num_cores: int) -> list[str]:
    """The scheduler's planning flags for up's flags (none without --adapt)."""
    if not args.adapt:
        return []
    if args.ttft_slo is None or args.tpot_slo is None:
        raise ValueError("--adapt needs --ttft-slo and --tpot-slo: the SLOs the placement must meet")
    if args.device and args.device != "cpu":
        raise ValueError("--adapt plans CPU cores; on GPUs use `splitserve plan` and deploy its placement")
    return ["--plan-ttft-slo", str(args.ttft_slo), "--plan-tpot-slo", str(args.tpot_slo),
            "--plan-attainment", str(args.attainment), "--plan-resources", str(num_cores),
            "--replan-interval", str(args.replan_interval), "--replan-margin", str(args.replan_margin),
            "--workload-window", str(args.workload_window),
            "--plan-colocated-mode", args.mode if args.mode in ("chunked", "layered") else "colocated",
            *(["--plan-profile", args.plan_profile] if args.plan_profile else [])]


def worker_plan(placement: spb.Placement, cpus: tuple[int, ...]) -> list[tuple[str, list[int]]]:
    """(role, cores) of every worker of placement, the cores handed out from cpus in order."""
    plan, start = [], 0
    for role, count, cores in placement_roles(placement):
        for _ in range(count):
            size = max(1, cores)
            plan.append((role, [cpus[(start + i) % len(cpus)] for i in range(size)]))
            start += size
    return plan


def engine_overrides(placement: spb.Placement) -> list[str]:
    return [*(["--token-budget", str(placement.token_budget)] if placement.token_budget else []),
            *(["--max-num-seqs", str(placement.max_num_seqs)] if placement.max_num_seqs else [])]


def describe(placement: spb.Placement) -> str:
    parts = [f"{n} {role} x {cores} core(s)" for role, n, cores in placement_roles(placement) if n]
    return " + ".join(parts) or "no workers"


class Adapter:
    """Polls the scheduler's recommendation from up's watch loop and applies it."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.cooldown_s = cluster.config.adapt_cooldown_s
        self.channels = [open_blocking_channel(address, cluster.config.cluster_auth, "scheduler")
                         for address in cluster.scheduler_addresses]
        self.stubs = [scheduler_pb2_grpc.SchedulerStub(channel) for channel in self.channels]
        self.metadata = cluster.config.cluster_auth.metadata  # the cluster token, on each call
        self._next_poll = 0.0
        self._last_change = float("-inf")
        self._last_change_wall = 0.0  # time.time() of the last change: older recommendations are stale

    def tick(self) -> None:
        now = time.monotonic()
        if now < self._next_poll or now - self._last_change < self.cooldown_s:
            return
        self._next_poll = now + POLL_INTERVAL_S
        recommendation = self._leader_s_recommendation()
        if recommendation is None:
            return
        # A plan made before the last change describes a placement that is gone.
        if recommendation.available and recommendation.change and recommendation.planned_at > self._last_change_wall:
            self.apply(recommendation)

    def _leader_s_recommendation(self) -> spb.Recommendation | None:
        """The leading scheduler's (the one that sees the workload), or None."""
        codes = []
        for stub in self.stubs:
            try:
                state = stub.GetClusterState(spb.ClusterStateRequest(), timeout=5, metadata=self.metadata)
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
                continue
            if state.leader:
                return state.recommendation
        print(f"adapt: no recommendation, no scheduler leads ({', '.join(codes) or 'standbys only'})", flush=True)
        return None

    def apply(self, recommendation: spb.Recommendation) -> None:
        """Start the recommended workers, wait for them to register, then drain the old ones."""
        old = self.cluster.workers()
        target = recommendation.recommended
        print(f"adapt: {describe(recommendation.running)} -> {describe(target)} "
              f"({recommendation.reason})", flush=True)
        overrides = engine_overrides(target)
        new = []
        for role, cores in worker_plan(target, self.cluster.config.cpus):  # one torch thread per core
            new.append(self.cluster.start_worker(role, cores, overrides, threads=len(cores)))
            print(f"adapt: started {new[-1]} on cores {format_cpus(cores)}", flush=True)
        self._last_change, self._last_change_wall = time.monotonic(), time.time()
        if not self._wait_registered(new):
            print("adapt: the new workers did not all register; keeping the old placement", flush=True)
            for name in new:
                self.cluster.retire(name)
            return
        for name in old:
            self.cluster.retire(name)
            print(f"adapt: draining {name}", flush=True)
        self._last_change, self._last_change_wall = time.monotonic(), time.time()

    def _wait_registered(self, names: list[str]) -> bool:
        deadline = time.monotonic() + self.cluster.config.ready_timeout_s
        while time.monotonic() < deadline:
            if set(names) & set(self.cluster.dead()):
                return False
            try:  # the first scheduler's registry: every scheduler hears every worker
                state = self.stubs[0].GetClusterState(spb.ClusterStateRequest(), timeout=5, metadata=self.metadata)
            except grpc.RpcError:
                state = spb.ClusterState()
            if set(names) <= {w.worker.instance_id for w in state.workers}:
                return True
            time.sleep(0.5)
        return False
