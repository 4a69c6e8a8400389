"""The planner for a running cluster: the best placement for the lengths the scheduler has seen.

The scheduler (services/scheduler/replan.py) calls `recommend` in a separate process with its
window's (prompt, output) length pairs. Those are summarized as a workload of the same kind `bench
serve` draws from (a truncated lognormal per length, fitted to the window's median and spread, within
its smallest and largest), and the planner searches every placement within the resources, as
`splitserve plan` does, and recommends the one with the most goodput (not the most per core: the
cores are there already); the running placement is simulated on the same requests, so the two
goodputs are paired.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from splitserve.bench.loadgen.config import BackendConfig, ServeConfig
from splitserve.bench.loadgen.metrics import Slo
from splitserve.bench.loadgen.workloads import LengthDist, Workload
from splitserve.planner.latency import load_profile
from splitserve.planner.placements import Placement
from splitserve.planner.plan import DEFAULT_MODES, DEFAULTS, Planner, PlanSpec, plan
from splitserve.planner.simulator import Mode
from splitserve.planner.sweep import machine_profile

ONLINE_NUM_REQUESTS = 200  # per simulation: a plan within seconds on a busy 2-core machine


def observed_workload(samples: list[tuple[int, int]]) -> Workload:
    """A lognormal per length, with the samples' median, log-spread, minimum and maximum."""
    return Workload("observed", f"the lengths of the last {len(samples)} requests",
                    _fit([n for n, _ in samples]), _fit([n for _, n in samples]))


def _fit(values: list[int]) -> LengthDist:
    values = [max(1, v) for v in values]
    logs = [math.log(v) for v in values]
    sigma = statistics.pstdev(logs) if len(values) > 1 else 0.0
    median = round(statistics.median(values))
    return LengthDist(median, sigma, min(min(values), median), max(max(values), median))


def recommend(profile_path: str | None, samples: list[tuple[int, int]], running: dict[str, int],
              resources: int, ttft_slo_s: float, tpot_slo_s: float, attainment: float,
              num_requests: int = ONLINE_NUM_REQUESTS, seed: int = 0,
              colocated_mode: Mode = Mode.COLOCATED) -> dict:
    """{"recommended": placement fields (as the Placement proto), "recommended_goodput": req/s,
    "running_goodput": req/s, or None when the running placement cannot be simulated} for the
    observed lengths within `resources` cores (or devices). Colocated workers, running or
    recommended, schedule as colocated_mode says (the cluster's: prefill first, chunked or layered)."""
    path = Path(profile_path) if profile_path else machine_profile()
    profile = load_profile(path)
    serve = ServeConfig(backend=BackendConfig("simulate", str(path), profile.model.name),
                        workload=observed_workload(samples), rates=(), num_requests=num_requests, seed=seed,
                        slo=Slo(ttft_slo_s, tpot_slo_s, attainment), pause_s=0.0, keep_records=False)
    # Counts and cores only: the workers' batching knobs stay at their defaults.
    # No pruning: it prunes by goodput per core, and the choice here is by goodput.
    spec = PlanSpec(profile, serve, resources, modes=(DEFAULT_MODES[0], colocated_mode),
                    token_budgets=(DEFAULTS.token_budget,),
                    max_num_seqs=(DEFAULTS.max_num_seqs,), prune=False)
    result = plan(spec)
    # The launcher's cores are fixed: the most goodput within them (fewer cores on a tie), where
    # `splitserve plan`, sizing hardware, ranks by goodput per core.
    best = result.most_goodput
    now = _evaluate_running(spec, running, colocated_mode)
    if best is None:
        return {"recommended": running, "recommended_goodput": 0.0, "running_goodput": now}
    return {"recommended": placement_fields(best.candidate.placement), "recommended_goodput": best.max_rate,
            "running_goodput": now}


def placement_fields(placement: Placement) -> dict[str, int]:
    if placement.mode is Mode.DISAGGREGATED:
        return {"num_prefill": placement.num_prefill, "prefill_cores": placement.prefill_degree,
                "num_decode": placement.num_decode, "decode_cores": placement.decode_degree,
                "num_colocated": 0, "colocated_cores": 0}
    return {"num_prefill": 0, "prefill_cores": 0, "num_decode": 0, "decode_cores": 0,
            "num_colocated": placement.num_prefill, "colocated_cores": placement.prefill_degree}


def _evaluate_running(spec: PlanSpec, running: dict[str, int], colocated_mode: Mode) -> float | None:
    """The running placement's goodput on the same requests; None for one the simulator cannot run
    (prefill and colocated workers at once, a role missing, cores the profile has no degree for)."""
    if running["num_colocated"] and (running["num_prefill"] or running["num_decode"]):
        return None
    if running["num_colocated"]:
        placement = Placement(colocated_mode, running["num_colocated"], running["colocated_cores"])
    elif running["num_prefill"] and running["num_decode"]:
        placement = Placement(Mode.DISAGGREGATED, running["num_prefill"], running["prefill_cores"],
                              running["num_decode"], running["decode_cores"])
    else:
        return None
    if not placement.degrees <= set(spec.profile.degrees):
        return None
    planner = Planner(spec)
    return planner.evaluate(planner.default_candidate(placement)).max_rate
