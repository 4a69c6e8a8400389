"""A plan as a printed table and as JSON, and the `bench serve` command that checks it for real."""

from __future__ import annotations

import shlex
from dataclasses import asdict
from typing import Any

from splitserve.planner.placements import is_cpu
from splitserve.planner.plan import Evaluation, Plan

FORMAT = "splitserve-plan/1"


def unit(plan: Plan) -> str:
    return "core" if is_cpu(plan.spec.profile) else "device"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _row(rank: int, e: Evaluation) -> str:
    c, report = e.candidate, e.report
    ttft, tpot = (report.ttft_ms.p90, report.tpot_ms.p90) if report else (None, None)
    attained = f"{report.slo.attainment:.1%}" if report else "-"
    return (f"{rank:>4}  {c.placement.mode.value:<13} {c.placement.describe():<18} {c.placement.resources:>4} "
            f"{c.token_budget:>6} {c.max_num_seqs:>5} {e.max_rate:>9.3f} {e.goodput_per_unit:>9.3f} "
            f"{attained:>7} {_ms(ttft):>9} {_ms(tpot):>9}")


def best_per_placement(plan: Plan) -> list[Evaluation]:
    """The best configuration of each placement, best first."""
    rows: dict = {}
    for e in plan.evaluations:
        rows.setdefault(e.candidate.placement, e)
    return list(rows.values())


def format_plan(plan: Plan, top: int = 10) -> str:
    spec, u = plan.spec, unit(plan)
    slo = spec.serve.slo
    lines = [f"plan for {spec.serve.workload.name} on {spec.resources} {u}s of {spec.profile.model.name} "
             f"({spec.profile.machine.get('description', 'the profiled machine')}): TTFT <= {slo.ttft_s} s, "
             f"TPOT <= {slo.tpot_s} s, attainment >= {slo.target:.0%}; {spec.serve.num_requests} requests per "
             f"rate, seed {spec.serve.seed}",
             f"{len(best_per_placement(plan))} placements searched ({len(plan.evaluations)} configurations), "
             f"{len(plan.pruned)} pruned, {plan.num_simulations} simulations in {plan.seconds:.1f} s; "
             f"each placement's best configuration:", "",
             f"rank  mode          workers            {u + 's':>5} budget  seqs  max req/s  per {u:<6}"
             f"  attain  TTFT p90  TPOT p90 (ms)"]
    lines += [_row(i + 1, e) for i, e in enumerate(best_per_placement(plan)[:top])]
    return "\n".join(lines + [""] + _summary(plan))


def _summary(plan: Plan) -> list[str]:
    best, base, u = plan.best, plan.baseline, unit(plan)
    if best is None:
        return ["no placement meets the SLOs at any rate the search tried"]
    lines = [f"best: {describe(best)}: {best.max_rate:.3f} req/s, {best.goodput_per_unit:.3f} req/s per {u}"]
    if base is not None:
        gain = f", {best.goodput_per_unit / base.goodput_per_unit:.2f}x" if base.goodput_per_unit else ""
        lines.append(f"default (`splitserve up` 1 prefill + 1 decode, budget {base.candidate.token_budget}, "
                     f"{base.candidate.max_num_seqs} seqs): {base.max_rate:.3f} req/s, "
                     f"{base.goodput_per_unit:.3f} per {u}{gain}")
    if not is_cpu(plan.spec.profile) and max(best.candidate.placement.degrees) > 1:
        lines.append("note: more than one device per worker needs tensor parallelism, which splitserve's "
                     "engine does not have (--degrees 1 plans for it as it is)")
    lines.append(f"check it: {bench_serve_command(plan, best)}")
    return lines


def describe(e: Evaluation) -> str:
    c = e.candidate
    return f"{c.placement.mode.value} {c.placement.describe()}, token budget {c.token_budget}, max {c.max_num_seqs} seqs"


def bench_serve_command(plan: Plan, e: Evaluation) -> str:
    """The `bench serve` run that the prediction is for, against the cluster once it is up."""
    serve = plan.spec.serve
    slo = serve.slo
    args = ["splitserve", "bench", "serve", "--workload", serve.workload.name, "--rate", f"{e.max_rate:.3g}",
            "--num-requests", str(serve.num_requests), "--seed", str(serve.seed)]
    if serve.workload.name == "fixed":
        args += ["--input-len", str(serve.workload.input.median), "--output-len", str(serve.workload.output.median)]
    for flag, value in (("--ttft-slo", slo.ttft_s), ("--tpot-slo", slo.tpot_s)):
        args += [flag, str(value)] if value is not None else []
    return shlex.join([*args, "--attainment", str(slo.target)])


def evaluation_json(e: Evaluation) -> dict[str, Any]:
    c = e.candidate
    placement = asdict(c.placement) | {"mode": c.placement.mode.value, "resources": c.placement.resources}
    return {"placement": placement, "describe": c.placement.describe(), "token_budget": c.token_budget,
            "max_num_seqs": c.max_num_seqs, "max_rate": e.search.max_rate,
            "first_failing_rate": e.search.first_failing, "goodput_per_unit": e.goodput_per_unit,
            "num_simulations": e.search.num_simulations,
            "report": e.report.to_json() if e.report else None}


def plan_json(plan: Plan) -> dict[str, Any]:
    spec = plan.spec
    return {
        "format": FORMAT,
        "profile": {"source": spec.profile.source, "machine": spec.profile.machine,
                    "model": spec.profile.model.name, "parallelism": spec.profile.parallelism},
        "serve": spec.serve.to_json() | {"rates": []},
        "search": {"resources": spec.resources, "unit": unit(plan), "modes": [m.value for m in spec.modes],
                   "degrees": list(spec.degrees) if spec.degrees else sorted(spec.profile.degrees),
                   "token_budgets": list(spec.token_budgets), "max_num_seqs": list(spec.max_num_seqs),
                   "num_seeds": spec.num_seeds, "rel_tol": spec.rel_tol, "prune": spec.prune,
                   "kv_cache_bytes": spec.engine.kv_cache_bytes, "block_size": spec.engine.block_size},
        "num_simulations": plan.num_simulations, "seconds": plan.seconds,
        "best": evaluation_json(plan.best) if plan.best else None,
        "baseline": evaluation_json(plan.baseline) if plan.baseline else None,
        "evaluations": [evaluation_json(e) for e in plan.evaluations],
        "pruned": [{"describe": p.placement.describe(), "mode": p.placement.mode.value,
                    "ceiling_rps": p.ceiling_rps} for p in plan.pruned],
    }

