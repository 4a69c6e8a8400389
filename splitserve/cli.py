"""The `splitserve` command: one entry point, one subcommand per tool or service."""

from __future__ import annotations

import argparse
import sys

from splitserve.common.logging import ERROR_PREFIX, configure_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitserve",
        description="Disaggregated prefill/decode LLM serving.",
    )
    parser.add_argument("--log-level", default="info", help="debug, info, warning or error (default: info)")
    parser.add_argument("--log-json", action="store_true", default=None,
                        help="JSON log lines even on a terminal (default: JSON only off a terminal)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from splitserve.bench import cli as bench_cli
    from splitserve.commands import chaos, generate, plan, profile, simulate, up
    from splitserve.common import certs
    from splitserve.services.colocated import main as colocated
    from splitserve.services.decode import main as decode
    from splitserve.services.gateway import main as gateway
    from splitserve.services.prefill import main as prefill
    from splitserve.services.scheduler import main as scheduler

    up.add_parser(sub)
    generate.add_parser(sub)
    scheduler.add_parser(sub)
    prefill.add_parser(sub)
    decode.add_parser(sub)
    colocated.add_parser(sub)
    gateway.add_parser(sub)
    bench_cli.add_parser(sub)
    profile.add_parser(sub)
    simulate.add_parser(sub)
    plan.add_parser(sub)
    certs.add_parser(sub)
    chaos.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_json)
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:  # bad flags, input, or model files: no traceback
        print(f"{ERROR_PREFIX}{exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
