"""The colocated worker process: wires the engine, gRPC and Redis together (no KV transport)."""

from __future__ import annotations

import structlog

from splitserve.common.auth import warn_if_open
from splitserve.common.rpc import SERVING, add_health, bind, make_server
from splitserve.common.service import run_until_signal
from splitserve.common.tracing import Tracer, exporting
from splitserve.queue.streams import connect
from splitserve.v1 import prefill_pb2_grpc
from splitserve.v1 import scheduler_pb2 as spb
from splitserve.worker.common import SchedulerLink, advertised_address, worker_info, worker_shutdown
from splitserve.worker.config import WorkerConfig
from splitserve.worker.engine_loop import load_engine

from .server import ColocatedServer
from .servicer import ColocatedServicer

log = structlog.get_logger(__name__)


async def serve(config: WorkerConfig) -> int:
    async with exporting(config.otlp_endpoint, "colocated", config.instance_id) as tracer:
        return await _serve(config, tracer)


async def _serve(config: WorkerConfig, tracer: Tracer) -> int:
    engine = await load_engine(config.engine)
    redis = connect(config.redis_url, config.redis_credentials)
    warn_if_open(config.cluster_auth)
    grpc_server = make_server(config.cluster_auth)
    address = advertised_address(config, bind(grpc_server, config.host, config.port,
                                              config.cluster_auth.server_credentials()))
    server = ColocatedServer(config, engine, redis, tracer)
    prefill_pb2_grpc.add_PrefillServicer_to_server(ColocatedServicer(server), grpc_server)
    health = add_health(grpc_server)
    info = worker_info(config, spb.WORKER_ROLE_COLOCATED, address, engine)
    link = SchedulerLink(config, info, server.stats, server.held, server.fence,
                         lambda: server.loop.published_cache)
    server.link = link
    server.loop.start()
    await grpc_server.start()
    await health.set("", SERVING)
    log.info("colocated worker ready", grpc=address, num_blocks=engine.blocks.num_blocks,
             token_budget=config.engine.token_budget, chunk_size=config.engine.chunk_size,
             prefill_slice_ms=config.engine.prefill_slice_ms)

    tasks = [link.run(), server.replies.run()]
    shutdown = worker_shutdown(health, grpc_server, server, link, config.drain_timeout_s)
    return await run_until_signal(tasks, shutdown, server.loop.failed)
