"""`splitserve prefill`: a prefill server process."""

from __future__ import annotations

import argparse
import asyncio

from splitserve.common.engine_args import apply_threads, engine_config_from_args, positive_float
from splitserve.common.logging import bind_service
from splitserve.worker.config import add_worker_args, check_kv_lease, worker_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prefill", help="run a prefill server",
                       description="Batch prompts FCFS up to the token budget, run prefill, send the first "
                                   "token toward the client, and hold the KV blocks until a decode "
                                   "server pulls them.")
    add_worker_args(p, "prefill", default_port=50060)
    p.add_argument("--ucx-port", type=int, default=0,
                   help="port of the UCX listener for KV pulls (default: 0, a free one)")
    p.add_argument("--kv-lease", type=positive_float, default=30.0,
                   help="seconds a prefilled request's KV blocks wait for a pull before they are "
                        "freed; each heartbeat answer of the leading scheduler that still awaits the "
                        "pull starts them again, so at least two heartbeat intervals (default: 30)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from splitserve.engine.config import EngineRole  # torch loads only when a worker starts

    check_kv_lease(args.kv_lease, args.heartbeat_interval)
    apply_threads(args)
    config = worker_config(args, engine_config_from_args(args, EngineRole.PREFILL), "prefill")
    bind_service("prefill", config.instance_id)
    from .app import serve  # the engine and its transports load only when the server starts

    return asyncio.run(serve(config, args.ucx_port, args.kv_lease))
