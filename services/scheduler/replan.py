"""Online re-planning: is the running placement still the right one for the workload of late?

Every --replan-interval the scheduler takes its workload estimate (workload.py) and, when the
workload or the placement moved since its last plan, asks the planner (splitserve.planner.online) for
the best placement within the same resources, simulating the lengths it has seen at Poisson arrivals.
The answer goes into GetRecommendation, ClusterState (and so the gateway's metrics) and the log.
`change` is set when the recommended placement's goodput beats the running one's by more than the
margin; `splitserve up --adapt` acts on it.

The planner runs in a separate process: a simulation is pure Python, and on the scheduler's event
loop it would hold the GIL for seconds.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial

import structlog

from splitserve.v1 import scheduler_pb2 as spb

from .registry import ROLES, Registry, placement_roles
from .workload import WorkloadEstimator

log = structlog.get_logger(__name__)
PLACEMENT_FIELDS = tuple(field for role in ROLES for field in (f"num_{role}", f"{role}_cores"))
MOVED = 0.2  # a rate or mean length that moved this much (relative) since the last plan: plan again


@dataclass(frozen=True)
class PlanConfig:
    profile: str | None  # None: the shipped profile of this machine type (sweep.machine_profile)
    ttft_slo_s: float
    tpot_slo_s: float
    attainment: float
    resources: int  # cores (devices) the placement may use; 0: what the running one uses
    interval_s: float = 30.0
    margin: float = 0.2
    min_samples: int = 20  # fewer requests seen than this: too early to say anything
    colocated_mode: str = "colocated"  # how the cluster's colocated workers schedule: colocated, chunked, layered


class Replanner:
    def __init__(self, config: PlanConfig, workload: WorkloadEstimator, registry: Registry,
                 clock=time.monotonic) -> None:
        self.config, self.workload, self.registry, self.clock = config, workload, registry, clock
        self.recommendation = spb.Recommendation(available=False)
        self._basis: tuple[spb.WorkloadEstimate, spb.Placement] | None = None
        self._pool = _new_pool()

    async def run_forever(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.config.interval_s)  # a timer, not a poll
                await self.replan()
        finally:
            self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def replan(self) -> bool:
        """Plan for the workload of late if it (or the placement) moved since the last plan."""
        now = self.clock()  # the workload estimate's clock
        estimate, samples, running = self.workload.estimate(now), self.workload.samples(now), self.registry.placement()
        if len(samples) < self.config.min_samples or estimate.arrival_rate <= 0 or not _cores(running):
            return False
        if running.num_colocated and (running.num_prefill or running.num_decode):
            return False  # in the middle of a change: plan again once it is over
        if self._basis is not None and not _moved(self._basis, estimate, running):
            return False
        resources = self.config.resources or _cores(running)
        plan = partial(_plan, self.config, samples, _as_dict(running), resources)
        started = time.monotonic()
        self._basis = (estimate, running)
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._pool, plan)
        except Exception as exc:  # a bad profile, a planner that died: report it, keep scheduling
            log.error("placement planning failed", error=repr(exc))
            self.recommendation = spb.Recommendation(available=False, reason=f"planning failed: {exc!r}")
            if isinstance(exc, BrokenProcessPool):
                self._pool = _new_pool()
            return False
        self.recommendation = self._recommendation(estimate, running, result)
        log.info("placement planned", change=self.recommendation.change, reason=self.recommendation.reason,
                 seconds=round(time.monotonic() - started, 1), rate=round(estimate.arrival_rate, 3),
                 prompt_len_mean=round(estimate.prompt_len_mean), output_len_mean=round(estimate.output_len_mean))
        return True

    def _recommendation(self, estimate: spb.WorkloadEstimate, running: spb.Placement, result: dict) -> spb.Recommendation:
        recommended = spb.Placement(**result["recommended"])
        best, now = result["recommended_goodput"], result["running_goodput"]
        different = _as_dict(recommended) != _as_dict(running)
        if now is None:  # nothing to compare with: recommend nothing
            return spb.Recommendation(
                available=True, workload=estimate, running=running, recommended=recommended,
                recommended_goodput=best, change=False, planned_at=time.time(),
                reason="the running placement cannot be simulated with this profile (cores it has no "
                       "degree for); not comparing")
        change = different and best > now * (1 + self.config.margin)
        if not different:
            reason = f"the running placement is the best found ({now:.2f} req/s within the SLOs)"
        else:
            verdict = "switch" if change else f"within the {self.config.margin:.0%} margin, keep it"
            reason = (f"recommended {best:.2f} req/s vs running {now:.2f} req/s within the SLOs "
                      f"at {estimate.arrival_rate:.2f} req/s arriving: {verdict}")
        return spb.Recommendation(available=True, workload=estimate, running=running, recommended=recommended,
                                  running_goodput=now, recommended_goodput=best, change=change,
                                  reason=reason, planned_at=time.time())


PLANNER_NICENESS = 19  # planning is background work: on a busy machine the workers come first


def _new_pool() -> ProcessPoolExecutor:
    return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_lower_priority)


def _lower_priority() -> None:
    os.nice(PLANNER_NICENESS)


def _plan(config: PlanConfig, samples: list[tuple[int, int]], running: dict, resources: int) -> dict:
    """In the planner's process."""
    from splitserve.planner.online import recommend
    from splitserve.planner.simulator import Mode

    return recommend(config.profile, samples, running, resources, config.ttft_slo_s, config.tpot_slo_s,
                     config.attainment, colocated_mode=Mode(config.colocated_mode))


def _as_dict(placement: spb.Placement) -> dict[str, int]:
    return {name: getattr(placement, name) for name in PLACEMENT_FIELDS}


def _cores(placement: spb.Placement) -> int:
    return sum(count * cores for _, count, cores in placement_roles(placement))


def _moved(basis: tuple[spb.WorkloadEstimate, spb.Placement], estimate: spb.WorkloadEstimate,
           running: spb.Placement) -> bool:
    before, placed = basis
    if _as_dict(placed) != _as_dict(running):
        return True
    pairs = [(before.arrival_rate, estimate.arrival_rate), (before.prompt_len_mean, estimate.prompt_len_mean),
             (before.output_len_mean, estimate.output_len_mean)]
    return any(abs(b - a) > MOVED * max(a, 1e-9) for a, b in pairs)
