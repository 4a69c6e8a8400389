"""`splitserve up --mode auto`: start the placement the planner predicts serves the most goodput.

Given SLOs and a workload (a preset such as `--workload w1`, which brings its SLOs, or lengths), the
planner (splitserve/planner) simulates every placement of the launcher's cores (--cpus) in every
mode, with every token budget and batch limit it searches, on the latency profile (--plan-profile,
default: the shipped one of this machine type, `sweep.machine_profile`), and `up` starts the one with
the most goodput at the attainment target: its mode, worker counts and cores per worker, token budget
and batch limit. Ties go to fewer cores. With --adapt the scheduler then keeps re-planning for the
lengths it sees, and `up` follows its recommendations.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from splitserve.bench.loadgen.config import BackendConfig, ServeConfig
from splitserve.bench.loadgen.metrics import Slo
from splitserve.bench.loadgen.workloads import get_workload, preset_slos
from splitserve.planner.latency import load_profile
from splitserve.planner.placements import Placement
from splitserve.planner.plan import Evaluation, PlanSpec, plan
from splitserve.planner.simulator import Mode
from splitserve.planner.sweep import machine_profile

AUTO_NUM_REQUESTS = 300  # per simulated rate: a plan in 10-30 s on this machine
AUTO_MODES = (Mode.DISAGGREGATED, Mode.COLOCATED, Mode.CHUNKED, Mode.LAYERED)


@dataclass(frozen=True)
class AutoChoice:
    """The placement `up --mode auto` starts, and the goodput the planner predicts for each mode."""

    best: Evaluation
    per_mode: dict[str, float]  # each mode's best goodput (req/s); 0 where nothing met the SLOs
    workload: str
    slo: Slo
    profile: str  # the latency profile's file name

    @property
    def placement(self) -> Placement:
        return self.best.candidate.placement

    def describe(self) -> str:
        c = self.best.candidate
        others = ", ".join(f"{mode} {rate:.3g}" for mode, rate in self.per_mode.items())
        return (f"auto: {c.placement.mode.value}, {c.placement.describe()}, token budget {c.token_budget}, "
                f"max {c.max_num_seqs} seqs: predicted goodput {self.best.max_rate:.3g} req/s for {self.workload} "
                f"at TTFT <= {self.slo.ttft_s:g} s, TPOT <= {self.slo.tpot_s:g} s, {self.slo.target:.0%} attainment "
                f"(each mode's best: {others} req/s; profile {self.profile})")


def choose(args: argparse.Namespace, num_cores: int) -> AutoChoice:
    """Plan for up's flags on num_cores cores; ValueError when no placement meets the SLOs."""
    preset_slos(args)
    if args.ttft_slo is None or args.tpot_slo is None:
        raise ValueError("--mode auto needs --ttft-slo and --tpot-slo (or a preset --workload, which sets them)")
    if args.device and args.device != "cpu":
        raise ValueError("--mode auto plans CPU cores; on GPUs use `splitserve plan` and deploy its placement")
    path = Path(args.plan_profile) if args.plan_profile else machine_profile()
    profile = load_profile(path)
    workload = get_workload(args.workload, args.input_len, args.output_len)
    slo = Slo(args.ttft_slo, args.tpot_slo, args.attainment)
    serve = ServeConfig(backend=BackendConfig("simulate", str(path), profile.model.name), workload=workload,
                        rates=(), num_requests=AUTO_NUM_REQUESTS, seed=0, slo=slo, pause_s=0.0,
                        keep_records=False)
    # No pruning: it prunes by goodput per core, and the cores here are the launcher's already.
    result = plan(PlanSpec(profile, serve, num_cores, modes=AUTO_MODES, prune=False))
    best = result.most_goodput
    if best is None:
        raise ValueError(f"no placement of {num_cores} core(s) meets TTFT <= {slo.ttft_s:g} s and TPOT <= "
                         f"{slo.tpot_s:g} s at {slo.target:.0%} for {workload.name}, as the planner predicts; "
                         f"loosen the SLOs or give a --mode")
    per_mode = {m.value: max((e.max_rate for e in result.evaluations if e.candidate.placement.mode is m),
                             default=0.0) for m in AUTO_MODES}
    return AutoChoice(best, per_mode, workload.name, slo, path.name)


def apply(choice: AutoChoice, args: argparse.Namespace) -> None:
    """Set up's placement and engine flags to the choice."""
    c, p = choice.best.candidate, choice.placement
    args.mode = p.mode.value
    if p.mode is Mode.DISAGGREGATED:
        args.prefill, args.decode = p.num_prefill, p.num_decode
    else:
        args.colocated = p.num_prefill
    args.token_budget, args.max_num_seqs = c.token_budget, c.max_num_seqs
