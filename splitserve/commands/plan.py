"""`splitserve plan`: the placement with the best goodput per core (or device) for a workload and
SLOs, found by simulating each placement at a binary-searched rate; optionally written as
`splitserve up` arguments, a compose override and a Kustomize overlay. No torch, no model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from splitserve.bench.loadgen.config import (  # the same flags as bench serve
    _add_slo_args,
    _positive_float,
    add_length_args,
    add_shared_prefix_args,
)
from splitserve.common.engine_args import positive_float, positive_int

from .up import SIMULATED_MODES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="find the placement with the best goodput per core, by simulation",
                       description="Search placements (prefill and decode workers and their cores, or "
                                   "colocated workers; token budget; batch limit) within --resources; for "
                                   "each, binary-search the highest Poisson rate whose simulated SLO "
                                   "attainment meets the target; rank by goodput per core (device). "
                                   "See docs/planner.md, 'Plan'.")
    p.add_argument("--profile", type=Path, default=None,
                   help="latency profile JSON (default: the shipped profile of this machine type: "
                        "its processor's, else the Sapphire Rapids VM's)")
    _add_search_args(p)
    _add_load_args(p)
    _add_slo_args(p)
    _add_output_args(p)
    p.set_defaults(func=run)


def _add_search_args(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("search")
    s.add_argument("--resources", type=positive_int, default=None, metavar="N",
                   help="cores (CPU profiles) or devices (GPU profiles) to place workers on (default: the "
                        "profiled machine's)")
    s.add_argument("--modes", choices=SIMULATED_MODES, nargs="+", default=["disaggregated", "colocated"],
                   help="(default: disaggregated colocated)")
    s.add_argument("--degrees", type=positive_int, nargs="+", default=None,
                   help="cores (devices) per worker to consider (default: every degree in the profile)")
    s.add_argument("--token-budgets", type=positive_int, nargs="+", default=None, metavar="N",
                   help="token budgets to try (default: 256 512 1024 2048 4096)")
    s.add_argument("--max-num-seqs", type=positive_int, nargs="+", default=None, metavar="N",
                   help="decode batch limits to try (default: 16 32 64 128)")
    s.add_argument("--kv-cache-gb", type=positive_float, default=None,
                   help="per worker (default: the profile's machine.kv_cache_gb, else 1, as splitserve up)")
    s.add_argument("--no-prune", action="store_true",
                   help="simulate every placement, even those whose throughput ceiling cannot win")


def _add_load_args(p: argparse.ArgumentParser) -> None:
    load = p.add_argument_group("load (as `bench serve`)")
    add_length_args(load)
    add_shared_prefix_args(load)
    load.add_argument("--burstiness", type=_positive_float, default=1.0, help="gamma shape; 1 is Poisson")
    load.add_argument("--num-requests", type=positive_int, default=None,
                      help="requests per simulated rate (default: 400)")
    load.add_argument("--seed", type=int, default=0, help="seed of arrivals and lengths (default: 0)")
    load.add_argument("--seeds", type=positive_int, default=1, metavar="K",
                      help="judge each rate over K runs (seeds SEED..SEED+K-1) together: steadier, K times "
                           "slower (default: 1, the run `bench serve --seed SEED` sends)")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    out = p.add_argument_group("output")
    out.add_argument("--top", type=positive_int, default=10, help="rows of the table (default: 10)")
    out.add_argument("--json", type=Path, default=None, metavar="FILE.json",
                     help="write every configuration searched, with its report, here")
    out.add_argument("--write-up-args", type=Path, default=None, metavar="FILE",
                     help="write the best configuration as a `splitserve up ...` command line")
    out.add_argument("--write-compose", type=Path, default=None, metavar="FILE.yml",
                     help="write it as a compose override of --compose-file")
    out.add_argument("--compose-file", type=Path, default=Path("docker-compose.yml"),
                     help="the compose file the override is for; a colocated service is derived from its "
                          "prefill service (default: docker-compose.yml)")
    out.add_argument("--write-kustomize", type=Path, default=None, metavar="DIR",
                     help="write it as a Kustomize overlay in DIR")
    out.add_argument("--kustomize-base", default=None, metavar="PATH",
                     help="the overlay's base, relative to DIR (default: ../../base; GPU profiles: ../gpu)")


def run(args: argparse.Namespace) -> int:
    from splitserve.planner.plan import plan
    from splitserve.planner.plan_cli import plan_spec_from_args, write_outputs

    spec, warnings = plan_spec_from_args(args)
    for warning in warnings:
        print(f"splitserve plan: warning: {warning}", file=sys.stderr)
    result = plan(spec)
    if args.json is not None:  # first: a configuration the writers refuse is still in it
        from splitserve.planner.plan_output import plan_json

        args.json.write_text(json.dumps(plan_json(result), indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    write_outputs(result, args)
    return 0 if result.best is not None else 1
