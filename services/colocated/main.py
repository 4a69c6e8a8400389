"""`splitserve colocated`: a worker that runs prefill and decode in one engine (the baseline)."""

from __future__ import annotations

import argparse
import asyncio

from splitserve.common.engine_args import apply_threads, engine_config_from_args
from splitserve.common.logging import bind_service
from splitserve.worker.config import add_worker_args, worker_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("colocated", help="run a colocated worker (prefill and decode in one engine)",
                       description="The baseline splitserve is measured against: one engine takes requests "
                                   "from the scheduler like a prefill server and decodes them itself with "
                                   "continuous batching. By default a waiting prompt runs whole before the "
                                   "next decode step (vLLM's order, which stalls running decodes); with "
                                   "--chunk-size, prompts are split into chunks that ride along with the "
                                   "decode steps (Sarathi-Serve).")
    add_worker_args(p, "colocated", default_port=50080)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from splitserve.engine.config import EngineRole  # torch loads only when a worker starts

    apply_threads(args)
    config = worker_config(args, engine_config_from_args(args, EngineRole.COLOCATED), "colocated")
    bind_service("colocated", config.instance_id)
    from .app import serve  # the engine loads only when the server starts

    return asyncio.run(serve(config))
