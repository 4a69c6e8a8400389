"""The prefill server process: wires the engine, gRPC, Redis and the KV transport together."""

from __future__ import annotations

import structlog

from splitserve.common.auth import warn_if_open
from splitserve.common.net import advertised_host
from splitserve.common.rpc import SERVING, add_health, bind, make_server
from splitserve.common.service import run_until_signal
from splitserve.common.tracing import Tracer, exporting
from splitserve.kv_transfer.factory import make_kv_server
from splitserve.queue.streams import connect
from splitserve.v1 import prefill_pb2_grpc
from splitserve.v1 import scheduler_pb2 as spb
from splitserve.worker.common import SchedulerLink, advertised_address, worker_info, worker_shutdown
from splitserve.worker.config import WorkerConfig
from splitserve.worker.engine_loop import load_engine

from .server import PrefillServer
from .servicer import PrefillServicer

log = structlog.get_logger(__name__)


async def serve(config: WorkerConfig, ucx_port: int, kv_lease_s: float) -> int:
    async with exporting(config.otlp_endpoint, "prefill", config.instance_id) as tracer:
        return await _serve(config, ucx_port, kv_lease_s, tracer)


async def _serve(config: WorkerConfig, ucx_port: int, kv_lease_s: float, tracer: Tracer) -> int:
    engine = await load_engine(config.engine)
    redis = connect(config.redis_url, config.redis_credentials)
    warn_if_open(config.cluster_auth)
    grpc_server = make_server(config.cluster_auth)
    port = bind(grpc_server, config.host, config.port, config.cluster_auth.server_credentials())
    kv_server = make_kv_server(config.kv_transport, advertised_host(config.host), ucx_port)
    server = PrefillServer(config, engine, redis, kv_lease_s, tracer)
    server.grpc_address = advertised_address(config, port)
    await kv_server.start(server)
    try:  # UCX keeps a non-daemon thread: stop the KV server on every exit path
        return await _serve_started(config, engine, redis, grpc_server, server, kv_server)
    finally:
        await kv_server.stop()


async def _serve_started(config, engine, redis, grpc_server, server, kv_server) -> int:
    server.kv_address = kv_server.address
    grpc_kv = kv_server if config.kv_transport == "grpc" else None
    prefill_pb2_grpc.add_PrefillServicer_to_server(PrefillServicer(server, grpc_kv), grpc_server)
    health = add_health(grpc_server)
    info = worker_info(config, spb.WORKER_ROLE_PREFILL, server.grpc_address, engine)
    server.link = SchedulerLink(config, info, server.stats, server.held, server.fence,
                                lambda: server.loop.published_cache, server.extend_leases)
    server.loop.start()
    await grpc_server.start()
    await health.set("", SERVING)
    log.info("prefill server ready", grpc=server.grpc_address, kv_transport=config.kv_transport,
             kv_address=server.kv_address, num_blocks=engine.blocks.num_blocks,
             token_budget=config.engine.token_budget)

    tasks = [server.link.run(), server.replies.run()]
    shutdown = worker_shutdown(health, grpc_server, server, server.link, config.drain_timeout_s)
    return await run_until_signal(tasks, shutdown, server.loop.failed)
