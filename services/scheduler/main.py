"""`splitserve scheduler`: the scheduler process."""

from __future__ import annotations

import argparse
import asyncio

import structlog

from splitserve.common.auth import warn_if_open
from splitserve.common.logging import bind_service
from splitserve.common.rpc import NOT_SERVING, SERVING, add_health, bind, make_server
from splitserve.common.service import run_until_signal
from splitserve.common.tracing import Tracer, exporting
from splitserve.queue.streams import CANCEL_STREAM, ProtoCodec, RequestStream, TextCodec, connect, redacted
from splitserve.v1 import common_pb2 as pb
from splitserve.v1 import scheduler_pb2_grpc

from . import config as scheduler_config
from .server import SchedulerServer
from .servicer import SchedulerServicer

log = structlog.get_logger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scheduler", help="run the scheduler",
                       description="Read requests from the Redis stream, assign them first-come-first-served "
                                   "to prefill servers, hand prefilled ones to decode servers, keep the "
                                   "worker registry, and acknowledge each request when it is done.")
    scheduler_config.add_args(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    config = scheduler_config.from_args(args)
    bind_service("scheduler", config.consumer)
    return asyncio.run(serve(config))


async def serve(config: scheduler_config.SchedulerConfig) -> int:
    async with exporting(config.otlp_endpoint, "scheduler", config.consumer) as tracer:
        return await _serve(config, tracer)


async def _serve(config: scheduler_config.SchedulerConfig, tracer: Tracer) -> int:
    redis = connect(config.redis_url, config.redis_credentials)
    await redis.ping()
    server = SchedulerServer(config, RequestStream(redis, ProtoCodec(pb.QueuedRequest)), redis,
                             RequestStream(redis, TextCodec(), key=CANCEL_STREAM), tracer)
    warn_if_open(config.cluster_auth)
    grpc_server = make_server(config.cluster_auth)
    port = bind(grpc_server, config.host, config.port, config.cluster_auth.server_credentials())
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(SchedulerServicer(server, config.heartbeat_interval_s),
                                                       grpc_server)
    health = add_health(grpc_server)
    await grpc_server.start()
    await health.set("", SERVING)
    log.info("scheduler ready", grpc=f"{config.host}:{port}", redis=redacted(config.redis_url))

    async def shutdown() -> None:
        # Still SERVING while it drains: workers must reach it to report the requests they finish.
        # A deposed leader has nothing left to finish: the new leader took its requests over.
        if not server.deposed_reason:
            await server.drain(config.drain_timeout_s)
            await server.lease.release()  # a standby takes over at once
        await health.set("", NOT_SERVING)
        await grpc_server.stop(2)

    tasks = [server.lead_forever(), server.watch_deposed(), server.consume_forever(), server.dispatch_forever(),
             server.reap_forever(), server.cancels_forever(), server.claim_forever()]
    if server.replanner is not None:
        tasks.append(server.replanner.run_forever())
    return await run_until_signal(tasks, shutdown)
