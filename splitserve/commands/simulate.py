"""`splitserve simulate`: `bench serve` against a simulated cluster, from a latency profile.

The workload, arrival and SLO flags mean what they mean to `bench serve` (the same generators and
the same report), and the cluster flags what they mean to `splitserve up`. Runs in well under a
second per few hundred requests; no torch, no model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from splitserve.bench.loadgen.config import (  # the same flags as bench serve
    _add_slo_args,
    _positive_float,
    add_length_args,
    add_shared_prefix_args,
    add_trace_args,
)
from splitserve.common.engine_args import positive_float, positive_int

from .up import SIMULATED_MODES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="simulate `bench serve` against a cluster from a latency profile",
                       description="Discrete-event simulation of a splitserve cluster (FCFS placement, "
                                   "token-budget prefill batches, KV transfer, decode admission by free "
                                   "blocks, continuous batching; or colocated / chunked workers) over the "
                                   "workloads and arrivals of `bench serve`, with step times from a profile "
                                   "written by `splitserve profile`. Prints the same report as `bench serve`, "
                                   "and with --output writes the same JSON.")
    p.add_argument("--profile", type=Path, default=None,
                   help="latency profile JSON (default: the shipped profile of this machine type: "
                        "its processor's, else the Sapphire Rapids VM's)")
    _add_cluster_args(p)
    _add_load_args(p)
    _add_slo_args(p)
    out = p.add_argument_group("output")
    out.add_argument("--label", default=None, help="name of this run in JSON and plots (default: the mode)")
    out.add_argument("--json", action="store_true", help="print the JSON document instead of the reports")
    out.add_argument("--output", type=Path, default=None, metavar="FILE.json",
                     help="write the `bench serve` JSON here (bench plot / rescore read it)")
    out.add_argument("--no-records", action="store_true", help="leave the per-request records out of the JSON")
    out.add_argument("--plot", type=Path, default=None, metavar="FILE.png",
                     help="write a PNG of attainment, TTFT and TPOT vs rate")
    p.set_defaults(func=run)


def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    c = p.add_argument_group("cluster (as `splitserve up`)")
    c.add_argument("--mode", choices=SIMULATED_MODES, default="disaggregated", help="(default: disaggregated)")
    c.add_argument("--prefill", type=positive_int, default=1, help="prefill servers (default: 1)")
    c.add_argument("--decode", type=positive_int, default=1, help="decode servers (default: 1)")
    c.add_argument("--colocated", type=positive_int, default=1,
                   help="colocated workers, in the colocated and chunked modes (default: 1)")
    c.add_argument("--cores-per-worker", type=positive_int, default=None,
                   help="cores (the profile's parallelism degree) of every worker (default: the profiled "
                        "machine's cores split among the workers, as `splitserve up` does)")
    c.add_argument("--token-budget", type=positive_int, default=2048, help="(default: 2048)")
    c.add_argument("--max-num-seqs", type=positive_int, default=64, help="(default: 64)")
    c.add_argument("--block-size", type=positive_int, default=16, help="(default: 16)")
    c.add_argument("--kv-cache-gb", type=positive_float, default=1.0, help="per worker (default: 1)")
    c.add_argument("--chunk-size", type=positive_int, default=None, help="chunked mode (default: 256)")
    c.add_argument("--prefill-queue-factor", type=positive_float, default=2.0, help="scheduler (default: 2)")
    c.add_argument("--max-pending", type=positive_int, default=256, help="gateway (default: 256)")
    c.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="workers cache no prefixes (default: they do, for workloads whose prompts share them)")
    c.add_argument("--routing", choices=("kv", "least-loaded"), default="kv", help="scheduler (default: kv)")


def _add_load_args(p: argparse.ArgumentParser) -> None:
    load = p.add_argument_group("load (as `bench serve`)")
    rate = load.add_mutually_exclusive_group()
    rate.add_argument("--rate", type=_positive_float, default=1.0, help="mean requests per second (default: 1)")
    rate.add_argument("--rates", type=_positive_float, nargs="+", default=None, help="a sweep: one point per rate")
    load.add_argument("--burstiness", type=_positive_float, default=1.0, help="gamma shape; 1 is Poisson")
    count = load.add_mutually_exclusive_group()
    count.add_argument("--num-requests", type=positive_int, default=None, help="per point (default: 100)")
    count.add_argument("--duration", type=_positive_float, default=None, help="seconds of arrivals per point")
    load.add_argument("--seed", type=int, default=0, help="seed of arrivals and lengths (default: 0)")
    add_length_args(load)
    add_shared_prefix_args(load)
    add_trace_args(load)


def run(args: argparse.Namespace) -> int:
    from splitserve.planner.cli_config import simulated_run_from_args
    from splitserve.planner.sweep import run_sweep, write_outputs

    simulated = simulated_run_from_args(args)
    for warning in simulated.warnings:
        print(f"splitserve simulate: warning: {warning}", file=sys.stderr)
    result = run_sweep(simulated.run, print_reports=not args.json)
    write_outputs(simulated.run, result, args.json)
    return 0 if all(p["report"]["completed"] for p in result["points"]) else 1
