"""`splitserve profile`: measure this machine's prefill, decode and KV-transfer latency model."""

from __future__ import annotations

import argparse

from splitserve.common.engine_args import DTYPE_NAMES, positive_int


def _core_list(text: str) -> list[int]:
    try:
        counts = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected core counts like 1,2, got {text!r}") from None
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError(f"core counts must be >= 1, got {text!r}")
    return counts


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="measure this machine's latency model for `splitserve simulate`",
                       description="For each core count, in a fresh process pinned like a worker, time the "
                                   "engine's prefill batches (varying sum(len) and sum(len^2) independently), "
                                   "decode steps (batch sizes x contexts) and chunked mixed steps; measure the "
                                   "KV transfer over UCX; fit prefill = a + b*sum(len) + c*sum(len^2) and "
                                   "decode = a + b*sum(context) + c*batch; print the fits with their errors and "
                                   "write the profile JSON. Run it on a quiet machine: other load skews every "
                                   "number.")
    p.add_argument("--cores", type=_core_list, default=None,
                   help="core counts to measure, e.g. 1,2 (default: 1 up to every core this process may use)")
    p.add_argument("--quick", action="store_true",
                   help="a few tiny shapes: a smoke run, not a usable profile (no contention, unless --add-contention)")
    p.add_argument("--repeat", type=positive_int, default=3,
                   help="timed runs per shape, after a warm-up; the median is kept (default: 3)")
    p.add_argument("--output", default="profile.json", help="the profile to write (default: profile.json)")
    p.add_argument("--add-contention", metavar="PROFILE", default=None,
                   help="measure only how much slower steps run beside busy cores, for the core counts of "
                        "this existing profile that leave cores free, and write it into PROFILE")
    p.add_argument("--description", default=None, help="what machine this is (default: the host name)")
    p.add_argument("--kv-transport", choices=("ucx", "grpc"), default="ucx",
                   help="the transport whose KV pulls to measure (default: ucx, as `splitserve up`)")
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None, help="as every engine command's --model (default: the bundled one)")
    g.add_argument("--dtype", default="bfloat16", choices=list(DTYPE_NAMES), help="(default: bfloat16)")
    g.add_argument("--device", default="cpu", help="cpu, or cuda[:N] for one device per worker (default: cpu)")
    g.add_argument("--block-size", type=positive_int, default=16, help="tokens per KV block (default: 16)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from splitserve.planner.profile import run as profile

    return profile(args)
