"""`splitserve decode`: a decode server process."""

from __future__ import annotations

import argparse
import asyncio

from splitserve.common.engine_args import apply_threads, engine_config_from_args
from splitserve.common.logging import bind_service
from splitserve.worker.config import add_worker_args, worker_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("decode", help="run a decode server",
                       description="Admit prefilled requests when KV blocks are free, pull their KV blocks "
                                   "from the prefill server, and decode them in a continuous batch.")
    add_worker_args(p, "decode", default_port=50070)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from splitserve.engine.config import EngineRole  # torch loads only when a worker starts

    apply_threads(args)
    config = worker_config(args, engine_config_from_args(args, EngineRole.DECODE), "decode")
    bind_service("decode", config.instance_id)
    from .app import serve  # the engine and its transports load only when the server starts

    return asyncio.run(serve(config))
