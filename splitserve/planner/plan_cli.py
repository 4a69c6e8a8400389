"""`splitserve plan`'s flags -> the plan's spec; the plan -> the table and the deployment files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from splitserve.bench.loadgen.config import BackendConfig, ServeConfig, shared_prefix_from_args
from splitserve.bench.loadgen.metrics import Slo
from splitserve.bench.loadgen.workloads import get_workload, preset_slos
from splitserve.planner.latency import load_profile
from splitserve.planner.placements import default_resources
from splitserve.planner.plan import (
    DEFAULT_MAX_NUM_SEQS,
    DEFAULT_NUM_REQUESTS,
    DEFAULT_TOKEN_BUDGETS,
    Plan,
    PlanSpec,
)
from splitserve.planner.plan_output import describe, format_plan, unit
from splitserve.planner.plan_writers import Deployable, compose_text, up_script, write_kustomize
from splitserve.planner.sim_engine import EngineSettings
from splitserve.planner.simulator import Mode
from splitserve.planner.sweep import machine_profile


def plan_spec_from_args(args: argparse.Namespace) -> tuple[PlanSpec, list[str]]:
    profile_path = args.profile or machine_profile()
    profile = load_profile(profile_path)
    warnings = ([f"{profile_path} is a placeholder profile (see its 'source'), not a measured one"]
                if "placeholder" in profile.source.lower() else [])
    resources = args.resources or default_resources(profile)
    if resources is None:
        raise ValueError("the profile does not say how many cores or devices its machine has; give --resources")
    kv_cache_gb = args.kv_cache_gb or float(profile.machine.get("kv_cache_gb", 1.0))
    preset_slos(args)
    serve = ServeConfig(
        backend=BackendConfig("simulate", str(profile_path), profile.model.name),
        workload=get_workload(args.workload, args.input_len, args.output_len), rates=(),
        shared_prefix=shared_prefix_from_args(args),
        burstiness=args.burstiness, num_requests=args.num_requests or DEFAULT_NUM_REQUESTS, seed=args.seed,
        slo=Slo(args.ttft_slo, args.tpot_slo, args.attainment), pause_s=0.0, keep_records=False)
    spec = PlanSpec(profile, serve, resources, modes=tuple(Mode(m) for m in dict.fromkeys(args.modes)),
                    degrees=tuple(args.degrees) if args.degrees else None,
                    token_budgets=tuple(args.token_budgets or DEFAULT_TOKEN_BUDGETS),
                    max_num_seqs=tuple(args.max_num_seqs or DEFAULT_MAX_NUM_SEQS),
                    engine=EngineSettings(kv_cache_bytes=int(kv_cache_gb * (1 << 30))),
                    # The pruning ceiling prices every prompt whole: with shared prefixes it would
                    # drop placements the cache lets win, so each one is simulated.
                    num_seeds=args.seeds, prune=not args.no_prune and not args.system_prompts)
    missing = set(args.degrees or []) - set(profile.degrees)
    if missing:
        warnings.append(f"the profile has no model for {sorted(missing)} {profile.parallelism}: left out")
    return spec, warnings


def write_outputs(plan: Plan, args: argparse.Namespace) -> None:
    """Print the table; write the deployment files asked for."""
    print(format_plan(plan, args.top), flush=True)
    wanted = (args.write_up_args, args.write_compose, args.write_kustomize)
    if all(path is None for path in wanted):
        return
    if plan.best is None:
        raise ValueError("no configuration met the SLOs: nothing to write")
    deployable = Deployable.of(plan.best, plan.spec.profile, plan.spec.engine, headline(plan))
    if args.write_up_args is not None:
        _write(args.write_up_args, up_script(deployable))
    if args.write_compose is not None:
        base = yaml.safe_load(args.compose_file.read_text()) if args.compose_file.is_file() else None
        _write(args.write_compose, compose_text(deployable, base))
    if args.write_kustomize is not None:
        base = args.kustomize_base or ("../../base" if deployable.cpu else "../gpu")
        for path in write_kustomize(deployable, args.write_kustomize, base):
            print(f"wrote {path}", file=sys.stderr)


def headline(plan: Plan) -> str:
    best, serve = plan.best, plan.spec.serve
    return (f"splitserve plan: {describe(best)}; predicted {best.max_rate:.3g} req/s "
            f"({best.goodput_per_unit:.3g} per {unit(plan)}) of {serve.workload.name} at TTFT <= "
            f"{serve.slo.ttft_s} s, TPOT <= {serve.slo.tpot_s} s, {serve.slo.target:.0%} attainment")


def _write(path: Path, text: str) -> None:
    path.write_text(text)
    print(f"wrote {path}", file=sys.stderr)

