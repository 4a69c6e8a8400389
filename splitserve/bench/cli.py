"""`splitserve bench ...`: benchmark commands that print JSON figures."""

from __future__ import annotations

import argparse

from pathlib import Path

from splitserve.common.engine_args import add_engine_args, positive_int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks that print JSON figures")
    sub = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    e = sub.add_parser("engine", help="prefill/decode speed against the roofline and transformers",
                       description="Measure this machine's limits, then prefill tokens/s and decode "
                                   "tokens/s of the in-process engine, each as a percentage of its "
                                   "roofline and as a ratio to transformers' generate on the same shapes. "
                                   "Prints one JSON document.")
    e.add_argument("--quick", action="store_true", help="small shapes only (a smoke run, ~1 minute)")
    e.add_argument("--no-transformers", action="store_true", help="skip the transformers comparison")
    e.add_argument("--steps", type=positive_int, default=8, help="timed decode steps per shape (default: 8)")
    e.add_argument("--output", default=None, help="also write the JSON to this file")
    add_engine_args(e)
    e.set_defaults(func=_run_engine)


def _run_engine(args: argparse.Namespace) -> int:
    from splitserve.bench.engine_bench import run

    if args.output and not Path(args.output).resolve().parent.is_dir():
        raise ValueError(f"--output {args.output}: its folder does not exist")
    return run(args)
