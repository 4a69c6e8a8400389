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
    _add_kv_parser(sub)
    _add_serve_parsers(sub)


def _add_kv_parser(sub) -> None:
    from splitserve.bench.kv_bench import BENCH_TRANSPORTS, DEFAULT_BYTES_PER_TOKEN, DEFAULT_TOKENS

    k = sub.add_parser("kv", help="KV transfer speed of each transport between two processes",
                       description="Start a serving process holding synthetic KV payloads of the sizes of "
                                   "the given prompt lengths, pull each over every transport, check the "
                                   "bytes, and print the median latency and GB/s next to a local memcpy "
                                   "of the same bytes.")
    k.add_argument("--tokens", type=positive_int, nargs="+", default=list(DEFAULT_TOKENS),
                   help="prompt lengths whose KV payloads to move (default: %(default)s)")
    k.add_argument("--bytes-per-token", type=positive_int, default=DEFAULT_BYTES_PER_TOKEN,
                   help="KV bytes per token: layers * 2 * kv_heads * head_dim * itemsize "
                        "(default: %(default)s, SmolLM2-135M in bfloat16)")
    k.add_argument("--repeat", type=positive_int, default=5, help="timed pulls per size, after a warm-up (default: 5)")
    k.add_argument("--transports", nargs="+", choices=BENCH_TRANSPORTS, default=list(BENCH_TRANSPORTS),
                   help="transports to measure; grpc+tls is gRPC over mutual TLS (default: all)")
    k.add_argument("--host", default="127.0.0.1", help="address the serving process listens on (default: 127.0.0.1)")
    k.add_argument("--output", default=None, help="also write the figures as JSON to this file")
    k.set_defaults(func=_run_kv)


def _add_serve_parsers(sub) -> None:
    from splitserve.bench.loadgen.config import add_plot_args, add_serve_args  # argparse only, no I/O

    s = sub.add_parser("serve", help="open-loop load against an OpenAI-compatible server (goodput, SLOs)",
                       description="Send requests open-loop (Poisson or gamma arrivals) to an "
                                   "OpenAI-compatible server (splitserve's gateway, vLLM, ...), with exact "
                                   "prompt lengths and forced output lengths; report throughput, "
                                   "TTFT/TPOT/ITL/E2E percentiles and SLO attainment per rate, and the "
                                   "goodput of a rate sweep.")
    add_serve_args(s)
    s.set_defaults(func=_run_serve)
    lat = sub.add_parser("latency", help="the engine's own prefill and decode-step time for one request",
                         description="Run requests one at a time in process (random token-id prompts of "
                                     "--input-len, --output-len tokens forced) and print the P50/P90 of the "
                                     "prefill step and of the decode steps: the floor that TTFT and TPOT "
                                     "through a cluster are compared with.")
    lat.add_argument("--input-len", type=positive_int, default=256, help="prompt tokens (default: 256)")
    lat.add_argument("--output-len", type=positive_int, default=64, help="output tokens (default: 64)")
    lat.add_argument("--repeat", type=positive_int, default=10, help="timed requests (default: 10)")
    lat.add_argument("--warmup", type=int, default=2, help="untimed requests first (default: 2)")
    lat.add_argument("--seed", type=int, default=0, help="seed of the prompt ids (default: 0)")
    lat.add_argument("--batch", type=positive_int, nargs="+", default=[1], metavar="B",
                     help="also decode B requests together and time those steps, e.g. --batch 1 4 16: "
                          "what a worker's splitserve:engine_step_seconds is read against (default: 1)")
    add_engine_args(lat)
    lat.set_defaults(func=_run_latency)
    p = sub.add_parser("plot", help="overlay `bench serve` sweeps in one PNG",
                       description="Plot SLO attainment, TTFT and TPOT against the request rate, one "
                                   "line per JSON file written by `bench serve --output` (named by its "
                                   "--label).")
    add_plot_args(p)
    p.set_defaults(func=_run_plot)
    r = sub.add_parser("rescore", help="goodput of saved `bench serve` runs under other SLOs",
                       description="Re-score the per-request records of `bench serve --output` files for "
                                   "every pair of the TTFT and TPOT SLOs given, and print each run's sweep "
                                   "goodput side by side (no requests are sent).")
    r.add_argument("inputs", nargs="+", type=Path, help="JSON files written by `bench serve --output`")
    r.add_argument("--ttft-slo", type=float, nargs="+", required=True, help="TTFT targets to try (seconds)")
    r.add_argument("--tpot-slo", type=float, nargs="+", required=True, help="TPOT targets to try (seconds)")
    r.add_argument("--attainment", type=float, default=0.9, help="attainment target (default: 0.9)")
    r.add_argument("--output", type=Path, default=None, help="also write the table as JSON here")
    r.set_defaults(func=_run_rescore)
    t = sub.add_parser("timeline", help="inter-token gaps of running requests over prompt arrivals",
                       description="For one rate of each `bench serve --output` file, plot every "
                                   "inter-token gap at the time it ended, over the arrivals of new prompts: "
                                   "prefill interference with running decodes, one panel per file.")
    t.add_argument("inputs", nargs="+", type=Path, help="JSON files written by `bench serve --output`")
    t.add_argument("--rate", type=float, required=True, help="the sweep point to draw")
    t.add_argument("--output", type=Path, required=True, help="the PNG to write")
    t.add_argument("--window", type=float, nargs=2, metavar=("FROM", "TO"), help="seconds to show (default: all)")
    t.add_argument("--tpot-slo", type=float, default=None, help="draw this TPOT target (seconds)")
    t.add_argument("--stall-ms", type=float, default=100.0,
                   help="count gaps longer than this as stalls in the printed summary (default: 100)")
    t.add_argument("--title", default=None, help="figure title")
    t.set_defaults(func=_run_timeline)


def _run_serve(args: argparse.Namespace) -> int:
    from splitserve.bench.loadgen.run import run

    return run(args)


def _run_latency(args: argparse.Namespace) -> int:
    from splitserve.bench.engine_latency import run

    return run(args)


def _run_rescore(args: argparse.Namespace) -> int:
    from splitserve.bench.loadgen.rescore import run

    return run(args)


def _run_timeline(args: argparse.Namespace) -> int:
    from splitserve.bench.loadgen.timeline import run

    return run(args)


def _run_plot(args: argparse.Namespace) -> int:
    from splitserve.bench.loadgen.plot import run

    return run(args)


def _run_engine(args: argparse.Namespace) -> int:
    from splitserve.bench.engine_bench import run

    if args.output and not Path(args.output).resolve().parent.is_dir():
        raise ValueError(f"--output {args.output}: its folder does not exist")
    return run(args)


def _run_kv(args: argparse.Namespace) -> int:
    from splitserve.bench.kv_bench import run

    if args.output and not Path(args.output).resolve().parent.is_dir():
        raise ValueError(f"--output {args.output}: its folder does not exist")
    return run(args)
