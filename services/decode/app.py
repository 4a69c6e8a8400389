"""The decode server process: wires the engine, gRPC, Redis and the KV transport together."""

from __future__ import annotations

import structlog

from splitserve.common.auth import warn_if_open
from splitserve.common.rpc import SERVING, add_health, bind, make_server
from splitserve.common.service import run_until_signal
from splitserve.common.tracing import Tracer, exporting
from splitserve.kv_transfer.factory import make_kv_puller
from splitserve.queue.streams import connect
from splitserve.v1 import decode_pb2_grpc
from splitserve.v1 import scheduler_pb2 as spb
from splitserve.worker.common import SchedulerLink, advertised_address, worker_info, worker_shutdown
from splitserve.worker.config import WorkerConfig
from splitserve.worker.engine_loop import load_engine

from .server import DecodeServer
from .servicer import DecodeServicer

log = structlog.get_logger(__name__)


async def serve(config: WorkerConfig) -> int:
    async with exporting(config.otlp_endpoint, "decode", config.instance_id) as tracer:
        return await _serve(config, tracer)


async def _serve(config: WorkerConfig, tracer: Tracer) -> int:
    engine = await load_engine(config.engine)
    redis = connect(config.redis_url, config.redis_credentials)
    warn_if_open(config.cluster_auth)
    grpc_server = make_server(config.cluster_auth)
    port = bind(grpc_server, config.host, config.port, config.cluster_auth.server_credentials())
    # Refuses handles unfit for this cache; its gRPC pulls carry the cluster token.
    puller = make_kv_puller(config.kv_transport, config.cluster_auth, engine.layout)
    server = DecodeServer(config, engine, redis, puller, tracer)
    decode_pb2_grpc.add_DecodeServicer_to_server(DecodeServicer(server), grpc_server)
    address = advertised_address(config, port)
    link = SchedulerLink(config, worker_info(config, spb.WORKER_ROLE_DECODE, address, engine), server.stats,
                         server.held, server.fence, lambda: server.loop.published_cache)
    server.link = link
    server.loop.start()
    await puller.start()
    try:  # UCX keeps a non-daemon thread: close the puller on every exit path
        return await _serve_started(config, engine, redis, grpc_server, server, link, address)
    finally:
        await puller.close()


async def _serve_started(config, engine, redis, grpc_server, server, link, address) -> int:
    health = add_health(grpc_server)
    await grpc_server.start()
    await health.set("", SERVING)
    log.info("decode server ready", grpc=address, kv_transport=config.kv_transport,
             num_blocks=engine.blocks.num_blocks, max_num_seqs=config.engine.max_num_seqs)

    tasks = [link.run(), server.replies.run(), server.admit_forever()]
    shutdown = worker_shutdown(health, grpc_server, server, link, config.drain_timeout_s)
    return await run_until_signal(tasks, shutdown, server.loop.failed)
